"""The one interface every transport implements, and what an engine tells a transport it starts.

The engine resolves segments, validates local memory, picks a transport per
request and hands each transport the requests it carries.  A transport moves
the bytes and reports every slice's end to the :class:`~moonlet.batch.Batch`.
Which transports exist, and how each starts, is in :mod:`.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import add
from typing import Any

from ..batch import Batch, Request
from ..config import EngineConfig
from ..errors import ProtocolError
from ..memory import Buffer, MemoryRegistry
from ..metadata.base import MetadataBackend
from ..security import PLAIN, Security
from ..segment import RemoteBuffer, Segment, SegmentDescriptor

#: One request as the engine hands it to a transport: (position in the batch, the request,
#: the registered local buffer holding its local range, the peer's buffer entry holding its
#: remote range). A plain tuple: it is made per request.
WorkItem = tuple[int, Request, Buffer, RemoteBuffer]


def contiguous(local_addrs: list[int], remote_addrs: list[int], lengths: list[int]) -> bool:
    """Whether each request starts where the one before it ended, on both sides (pages of one KV-cache
    block, a tensor cut in pieces): such a batch moves as one range. A scattered batch costs one test."""
    if local_addrs[1] != local_addrs[0] + lengths[0] or remote_addrs[1] != remote_addrs[0] + lengths[0]:
        return False
    ends = list(map(add, local_addrs[:-1], lengths[:-1]))
    return local_addrs[1:] == ends and remote_addrs[1:] == list(map(add, remote_addrs[:-1], lengths[:-1]))


def _no_note(name: object, message: object) -> None:
    """The note sink of a context without an engine (tests): refuses every note."""
    raise ProtocolError("this engine takes no notifications")


@dataclass
class HostContext:
    """What a transport may know about the engine it serves (handed to each transport's factory)."""

    config: EngineConfig
    registry: MemoryRegistry
    security: Security = PLAIN  # TLS and the cluster secret every connection must pass
    instance: str = ""  # this engine's instance id (a fresh one per engine)
    host: str = ""  # this host's identity (segment.host_identity)
    pidns: str = ""  # this process's PID namespace
    #: the transport names the engine routes over, in order (a transport may lean on a later one)
    order: tuple[str, ...] = ()
    #: the transports started so far, by name: the listener first (one that rides another finds it here)
    started: dict[str, Transport] = field(default_factory=dict)
    describe: Callable[[], bytes] = bytes  # the engine's descriptor, sealed, as served peer to peer
    descriptor: Callable[[], dict[str, Any]] = dict  # ... unsealed, as a dict (for other engines' formats)
    identity: Callable[[], dict[str, Any]] = dict  # who the engine is to peers (name, instance, endpoint...)
    on_stale: Callable[[str], None] = lambda name: None  # a peer said our view of segment ``name`` is stale
    #: a peer sent a note (name, message); raises ProtocolError, which the peer is told, when refused
    on_note: Callable[[object, object], None] = _no_note
    #: ``count`` requests went from transport ``source`` to ``target`` because of ``reason`` (metrics)
    on_fallback: Callable[[str, str, str, int], None] = lambda source, target, reason, count: None


class Transport(ABC):
    """A way to move bytes between this engine's memory and a peer's."""

    name: str = ""

    def endpoint(self) -> str | None:
        """The address peers use to reach this transport (published in the descriptor)."""
        return None

    @abstractmethod
    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        """Whether this transport can carry a request between ``local`` and the peer's ``remote`` buffer."""

    @abstractmethod
    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        """Start moving ``items``; report each one's end to ``batch`` (never block on the network)."""

    def published(self) -> dict[str, str]:
        """The entries of the descriptor's ``endpoints`` this transport publishes (its name: its endpoint)."""
        ep = self.endpoint()
        return {self.name: ep} if ep else {}

    def descriptor_fields(self) -> dict[str, Any]:
        """Other fields of the descriptor this transport fills (RDMA: ``nics``)."""
        return {}

    def notify(self, peer: SegmentDescriptor, name: str, message: str, timeout: float) -> bool:
        """Deliver a note to ``peer``; False when this transport carries none to it, TransferError when it
        does and the note was not taken."""
        return False

    def wrap_metadata(self, meta: MetadataBackend) -> MetadataBackend:
        """The metadata store the engine uses, given the one it opened (a transport for another engine's
        wire also speaks that engine's metadata)."""
        return meta

    def stats(self) -> dict[str, int]:
        """Counters since start (:meth:`TransferEngine.stats`)."""
        return {}

    def connections(self) -> int:
        """Connections this transport has open now, both directions (a gauge of the metrics)."""
        return 0

    def failure(self) -> str | None:
        """Why this transport can no longer serve (its reactor died), or None."""
        return None

    def why_not(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> str:
        """Why :meth:`reaches` is False for this pair, when there is more to say than "not this kind"."""
        return ""

    def submit_many(self, segment: Segment, batch: Batch, op: int, local_addrs: list[int],
                    remote_addrs: list[int], lengths: list[int], local: Buffer, remote: RemoteBuffer) -> None:
        """Array form of :meth:`submit`: every range already checked to lie in ``local`` / ``remote``.

        Transports with a faster bulk path override this.
        """
        items = [(i, Request(op, a, segment, b, n), local, remote)  # type: ignore[arg-type]
                 for i, (a, b, n) in enumerate(zip(local_addrs, remote_addrs, lengths))]
        self.submit(segment, batch, items)

    def drive(self, batch: Batch, block: bool) -> None:
        """Make progress on ``batch`` in the calling thread: until it is done if ``block``, else once.

        Transports that complete requests on their own threads need not override this.
        """

    def expire(self, batch: Batch) -> None:
        """``batch`` passed its deadline: end its requests now, so no late byte lands."""

    def register(self, buf: Buffer) -> None:
        """A buffer was registered with the engine."""

    def unregister(self, buf: Buffer) -> None:
        """A buffer is being unregistered; drop any state kept for it."""

    def close(self) -> None:
        """Release sockets, threads and handles."""
