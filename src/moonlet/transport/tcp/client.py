"""Initiator side of the TCP transport: peers, lanes and in-flight frames.

Each peer gets ``config.lanes`` persistent connections ("lanes").  A lane
has a sender thread, which connects, then sends queued frames back to back
(several per ``sendmsg`` when they pile up), and a receiver thread, which
matches responses to frames and lands READ data straight in registered
memory.  Frames are pipelined: a lane never waits for one response before
sending the next frame.

Whoever pops a frame from ``Lane.inflight`` (the receiver on a response,
``abort`` on failure) owns it and ends it exactly once.  Since only the
receiver writes into local memory, and it pops the frame first, a frame
reported FAILED or TIMEOUT can never be written to afterwards.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from collections import deque

from ...batch import Batch, State
from ...errors import ProtocolError, SegmentError
from ...memory import Denied
from . import protocol as P
from .server import tune_socket
from .sockio import recv_exact, recv_views, send_all

log = logging.getLogger("moonlet.tcp")

MAX_ATTEMPTS = 2
_req_ids = itertools.count(1)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to ``(host, port)`` with a clear error."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SegmentError(f"endpoint {endpoint!r} is not of the form host:port")
    return host.strip("[]"), int(port)


def _read_control(sock: socket.socket, expect: int, what: str) -> bytes:
    pre = bytearray(P.PREFIX_SIZE)
    recv_exact(sock, memoryview(pre))
    p = P.parse_prefix(pre)
    body = bytearray(p.payload_len)
    if p.payload_len:
        recv_exact(sock, memoryview(body))
    if p.kind == P.ERROR:
        raise ProtocolError(f"peer refused {what}: {body.decode(errors='replace')}")
    if p.kind != expect:
        raise ProtocolError(f"expected {P.KINDS[expect]} in reply to {what}, got {P.KINDS[p.kind]}")
    return bytes(body)


def fetch_descriptor(endpoint: str, timeout: float) -> bytes:
    """Ask the engine at ``endpoint`` for its segment descriptor (peer-to-peer metadata)."""
    host, port = split_endpoint(endpoint)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(P.encode_control(P.GET_DESC))
        return _read_control(sock, P.DESC, "GET_DESC")


class OutFrame:
    """One WRITE or READ frame: several requests (or slices) bound for one peer."""

    __slots__ = ("kind", "req_id", "entries", "views", "refs", "batch", "nbytes", "attempts")

    def __init__(self, kind: int, entries: list, views: list, refs: list, batch: Batch, nbytes: int) -> None:
        self.kind = kind
        self.req_id = next(_req_ids)
        self.entries = entries
        self.views = views
        self.refs = refs
        self.batch = batch
        self.nbytes = nbytes
        self.attempts = 1


class Lane:
    """One persistent connection to a peer, with its sender and receiver threads."""

    def __init__(self, peer: "Peer") -> None:
        self.peer = peer
        self.inflight: dict[int, OutFrame] = {}
        self.load = 0
        self.aborted = False
        self.reason = ""
        self.sock: socket.socket | None = None
        self._queue: deque[OutFrame] = deque()
        self._cv = threading.Condition()
        threading.Thread(target=self._send_loop, name="moonlet-tcp-send", daemon=True).start()

    def enqueue(self, frame: OutFrame) -> bool:
        """Queue ``frame``; False if the lane is already dead."""
        with self._cv:
            if self.aborted:
                return False
            self.inflight[frame.req_id] = frame
            self.load += frame.nbytes
            self._queue.append(frame)
            self._cv.notify()
        return True

    def abort(self, reason: str) -> None:
        """Kill the connection and end every frame on it (retried elsewhere when allowed)."""
        with self._cv:
            first = not self.aborted
            self.aborted = True
            if first:
                self.reason = reason
            self._queue.clear()
            self._cv.notify_all()
        if first and self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while True:
            try:
                _, frame = self.inflight.popitem()
            except KeyError:
                break
            self.peer.fail_frame(frame, reason)

    def _connect(self) -> socket.socket:
        peer = self.peer
        host, port = split_endpoint(peer.endpoint)
        try:
            sock = socket.create_connection((host, port), timeout=peer.connect_timeout)
        except OSError as e:
            peer.on_connect_failure()
            raise ConnectionError(f"cannot connect to {peer.name} at {peer.endpoint}: {e}") from None
        try:
            tune_socket(sock, peer.socket_buffer)
            sock.sendall(P.encode_hello(peer.name))
            ident = json.loads(_read_control(sock, P.HELLO, "HELLO"))
            if ident.get("instance") != peer.instance:
                peer.on_connect_failure()
                raise SegmentError(
                    f"peer {peer.name} at {peer.endpoint} restarted (instance {ident.get('instance')}, "
                    f"expected {peer.instance}); its segment will be re-resolved"
                )
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _send_loop(self) -> None:
        try:
            self.sock = self._connect()
            with self._cv:
                if self.aborted:  # aborted while connecting
                    self.sock.close()
                    return
            threading.Thread(target=self._recv_loop, name="moonlet-tcp-recv", daemon=True).start()
            while True:
                with self._cv:
                    while not self._queue and not self.aborted:
                        self._cv.wait()
                    if self.aborted:
                        return
                    frames = list(self._queue)
                    self._queue.clear()
                bufs: list = []
                for f in frames:
                    if f.req_id in self.inflight:
                        bufs.append(P.encode_request(f.kind, f.req_id, f.entries))
                        if f.kind == P.WRITE:
                            bufs.extend(f.views)
                if bufs:
                    send_all(self.sock, bufs)
        except Exception as e:
            self.abort(f"sending to {self.peer.name} failed: {e}")

    def _recv_loop(self) -> None:
        sock = self.sock
        assert sock is not None
        pre = bytearray(P.PREFIX_SIZE)
        pview = memoryview(pre)
        frame = None
        try:
            while True:
                recv_exact(sock, pview)
                p = P.parse_prefix(pre)
                if p.kind == P.ERROR:
                    body = bytearray(p.payload_len)
                    recv_exact(sock, memoryview(body))
                    raise ProtocolError(f"peer reported a protocol error: {body.decode(errors='replace')}")
                if p.kind != P.RESP:
                    raise ProtocolError(f"expected RESP from peer, got {P.KINDS[p.kind]}")
                table = bytearray(p.count)
                recv_exact(sock, memoryview(table))
                statuses = P.parse_statuses(p, table)
                frame = self.inflight.pop(p.req_id, None)
                if frame is None:
                    raise ProtocolError(f"RESP for unknown request id {p.req_id}")
                if len(statuses) != len(frame.refs):
                    raise ProtocolError(f"RESP has {len(statuses)} statuses for {len(frame.refs)} entries")
                if frame.kind == P.READ:
                    views = [v for v, s in zip(frame.views, statuses) if not s]
                    if sum(v.nbytes for v in views) != p.payload_len:
                        raise ProtocolError("READ reply carries a payload of the wrong size")
                    if views:
                        recv_views(sock, views)
                elif p.payload_len:
                    raise ProtocolError("WRITE reply carries a payload")
                with self._cv:
                    self.load -= frame.nbytes
                done, frame = frame, None
                self.peer.complete(done, statuses)
        except Exception as e:
            if isinstance(e, (ConnectionError, OSError)) and not isinstance(e, ProtocolError):
                reason = self.reason or f"connection to {self.peer.name} lost: {e}"
            else:
                reason = f"{self.peer.name}: {e}"
            if frame is not None:
                self.peer.fail_frame(frame, reason)
            self.abort(reason)
        finally:
            sock.close()


class Peer:
    """All lanes to one remote engine endpoint."""

    def __init__(self, name: str, endpoint: str, instance: str, lanes: int, connect_timeout: float,
                 socket_buffer: int | None, on_stale) -> None:
        self.name = name
        self.endpoint = endpoint
        self.instance = instance
        self.connect_timeout = connect_timeout
        self.socket_buffer = socket_buffer
        self._on_stale = on_stale
        self._lanes: list[Lane | None] = [None] * lanes
        self._lock = threading.Lock()
        self.closed = False

    def on_connect_failure(self) -> None:
        """The endpoint refused us or changed hands: have the segment re-resolved."""
        self._on_stale(self.name)

    def send(self, frame: OutFrame) -> None:
        """Queue ``frame`` on the least loaded live lane (opening lanes as needed)."""
        while True:
            with self._lock:
                if self.closed:
                    break
                best = None
                for i, lane in enumerate(self._lanes):
                    if lane is None or lane.aborted:
                        lane = self._lanes[i] = Lane(self)
                    if best is None or lane.load < best.load:
                        best = lane
            if best.enqueue(frame):
                return
        self._end(frame, State.FAILED, f"connection to {self.name} closed by the local engine")

    def complete(self, frame: OutFrame, statuses: bytes) -> None:
        """A response arrived: end each entry as its status says."""
        batch = frame.batch
        if not any(statuses):
            batch.parts_completed(frame.refs)
            return
        for idx, st, (addr, length) in zip(frame.refs, statuses, frame.entries):
            if st:
                batch.part_done(idx, State.FAILED,
                                f"{self.name} refused [{addr:#x}, +{length}): {Denied.REASONS[st]}")
            else:
                batch.part_done(idx)

    def fail_frame(self, frame: OutFrame, reason: str) -> None:
        """A frame's lane died: retry it once on another lane unless its deadline passed."""
        if time.monotonic() >= frame.batch.deadline:
            self._end(frame, State.TIMEOUT, f"deadline passed before {self.name} answered ({reason})")
        elif frame.attempts < MAX_ATTEMPTS and not self.closed:
            frame.attempts += 1
            log.info("retrying frame %d to %s after: %s", frame.req_id, self.name, reason)
            self.send(frame)
        else:
            self._end(frame, State.FAILED, reason)

    @staticmethod
    def _end(frame: OutFrame, state: State, reason: str) -> None:
        for idx in frame.refs:
            frame.batch.part_done(idx, state, reason)

    def lanes(self) -> list[Lane]:
        return [lane for lane in self._lanes if lane is not None]

    def expire(self, batch: Batch | None, now: float) -> None:
        """Abort lanes carrying frames of ``batch`` (or, with None, of any batch past its deadline)."""
        for lane in self.lanes():
            for f in list(lane.inflight.values()):
                if f.batch is batch or (batch is None and now >= f.batch.deadline):
                    lane.abort(f"deadline passed with bytes in flight to {self.name}")
                    break

    def close(self) -> None:
        with self._lock:
            self.closed = True
        for lane in self.lanes():
            lane.abort(f"engine closed while talking to {self.name}")
