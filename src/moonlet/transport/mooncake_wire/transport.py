"""Transport ``mooncake_tcp``: Mooncake's TCP data protocol, so moonlet and Mooncake engines exchange bytes.

Enabled by ``EngineConfig.mooncake_wire``.  As an initiator it carries
requests to peers whose descriptor came from a Mooncake engine (they publish
no moonlet endpoint); as a target it serves Mooncake peers from the data port
of :class:`~moonlet.transport.mooncake_wire.server.MooncakeServer`.  Requests run
one at a time per connection, as Mooncake's protocol requires, on up to
``EngineConfig.lanes`` connections per peer, each driven by its own thread
(blocking ``send``/``recv_into`` straight between the socket and registered
memory).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable

from ...batch import Batch, Op, State
from ...errors import ConfigError, MoonletError, ProtocolError, TransferError
from ...memory import Buffer, MemoryRegistry
from ...metadata.base import MetadataBackend
from ...metadata.mooncake_keys import MooncakeMetadata, exchange
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem
from ..spec import TransportSpec
from ..tcp.dial import split_endpoint
from ..tcp.transport import TcpTransport
from . import protocol as MP
from .server import MooncakeServer

_IDLE_EXIT = 30.0  # a lane thread with nothing to do for this long ends (and closes its connection)


class _Deadline(Exception):
    """The batch's deadline passed mid-request."""


class _Rejected(Exception):
    """The peer answered with Mooncake's "rejected" status."""


class _Lane:
    """One connection to a Mooncake data port, and the thread that runs requests on it."""

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer
        self.sock: socket.socket | None = None

    def run(self) -> None:
        peer = self.peer
        try:
            while True:
                try:
                    job = peer.jobs.get(timeout=_IDLE_EXIT)
                except queue.Empty:
                    with peer.lock:
                        if peer.jobs.empty():
                            peer.lanes -= 1
                            return
                    continue
                if job is None:  # transport closing
                    return
                self.one(*job)
        finally:
            self.drop()

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def one(self, batch: Batch, index: int, op: int, view: memoryview, raddr: int) -> None:
        peer = self.peer
        for attempt in (0, 1):
            if time.monotonic() >= batch.deadline:
                self.drop()
                batch.part_done(index, State.TIMEOUT, f"deadline passed before the request to {peer.name} ended")
                return
            reused = self.sock is not None
            if not reused:
                try:
                    self.sock = socket.create_connection(
                        (peer.host, peer.port), timeout=max(0.001, min(peer.connect_timeout,
                                                                       batch.deadline - time.monotonic())))
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError as e:
                    self.sock = None
                    batch.part_done(index, State.FAILED, f"cannot connect to the Mooncake data port "
                                                         f"{peer.host}:{peer.port} of {peer.name}: {e}")
                    return
            try:
                self.transfer(batch, op, view, raddr)
            except _Rejected:
                self.drop()
                batch.part_done(index, State.FAILED, f"{peer.name} (Mooncake) refused [{raddr:#x}, +{view.nbytes}): "
                                                     "not inside memory it registered")
                return
            except _Deadline:
                self.drop()  # no byte of this request may land after its TIMEOUT
                batch.part_done(index, State.TIMEOUT, f"deadline passed while moving bytes with {peer.name}")
                return
            except (OSError, ConnectionError, ProtocolError) as e:
                self.drop()
                if reused and attempt == 0:
                    continue  # an idle pooled connection the peer had closed: once more on a fresh one
                hint = "" if peer.v2 else " (a Mooncake v1 peer closes the connection on memory it did not register)"
                batch.part_done(index, State.FAILED, f"connection to {peer.name} (Mooncake) lost: {e}{hint}")
                return
            batch.part_done(index)
            return

    def transfer(self, batch: Batch, op: int, view: memoryview, raddr: int) -> None:
        sock = self.sock
        assert sock is not None
        v2 = self.peer.v2
        self._send(batch, memoryview(MP.encode_header(op, raddr, view.nbytes, v2)))
        if op == MP.WRITE:
            try:
                self._send(batch, view)
            except OSError:
                if v2:
                    self._status(batch)  # a rejection explains the broken pipe
                raise
            if v2:
                self._status(batch)
            else:
                # v1 has no acknowledgement: read back the last byte on the same connection. The peer
                # serves a connection's requests in order, so the answer means the write has landed
                # (and a peer that refused it has closed the connection instead).
                self._send(batch, memoryview(MP.encode_header(MP.READ, raddr + view.nbytes - 1, 1, False)))
                self._recv(batch, memoryview(bytearray(1)))
        else:
            if v2:
                self._status(batch)
            self._recv(batch, view)

    def _status(self, batch: Batch) -> None:
        frame = memoryview(bytearray(MP.STATUS.size))
        self._recv(batch, frame)
        if not MP.parse_status(frame):
            raise _Rejected()

    def _wait(self, batch: Batch) -> None:
        left = batch.deadline - time.monotonic()
        if left <= 0:
            raise _Deadline()
        self.sock.settimeout(min(left, 1.0))  # type: ignore[union-attr]

    def _send(self, batch: Batch, view: memoryview) -> None:
        self._move(batch, view, False)

    def _recv(self, batch: Batch, view: memoryview) -> None:
        self._move(batch, view, True)

    def _move(self, batch: Batch, view: memoryview, receive: bool) -> None:
        """Send ``view`` or fill it, checking the batch deadline at least once a second."""
        sock = self.sock
        assert sock is not None
        done, n = 0, view.nbytes
        while done < n:
            self._wait(batch)
            try:
                r = sock.recv_into(view[done:], n - done) if receive else sock.send(view[done:])
            except TimeoutError:
                continue
            if r == 0:
                raise ConnectionError("the peer closed the connection")
            done += r


