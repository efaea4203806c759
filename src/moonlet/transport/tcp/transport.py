"""TCP transport: any host, host memory on both ends (GPU memory is staged by later layers).

Small requests of one submit bound for one peer are coalesced into frames of
up to ``config.frame_entries`` entries / ``config.frame_bytes`` bytes; large
requests are cut into ``config.slice_size`` slices so several lanes carry
them in parallel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from ... import gpu
from ...batch import Batch, State
from ...errors import MoonletError, TransferError
from ...gpu import GpuError, StagingPool
from ...memory import Buffer
from ...segment import RemoteBuffer, Segment, SegmentDescriptor
from ..base import HostContext, Transport, WorkItem
from ..spec import TransportSpec
from . import frames
from . import protocol as P
from .client import GRACE, Peer, Progress
from .dial import dial, read_control
from .frames import OutFrame
from .server import TcpServer

_WATCHDOG_PERIOD = 0.05
_STAGE_BYTES = 256 << 20  # pinned staging for local GPU memory sent or received over TCP


class TcpTransport(Transport):
    """Listener for peers' requests plus pooled, pipelined connections to peers."""

    name = "tcp"

    def __init__(self, ctx: HostContext) -> None:
        """Listen (``config.listen_host``, ``config.port``), serving ``ctx.describe()`` to peers that ask
        and queueing their notes with ``ctx.on_note``."""
        cfg = ctx.config
        self._cfg = cfg
        self._on_stale = ctx.on_stale
        self._on_note = ctx.on_note
        self._hello: dict[str, Any] = {}  # what our HELLO offers besides our name (greet_with)
        #: called when a peer refused to copy our memory directly (the same-host transport listens)
        self.on_attach_refused: Callable[[Peer, int], None] = lambda peer, count: None
        self.security = ctx.security
        #: counters: frames retried on another connection, connections opened
        self.counters = {"retries": 0, "connects": 0}
        self.server = TcpServer(ctx.registry, ctx.describe, ctx.identity, cfg.listen_host, cfg.port,
                                cfg.socket_buffer, cfg.spin_us, ctx.security, cfg.max_connections,
                                cfg.connect_timeout, request_timeout=cfg.request_timeout,
                                idle_timeout=cfg.idle_timeout, max_unauthenticated=cfg.max_unauthenticated,
                                reactors=cfg.reactor_threads)
        self.server.add_service("notify", self._on_notify)
        host = cfg.advertise_host or self.server.address[0]
        if host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
        self._endpoint = f"[{host}]:{self.server.address[1]}" if ":" in host else f"{host}:{self.server.address[1]}"
        self._peers: dict[tuple[str, str], Peer] = {}
        self._stage_pool: StagingPool | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="moonlet-tcp-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def config(self):
        return self._cfg

    def endpoint(self) -> str:
        return self._endpoint

    def published(self) -> dict[str, str]:
        # With CUDA here we stage GPU memory through pinned host memory: peers may name our GPU buffers.
        return {"tcp": self._endpoint, **({"tcp_gpu": self._endpoint} if gpu.available() else {})}

    def greet_with(self, fields: dict[str, Any]) -> None:
        """Offer ``fields`` in the HELLO of every connection opened from now on (the same-host transport:
        our pid, host and PID namespace, so a target on this host may copy straight between our memories)."""
        self._hello.update(fields)

    def stats(self) -> dict[str, int]:
        return {"tcp_connects": self.counters["connects"], "tcp_retries": self.counters["retries"]}

    def failure(self) -> str | None:
        return self.server.failure

    def connections(self) -> int:
        return self.server.connections + sum(peer.progress.lanes() for peer in self._all_peers())

    def notify(self, peer: SegmentDescriptor, name: str, message: str, timeout: float) -> bool:
        """A CONNECT to the peer's ``notify`` service on a connection of its own."""
        endpoint = peer.endpoints.get("tcp")
        if endpoint is None:
            return False
        try:
            with dial(endpoint, timeout, self.security) as sock:
                sock.sendall(P.encode_connect({"service": "notify", "name": name, "msg": message}))
                read_control(sock, P.CONNECT, "notification")
        except (OSError, MoonletError) as e:
            raise TransferError(f"notification to {peer.name} not delivered: {e}") from None
        return True

    def _on_notify(self, body: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
        self._on_note(body.get("name"), body.get("msg"))
        return {}, _nothing

    def reaches(self, local: Buffer, peer: SegmentDescriptor, remote: RemoteBuffer) -> bool:
        # GPU memory is staged through pinned host memory: locally if we have CUDA, remotely if the peer does.
        return ("tcp" in peer.endpoints and (local.is_host or gpu.available())
                and (remote.is_host or "tcp_gpu" in peer.endpoints))

    def peer(self, segment: Segment) -> Peer:
        """The connection pool to ``segment`` (shared with the same-host transport)."""
        d = segment.descriptor
        key = (segment.name, d.endpoints["tcp"])
        peer = self._peers.get(key)  # the usual case, without the lock: a live pool for this instance
        if peer is not None and not peer.closed and peer.instance == d.instance:
            return peer
        with self._lock:
            peer = self._peers.get(key)
            if peer is None or peer.closed:
                # Each peer has its own driver role: threads waiting on different peers read replies at once.
                progress = Progress(self._cfg.spin_us)
                peer = self._peers[key] = Peer(segment.name, d.endpoints["tcp"], d.instance, self._cfg.lanes,
                                               self._cfg.connect_timeout, self._cfg.request_timeout,
                                               self._cfg.socket_buffer, progress, self._on_stale,
                                               self._hello, lambda p, n: self.on_attach_refused(p, n), self.security,
                                               self.counters)
                progress.on_tick = partial(peer.expire, None)
            elif peer.instance != d.instance:
                peer.instance = d.instance
        return peer

    def submit(self, segment: Segment, batch: Batch, items: list[WorkItem]) -> None:
        peer = self.peer(segment)
        cfg = self._cfg
        slice_size, max_bytes, max_entries = cfg.slice_size, cfg.frame_bytes, cfg.frame_entries
        # Announce every slice before the first frame leaves, so no reply can finish a request early.
        batch.add_parts([(index, -(-req.length // slice_size)) for index, req, *_ in items], self.name)
        lag: list = []  # a staged WRITE frame whose GPU copy is in flight
        for frame, staged in frames.requests(items, batch, slice_size, max_bytes, max_entries):
            self._send(peer, frame, staged, lag)
        self._flush_lag(peer, lag)

    def _send(self, peer: Peer, frame: OutFrame, staged: list[tuple[int, int, int]], lag: list) -> None:
        """Send ``frame``; GPU ranges travel through a pinned stage.

        A WRITE's stage is filled by an asynchronous GPU copy, and the frame is
        sent only when the next frame's copy has been started: the PCIe copy of
        frame k+1 overlaps the socket send of frame k (``lag`` holds the frame
        waiting its turn; :meth:`_flush_lag` sends the last one).
        """
        if not staged:
            peer.send(frame)
            return
        if self._stage_pool is None:
            self._stage_pool = StagingPool(_STAGE_BYTES)
        stage = self._stage_pool.take(staged)
        stage_views = stage.views()
        frame.stage = stage
        frame.staged_at = [k for k, v in enumerate(frame.views) if type(v) is int]
        frame.views = [stage_views[v] if type(v) is int else v for v in frame.views]
        if frame.kind != P.WRITE:
            peer.send(frame)
            return
        try:
            events = stage.start_to_host()
        except GpuError as e:
            self._fail_staged(frame, e)
            return
        self._flush_lag(peer, lag)
        lag.append((frame, events))

    def _flush_lag(self, peer: Peer, lag: list) -> None:
        while lag:
            frame, events = lag.pop(0)
            try:
                for event in events:
                    gpu.event_done(event, True)
            except GpuError as e:
                self._fail_staged(frame, e)
                continue
            peer.send(frame)

    @staticmethod
    def _fail_staged(frame: OutFrame, error: Exception) -> None:
        if frame.stage is not None:
            frame.stage.release()
            frame.stage = None
        for index in frame.refs:
            frame.batch.part_done(index, State.FAILED, f"copying GPU memory to the host failed: {error}")

    def submit_many(self, segment: Segment, batch: Batch, op: int, local_addrs: list[int],
                    remote_addrs: list[int], lengths: list[int], local: Buffer, remote: RemoteBuffer) -> None:
        cfg = self._cfg
        count = len(lengths)
        if count == 1:  # a lone request, the latency-bound case: no per-entry passes
            total = biggest = lengths[0]
        else:
            total, biggest = sum(lengths), max(lengths)
        if biggest > cfg.slice_size or not local.is_host:  # slicing and GPU staging: the general path
            super().submit_many(segment, batch, op, local_addrs, remote_addrs, lengths, local, remote)
            return
        peer = self.peer(segment)
        kind = P.WRITE if op else P.READ
        batch.add_parts_all(self.name)
        for frame in frames.arrays(kind, local_addrs, remote_addrs, lengths, local.view, batch, total,
                                   cfg.frame_bytes, cfg.frame_entries):
            peer.send(frame)

    def drive(self, batch: Batch, block: bool) -> None:
        """Read replies for ``batch`` in this thread: from each peer carrying part of it, in turn, each until
        it owes the batch nothing (the usual batch has one peer: until the batch is done)."""
        end = batch.deadline + GRACE
        while not batch.done and not self._closed.is_set():
            peers = [peer for peer in self._all_peers() if peer.carries(batch)]
            for peer in peers:
                peer.progress.wait(batch, block, until_clear=peer)
            if not block or batch.done or time.monotonic() >= end:
                return
            if not peers:  # its frames are between lanes (a retry), or it ends in another transport
                time.sleep(0.001)

    def _all_peers(self) -> list[Peer]:
        return list(self._peers.values())

    def expire(self, batch: Batch) -> None:
        for peer in self._all_peers():
            peer.expire(batch, time.monotonic())

    def _watch(self) -> None:
        """Enforce deadlines where no waiting thread is driving (e.g. nobody waits at all)."""
        while not self._closed.wait(_WATCHDOG_PERIOD):
            for peer in self._all_peers():
                peer.progress.try_tick()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for peer in peers:
            peer.close()
        self._watchdog.join(timeout=2)
        for peer in peers:
            peer.progress.close()
        self.server.close()
        if self._stage_pool is not None:
            self._stage_pool.close()


def _nothing() -> None:
    """The cleanup of a notify connection: nothing to undo."""


SPEC = TransportSpec("tcp", TcpTransport, listener=True)

__all__ = ["SPEC", "TcpTransport"]
