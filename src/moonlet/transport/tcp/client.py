"""Initiator side of the TCP transport: peers, lanes, and caller-driven progress.

Each peer gets ``config.lanes`` persistent connections ("lanes").  Frames are
sent inline by the submitting thread (one ``sendmsg`` of header + registered
memory views) and pipelined: a lane never waits for one reply before the next
frame goes out.  Replies are read by whichever thread is waiting for a batch:
it takes the driver role in :class:`Progress`, polls every lane without
sleeping for ``spin_us`` and then blocks, and completes every frame that
arrives, its own and other threads'.  No thread hand-off sits on the path of
a request; on virtual machines each hand-off costs tens of microseconds.

Whoever pops a frame from ``Lane.inflight`` (the driver on a reply,
``abort`` on failure) owns it and ends it exactly once.  Only the driver
writes into local memory, and it pops the frame first, so a frame reported
FAILED or TIMEOUT is never written to afterwards.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable, Iterator, Sequence

from ...batch import Batch, State
from ...errors import ProtocolError, SegmentError
from ...gpu import GpuError
from ...memory import Denied
from . import protocol as P
from .dial import PLAIN, Security, dial, read_control
from .server import tune_socket
from .sockio import recv_exact, recv_some, recv_some_into, send_all, wake_later

log = logging.getLogger("moonlet.tcp")

MAX_ATTEMPTS = 2
_req_ids = itertools.count(1)
_CHECK_PERIOD = 0.02
_HEAD = P.PREFIX_SIZE + P.MIN_INITIATOR_TAIL  # read with the prefix: the first status byte
_GRACE = 1.0  # a driver gives up this long after a batch's deadline; Batch.wait takes over


def fetch_descriptor(endpoint: str, timeout: float, security: Security = PLAIN) -> bytes:
    """Ask the engine at ``endpoint`` for its segment descriptor (peer-to-peer metadata)."""
    with dial(endpoint, timeout, security) as sock:
        sock.sendall(P.encode_get_desc())
        return read_control(sock, P.DESC, "GET_DESC")


class OutFrame:
    """One WRITE or READ frame: several requests (or slices) bound for one peer."""

    __slots__ = ("kind", "req_id", "table", "views", "refs", "spans", "batch", "nbytes", "attempts", "stage",
                 "staged_at")

    def __init__(self, kind: int, table: list[int], views: list, refs: Sequence[int], batch: Batch,
                 nbytes: int, spans: list[int] | None = None) -> None:
        """``refs``: the batch indices of the requests carried, in entry order. ``spans``: how many of
        them each entry carries, when entries merge adjacent requests (None: one each)."""
        self.kind = kind
        self.req_id = next(_req_ids)
        self.table = table  # flat [remote addr, length, ...], one pair per entry
        self.views = views
        self.refs = refs
        self.spans = spans
        self.batch = batch
        self.nbytes = nbytes
        self.attempts = 1
        self.stage = None  # a gpu.Stage when some local ranges are GPU memory
        self.staged_at: list[int] = []  # which entries the stage carries


def frame_bounds(lengths: list[int], max_bytes: int, max_entries: int) -> Iterator[tuple[int, int, int]]:
    """Cut requests of ``lengths`` into frames of at most ``max_entries`` requests, each closed once it
    reaches ``max_bytes``: ``(start, end, nbytes)`` per frame, requests ``start:end``."""
    start = nbytes = 0
    count = len(lengths)
    for i, n in enumerate(lengths):
        nbytes += n
        if nbytes >= max_bytes or i + 1 - start >= max_entries or i + 1 == count:
            yield start, i + 1, nbytes
            start, nbytes = i + 1, 0


class Lane:
    """One persistent connection to a peer."""

    def __init__(self, peer: "Peer", sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self.fd = sock.fileno()
        self.inflight: dict[int, OutFrame] = {}
        self.load = 0
        self.aborted = False
        self.reason = ""
        self.send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # Reply parsing state: touched only by the thread holding the driver role.
        self._pre = bytearray(_HEAD)
        self._pview = memoryview(self._pre)
        self._got = 0
        self._phase = 0  # 0 prefix, 1 status table, 2 READ payload
        self._prefix: P.Prefix | None = None
        self._table = bytearray()
        self._cur: OutFrame | None = None
        self._statuses = b""
        self._views: list[memoryview] = []
        self._lowat = 0  # SO_RCVLOWAT in force while a large READ payload arrives

    def send(self, frame: OutFrame) -> bool:
        """Send ``frame`` now (blocking until the kernel took it); False if the lane is dead."""
        # Head and payload in one call, as the target does with READ replies. (Sending a large payload in
        # a second call, so that the receiver parses the head while the sender's kernel copies, measured
        # slower once both sides' Python got lean: 64 KiB x 1 p50 WRITE 31.2-32.4 vs 30.1-30.8 us, READ
        # 34.0-34.4 vs 29.7-30.6 us.)
        if frame.kind == P.WRITE:
            bufs = [P.encode_request_flat(P.WRITE, frame.req_id, frame.table, frame.nbytes), *frame.views]
            total = len(bufs[0]) + frame.nbytes
        else:
            bufs = [P.encode_request_flat(frame.kind, frame.req_id, frame.table, 0)]
            total = len(bufs[0])
        with self.send_lock:
            if self.aborted:
                return False
            self.inflight[frame.req_id] = frame
            self.load += frame.nbytes
            try:
                send_all(self.sock, bufs, total)
            except OSError as e:
                err = e
            else:
                return True
        self.abort(f"sending to {self.peer.name} failed: {err}")
        return True  # the frame was in flight: abort() ended or retried it

    def abort(self, reason: str) -> None:
        """Kill the connection and end every frame on it (retried elsewhere when allowed)."""
        with self._state_lock:
            if not self.aborted:
                self.aborted = True
                self.reason = reason
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.peer.progress.changed()
        while True:
            try:
                _, frame = self.inflight.popitem()
            except KeyError:
                break
            self.peer.fail_frame(frame, reason)

    def overdue(self, now: float) -> bool:
        return any(now >= f.batch.deadline for f in list(self.inflight.values()))

    def carries(self, batch: Batch) -> bool:
        return any(f.batch is batch for f in list(self.inflight.values())) or (
            self._cur is not None and self._cur.batch is batch)

    # -- reply parsing (driver only) -------------------------------------------------

    def on_readable(self) -> None:
        """Consume every reply byte available now; complete frames whose reply is whole."""
        try:
            self._read()
        except Exception as e:  # noqa: BLE001 - any failure ends this lane, never the driver
            if isinstance(e, (ConnectionError, OSError)):
                reason = self.reason or f"connection to {self.peer.name} lost: {e}"
            else:
                reason = f"{self.peer.name}: {e}"
            cur, self._cur = self._cur, None
            if cur is not None:
                self.peer.fail_frame(cur, reason)
            self.abort(reason)

    def _read(self) -> None:
        sock = self.sock
        while True:
            if self._phase == 2:
                if not recv_some(sock, self._views):
                    return
                if self._views or self._lowat:
                    self._lowat = wake_later(sock, self._views, self._lowat)
                if self._views:
                    continue
                self._finish()
                if not self.inflight:  # no reply is due: skip the read that would find nothing
                    return
                continue
            if self._phase == 0:
                view, need = self._pview, _HEAD
            else:
                view, need = memoryview(self._table), len(self._table)
            n = recv_some_into(sock, view, self._got, need)
            if not n:
                return
            self._got += n
            if self._got < need:
                continue
            self._got = 0
            if self._phase == 1:  # the status table of a many-entry reply is in
                p = self._prefix
                assert p is not None
                statuses = P.parse_statuses(p, self._table)
                req_id, payload = p.req_id, p.payload_len
            elif (one := P.parse_single_reply(self._pre)) is not None:  # a lone request's reply, whole
                req_id, status, payload = one
                statuses = P.STATUS_BYTES[status]
            else:
                p = self._prefix = P.parse_prefix(self._pre)
                if p.kind == P.ERROR:
                    body = bytearray(p.payload_len - 1)
                    recv_exact(sock, memoryview(body))
                    text = (self._pre[P.PREFIX_SIZE:] + body).decode(errors="replace")
                    raise ProtocolError(f"peer reported a protocol error: {text}")
                if p.kind != P.RESP:
                    raise ProtocolError(f"expected RESP from peer, got {P.KINDS[p.kind]}")
                if p.count > 1:
                    self._table = bytearray(p.count)
                    self._table[0] = self._pre[P.PREFIX_SIZE]
                    self._got, self._phase = 1, 1
                    continue
                statuses = P.parse_statuses(p, self._pview[P.PREFIX_SIZE:])
                req_id, payload = p.req_id, p.payload_len
            frame = self.inflight.pop(req_id, None)
            if frame is None:
                raise ProtocolError(f"RESP for unknown request id {req_id}")
            self._cur, self._statuses = frame, statuses
            entries = len(frame.refs) if frame.spans is None else len(frame.spans)
            if len(statuses) != entries:
                raise ProtocolError(f"RESP has {len(statuses)} statuses for {entries} entries")
            if frame.kind == P.READ:
                if any(statuses):  # only the entries served carry bytes
                    views = [v for v, s in zip(frame.views, statuses) if not s]
                    size = sum(v.nbytes for v in views)
                else:  # a copy: receiving consumes the list, and a retry needs the frame's own
                    views, size = list(frame.views), frame.nbytes
                if size != payload:
                    raise ProtocolError("READ reply carries a payload of the wrong size")
                if views:
                    self._views, self._phase = views, 2
                    continue
            elif payload:
                raise ProtocolError("WRITE reply carries a payload")
            self._finish()
            if not self.inflight:
                return

    def _finish(self) -> None:
        frame, self._cur = self._cur, None
        self._phase = 0
        assert frame is not None
        self.load -= frame.nbytes
        if frame.stage is None and not any(self._statuses):  # the usual case: all served, nothing staged
            frame.batch.parts_completed(frame.refs)
        else:
            self.peer.complete(frame, self._statuses)


class Progress:
    """The driver role: one waiting thread at a time reads replies for all lanes of a transport."""

    def __init__(self, spin_us: int) -> None:
        self._spin = spin_us / 1e6
        self._role = threading.Lock()  # held by the thread driving replies
        self._cv = threading.Condition()  # guards the lane set; waiters who do not drive sleep on it
        self._sleepers = 0
        self._lanes: set[Lane] = set()
        self._version = 0
        self._poll_version = -1
        self._poll_cache: tuple[select.poll, dict[int, Lane]] = (select.poll(), {})
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self.on_tick: Callable[[float], None] = lambda now: None

    def add(self, lane: Lane) -> None:
        with self._cv:
            self._lanes.add(lane)
        self.changed()

    def changed(self) -> None:
        """The lane set changed: make the driver rebuild its poll set now."""
        self._version += 1
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def wait(self, batch: Batch, block: bool = True) -> None:
        """Drive replies until ``batch`` is done or past its deadline (once, without blocking, if not ``block``)."""
        end = batch.deadline + _GRACE
        while not batch.done:
            if self._role.acquire(False):  # nobody drives: this thread does
                try:
                    self._drive(batch, block)
                finally:
                    self._hand_over()
            elif not block:
                return
            else:  # another thread drives (and completes our frames too): sleep until it leaves or we are done
                with self._cv:
                    self._sleepers += 1
                    try:
                        if self._role.locked() and not batch.done:
                            self._cv.wait(0.05)
                    finally:
                        self._sleepers -= 1
            if not block or time.monotonic() >= end:
                return

    def _hand_over(self) -> None:
        """Give up the driver role; wake a sleeping waiter to take it (released first, so none is missed)."""
        self._role.release()
        if self._sleepers:
            with self._cv:
                self._cv.notify()

    def try_tick(self) -> None:
        """Run deadline checks if no thread is driving (the watchdog's entry point)."""
        if not self._role.acquire(False):
            return
        try:
            self._reap()
            self.on_tick(time.monotonic())
        finally:
            self._hand_over()

    def _reap(self) -> dict[int, Lane]:
        """Drop aborted lanes (closing their sockets) and return the live ones by fd."""
        with self._cv:
            dead = [lane for lane in self._lanes if lane.aborted]
            for lane in dead:
                self._lanes.discard(lane)
            live = {lane.fd: lane for lane in self._lanes}
        for lane in dead:
            lane.sock.close()
        return live

    def _rebuild_poll_set(self) -> None:
        """The poll set over live lanes (and the wake-up pipe), for the lane set of version ``_version``."""
        version = self._version
        lanes = self._reap()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in lanes:
            poller.register(fd, select.POLLIN)
        self._poll_cache = (poller, lanes)
        self._poll_version = version

    def _drive(self, batch: Batch, block: bool) -> None:
        last = time.monotonic()
        next_check = last + _CHECK_PERIOD
        while not batch.done:
            if self._version != self._poll_version:  # lanes came or went
                self._rebuild_poll_set()
            poller, lanes = self._poll_cache
            events = poller.poll(0)
            now = time.monotonic()
            if not events:
                if not block or now >= batch.deadline + _GRACE:
                    self.on_tick(now)
                    return
                if now >= next_check:
                    next_check = now + _CHECK_PERIOD
                    self.on_tick(now)
                    continue
                if now - last < self._spin:
                    continue
                events = poller.poll(max(1, min(50, int((batch.deadline - now) * 1000) + 1)))
                if not events:
                    continue
                now = time.monotonic()
            last = now
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                lane = lanes.get(fd)
                if lane is not None and not lane.aborted:
                    lane.on_readable()
            if self._sleepers:  # their batches may be done now
                with self._cv:
                    self._cv.notify_all()

    def close(self) -> None:
        for lane in list(self._lanes):
            lane.abort("engine closed")
        self._reap()
        os.close(self._wake_r)
        os.close(self._wake_w)


class Peer:
    """All lanes to one remote engine endpoint."""

    def __init__(self, name: str, endpoint: str, instance: str, lanes: int, connect_timeout: float,
                 send_timeout: float, socket_buffer: int | None, progress: Progress,
                 on_stale: Callable[[str], None], hello: dict, on_refused: Callable[["Peer"], None],
                 security: Security = PLAIN, stats: dict | None = None) -> None:
        self.name = name
        self.security = security
        self.stats = stats if stats is not None else {"retries": 0, "connects": 0}
        self.hello = hello  # our pid/host/pidns, offered so a same-host target may copy directly
        self.on_refused = on_refused
        self.endpoint = endpoint
        self.instance = instance
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.socket_buffer = socket_buffer
        self.progress = progress
        self._on_stale = on_stale
        self._lanes: list[Lane | None] = [None] * lanes
        self._lock = threading.Lock()
        self.closed = False

    def _connect(self) -> Lane:
        try:
            sock = dial(self.endpoint, self.connect_timeout, self.security)
        except OSError as e:
            self._on_stale(self.name)
            raise ConnectionError(f"cannot connect to {self.name} at {self.endpoint}: {e}") from None
        try:
            tune_socket(sock, self.socket_buffer)
            sock.sendall(P.encode_hello(self.name, **self.hello))
            ident = json.loads(read_control(sock, P.HELLO, "HELLO"))
            if ident.get("instance") != self.instance:
                self._on_stale(self.name)
                raise SegmentError(
                    f"peer {self.name} at {self.endpoint} restarted (instance {ident.get('instance')}, "
                    f"expected {self.instance}); its segment will be re-resolved"
                )
            sock.settimeout(None)
            sec = int(self.send_timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", sec, int((self.send_timeout - sec) * 1e6)))
        except BaseException:
            sock.close()
            raise
        lane = Lane(self, sock)
        self.stats["connects"] += 1
        self.progress.add(lane)
        return lane

    def _pick(self) -> Lane:
        """The least loaded live lane, opening missing lanes first."""
        best = None
        for lane in self._lanes:  # the usual case, without the lock: every lane is up
            if lane is None or lane.aborted:
                break
            if best is None or lane.load < best.load:
                best = lane
        else:
            if not self.closed:
                return best  # type: ignore[return-value]
        with self._lock:
            if self.closed:
                raise ConnectionError(f"connection to {self.name} closed by the local engine")
            best = None
            for i, lane in enumerate(self._lanes):
                if lane is None or lane.aborted:
                    lane = self._lanes[i] = self._connect()
                if best is None or lane.load < best.load:
                    best = lane
            assert best is not None
            return best

    def send(self, frame: OutFrame) -> None:
        """Send ``frame`` on the least loaded lane; end it FAILED if no lane can be had."""
        for _ in range(3):
            try:
                lane = self._pick()
            except (OSError, SegmentError, ProtocolError, ValueError) as e:
                self._end(frame, State.FAILED, str(e))
                return
            if lane.send(frame):
                return
        self._end(frame, State.FAILED, f"no usable connection to {self.name}")

    def complete(self, frame: OutFrame, statuses: bytes) -> None:
        """A reply arrived: end each entry as its status says."""
        batch = frame.batch
        if frame.stage is not None:
            stage, frame.stage = frame.stage, None
            try:
                if frame.kind == P.READ:  # the bytes are in host staging: move them to the GPU first
                    stage.to_gpu([not statuses[k] for k in frame.staged_at])
            except GpuError as e:
                self._end(frame, State.FAILED, f"copying received bytes to the GPU failed: {e}")
                return
            finally:
                stage.release()
        if not any(statuses):
            batch.parts_completed(frame.refs)
            return
        table = frame.table
        width = 2 if frame.kind in (P.WRITE, P.READ) else 3
        refused = []
        refs = iter(frame.refs)
        for k, st in enumerate(statuses):
            addr, length = table[width * k], table[width * k + 1]
            mine = [next(refs) for _ in range(1 if frame.spans is None else frame.spans[k])]  # entry k's requests
            if st == Denied.ATTACH_REFUSED:
                refused.append((k, mine))
                continue
            for idx in mine:
                if st:
                    batch.part_done(idx, State.FAILED,
                                    f"{self.name} refused [{addr:#x}, +{length}): {Denied.REASONS[st]}")
                else:
                    batch.part_done(idx)
        if refused:
            self._fall_back(frame, refused)

    def _fall_back(self, frame: OutFrame, entries: list[tuple[int, list[int]]]) -> None:
        """The target may not copy our memory directly: carry these entries of a PULL/PUSH frame (each with
        the batch indices of its requests) over TCP."""
        self.on_refused(self)
        table = frame.table
        flat: list[int] = []
        refs: list[int] = []
        for k, mine in entries:
            flat += (table[3 * k], table[3 * k + 1])
            refs += mine
        frame.batch.set_transport(refs, "tcp")
        self.send(OutFrame(P.WRITE if frame.kind == P.PULL else P.READ, flat, [frame.views[k] for k, _ in entries],
                           refs, frame.batch, sum(flat[1::2]),
                           None if frame.spans is None else [len(mine) for _, mine in entries]))

    def fail_frame(self, frame: OutFrame, reason: str) -> None:
        """A frame's lane died: retry it once on another lane unless its deadline passed."""
        if time.monotonic() >= frame.batch.deadline:
            self._end(frame, State.TIMEOUT, f"deadline passed before {self.name} answered ({reason})")
        elif frame.attempts < MAX_ATTEMPTS and not self.closed:
            frame.attempts += 1
            self.stats["retries"] += 1
            log.info("retrying frame %d to %s after: %s", frame.req_id, self.name, reason)
            self.send(frame)
        else:
            self._end(frame, State.FAILED, reason)

    @staticmethod
    def _end(frame: OutFrame, state: State, reason: str) -> None:
        if frame.stage is not None:
            frame.stage.release()
            frame.stage = None
        for idx in frame.refs:
            frame.batch.part_done(idx, state, reason)

    def lanes(self) -> list[Lane]:
        return [lane for lane in self._lanes if lane is not None]

    def expire(self, batch: Batch | None, now: float) -> None:
        """Abort lanes carrying frames of ``batch`` (or, with None, of any batch past its deadline)."""
        for lane in self.lanes():
            if not lane.aborted and (lane.carries(batch) if batch is not None else lane.overdue(now)):
                lane.abort(f"deadline passed with bytes in flight to {self.name}")

    def close(self) -> None:
        with self._lock:
            self.closed = True
        for lane in self.lanes():
            lane.abort(f"engine closed while talking to {self.name}")