class _Peer:
    """The lanes and job queue of one Mooncake data endpoint."""

    def __init__(self, name: str, endpoint: str, connect_timeout: float) -> None:
        self.name = name
        self.host, self.port, version = MP.split_data_endpoint(endpoint)
        self.v2 = version >= 2
        self.connect_timeout = connect_timeout
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.lanes = 0


class MooncakeTcpTransport(Transport):
    """Speaks Mooncake's TCP data protocol to Mooncake peers, and serves it to them."""

    name = "mooncake_tcp"

    def __init__(self, ctx: HostContext, host: str, advertise: str, describe: Callable[[], dict],
                 on_notify: Callable[[str, str], None], rpc: tuple[str, int] = ("", 0)) -> None:
        """Serve Mooncake peers on ``host`` (advertised as ``advertise``); ``describe`` and ``on_notify``:
        see :class:`MooncakeServer`; ``rpc``: host and port of our RPC port (the listener's)."""
        cfg = ctx.config
        self._registry: MemoryRegistry = ctx.registry
        self._metadata_timeout = cfg.metadata_timeout
        self._rpc = rpc
        self._lanes = cfg.lanes
        self._connect_timeout = cfg.connect_timeout
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self.server = MooncakeServer(ctx.registry, host, advertise, describe, on_notify, cfg.request_timeout,
                                     cfg.max_connections, cfg.spin_us, getattr(cfg, "idle_timeout", 120.0))

    def endpoint(self) -> str | None:
        return self.server.endpoint

    def notify(self, peer: SegmentDescriptor, name: str, message: str, timeout: float) -> bool:
        """Mooncake's NOTIFY handshake, to a Mooncake engine (one that publishes no moonlet endpoint)."""
        rpc = peer.endpoints.get("mooncake_rpc")
        if "tcp" in peer.endpoints or rpc is None:
            return False
        try:
            exchange(rpc, MP.NOTIFY, {"name": name, "notify_msg": message}, timeout)
        except (OSError, MoonletError) as e:
            raise TransferError(f"notification to {peer.name} (Mooncake) not delivered: {e}") from None
        return True

    def wrap_metadata(self, meta: MetadataBackend) -> MetadataBackend:
        """Mooncake's keys and handshake beside ``meta``: Mooncake engines find us, and we them."""
        return MooncakeMetadata(meta, self._metadata_timeout, self.server.descriptor,
                                lambda: MP.rpc_meta(*self._rpc))

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        return "mooncake_tcp" in peer.endpoints and "tcp" not in peer.endpoints and local.is_host \
            and remote.is_host

    def why_not(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> str:
        protocol = peer.endpoints.get("mooncake")
        if protocol is not None and protocol != "tcp":
            return f"the Mooncake peer publishes protocol {protocol!r}; moonlet speaks Mooncake's 'tcp' only"
        if "mooncake_tcp" in peer.endpoints and not local.is_host:
            return "Mooncake's TCP protocol carries host memory; copy GPU memory through a registered host buffer"
        return ""

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        endpoint = segment.descriptor.endpoints["mooncake_tcp"]
        batch.add_parts([(index, 1) for index, *_ in items], self.name)
        try:
            with self._lock:
                peer = self._peers.get(endpoint)
                if peer is None:
                    peer = self._peers[endpoint] = _Peer(segment.name, endpoint, self._connect_timeout)
        except ProtocolError as e:  # a poisoned descriptor
            for index, *_ in items:
                batch.part_done(index, State.FAILED, f"{segment.name}: {e}")
            return
        for index, req, local, _ in items:
            peer.jobs.put((batch, index, MP.WRITE if req.op is Op.WRITE else MP.READ,
                           local.view(req.local_addr, req.length), req.remote_addr))
        with peer.lock:
            start = min(self._lanes, len(items)) - peer.lanes
            peer.lanes += max(0, start)
        for _ in range(start):
            threading.Thread(target=_Lane(peer).run, name="moonlet-mooncake-lane", daemon=True).start()

    def close(self) -> None:
        self.server.close()
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            for _ in range(self._lanes):
                peer.jobs.put(None)


def _start(ctx: HostContext) -> MooncakeTcpTransport:
    """Serve Mooncake's data port, and its handshake on the listener's port (handed over by the TCP server)."""
    if ctx.security.secret is not None:
        raise ConfigError("mooncake_wire cannot be combined with a cluster secret ($MOONLET_SECRET is set): "
                          "Mooncake peers cannot authenticate")
    tcp = ctx.started["tcp"]
    assert isinstance(tcp, TcpTransport)
    host, port = split_endpoint(tcp.endpoint())
    mc = MooncakeTcpTransport(ctx, ctx.config.listen_host, host, ctx.descriptor, ctx.on_note, (host, port))
    tcp.server.add_foreign(mc.server)
    return mc


SPEC = TransportSpec("mooncake_tcp", _start, policy=lambda cfg: "required", extra=lambda cfg: cfg.mooncake_wire)
