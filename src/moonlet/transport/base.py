"""The one interface every transport implements.

The engine resolves segments, validates local memory, picks a transport per
request and hands each transport the requests it carries.  A transport moves
the bytes and reports every slice's end to the :class:`~moonlet.batch.Batch`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from operator import add
from typing import Any

from ..batch import Batch, Request
from ..config import EngineConfig
from ..memory import Buffer, MemoryRegistry
from ..security import PLAIN, Security
from ..segment import Segment, SegmentDescriptor

#: One request as the engine hands it to a transport: (position in the batch, the request,
#: the registered local buffer holding its local range, the peer's buffer entry holding its
#: remote range). A plain tuple: it is made per request.
WorkItem = tuple[int, Request, Buffer, dict[str, Any]]


def contiguous(local_addrs: list[int], remote_addrs: list[int], lengths: list[int]) -> bool:
    """Whether each request starts where the one before it ended, on both sides (pages of one KV-cache
    block, a tensor cut in pieces): such a batch moves as one range. A scattered batch costs one test."""
    if local_addrs[1] != local_addrs[0] + lengths[0] or remote_addrs[1] != remote_addrs[0] + lengths[0]:
        return False
    ends = list(map(add, local_addrs[:-1], lengths[:-1]))
    return local_addrs[1:] == ends and remote_addrs[1:] == list(map(add, remote_addrs[:-1], lengths[:-1]))


@dataclass
class HostContext:
    """What a transport may know about the engine it serves."""

    config: EngineConfig
    registry: MemoryRegistry
    security: Security = PLAIN  # TLS and the cluster secret every connection must pass


class Transport(ABC):
    """A way to move bytes between this engine's memory and a peer's."""

    name: str = ""

    def endpoint(self) -> str | None:
        """The address peers use to reach this transport (published in the descriptor)."""
        return None

    @abstractmethod
    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: dict) -> bool:
        """Whether this transport can carry a request between ``local`` and the peer's ``remote`` buffer."""

    @abstractmethod
    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        """Start moving ``items``; report each one's end to ``batch`` (never block on the network)."""

    def why_not(self, local: Buffer, peer: SegmentDescriptor, remote: dict) -> str:
        """Why :meth:`reaches` is False for this pair, when there is more to say than "not this kind"."""
        return ""

    def submit_many(self, segment: Segment, batch: Batch, op: int, local_addrs: list[int],
                    remote_addrs: list[int], lengths: list[int], local: Buffer, remote: dict) -> None:
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
