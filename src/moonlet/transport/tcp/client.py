"""Initiator side of the TCP transport: peers, lanes, and caller-driven progress.

Each peer gets ``config.lanes`` persistent connections ("lanes").  Frames are
sent inline by the submitting thread (one ``sendmsg`` of header + registered
memory views) and pipelined: a lane never waits for one reply before the next
frame goes out.  Replies are read by whichever thread is waiting for a batch:
it takes the driver role in that peer's :class:`Progress`, polls the peer's
lanes without sleeping for a while (``spin_us`` at most, see
:class:`~..spin.Spinner`) and then blocks, and completes every frame that
arrives, its own and other threads'.  No thread hand-off sits on the path of
a request; on virtual machines each hand-off costs tens of microseconds.
Each peer has its own driver role, so threads waiting on different peers
read their replies at once.

Whoever pops a frame from ``Lane.inflight`` (the driver on a reply,
``abort`` on failure) owns it and ends it exactly once, whatever goes wrong
meanwhile (a peer's malformed reply, a failed reconnect): a frame is never
dropped without ending its requests.  Only the driver writes into local
memory, and it pops the frame first, so a frame reported FAILED or TIMEOUT is
never written to afterwards; a READ payload still arriving for a batch that
has ended anyway (the engine closed) is drained into scratch memory instead.

Attach frames (PULL/PUSH, see ``transport/shm.py``) are copied by the target
itself, into or out of our memory, when it reads them: ending the frame here
cannot stop that.  While such a frame is unanswered on a live lane its batch
cannot end (only the frame ends its requests), and the batch pins the local
buffers.  A lane that dies with attach frames unanswered (deadline, error,
close) takes a pin of its own on their buffers (:class:`Pin`) before they
end, and keeps it until the target can no longer read them: it has closed
its end of that connection, having read all it ever will
(:meth:`Lane.settle`).  ``unregister`` waits for those pins, so no target
writes into memory that was handed back.  An answered frame costs nothing.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from ...batch import Batch, State
from ...errors import ProtocolError, SegmentError
from ...gpu import GpuError
from ...memory import Denied
from ...security import PLAIN, Security
from ..spin import Spinner
from . import frames
from . import protocol as P
from .dial import dial, read_control
from .frames import OutFrame, Pin
from .server import tune_socket
from .sockio import PayloadReceiver, allow_waits, recv_some_into, send_all

log = logging.getLogger("moonlet.tcp")

MAX_ATTEMPTS = 2
_CHECK_PERIOD = 0.02
GRACE = 1.0  # a driver gives up this long after a batch's deadline; Batch.wait takes over
_CLOSE_WAIT = 2.0  # Progress.close waits this long for the driver to leave before releasing its pipe
_SCRATCH = 1 << 20  # the most memory a lane drains an abandoned READ payload through
#: How long :meth:`Progress.close` waits for the targets of attach frames still unanswered on dead lanes to
#: close their end before it lets go of the frames' buffers anyway. A live target does so at once: it reads
#: what was sent (serving it) and then the end of the stream. One that is stopped or hung can still copy
#: into those buffers later; an engine that closes cannot wait for it forever.
_SETTLE_WAIT = 1.0
#: TCP states (linux/tcp_states.h) in which the other end of a connection has not closed: ESTABLISHED,
#: FIN_WAIT1, FIN_WAIT2. In any other state a target has read the last byte it will ever read from it.
_PEER_OPEN = (1, 4, 5)


def fetch_descriptor(endpoint: str, timeout: float, security: Security = PLAIN) -> bytes:
    """Ask the engine at ``endpoint`` for its segment descriptor (peer-to-peer metadata)."""
    with dial(endpoint, timeout, security) as sock:
        sock.sendall(P.encode_get_desc())
        return read_control(sock, P.DESC, "GET_DESC")


class Lane:
    """One persistent connection to a peer."""

    def __init__(self, peer: Peer, sock: socket.socket) -> None:
        """``sock``: connected and greeted; from now on blocking, with bounded waiting receives."""
        allow_waits(sock)
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
        self._reader = P.FrameReader(initiator=True)  # the replies (state machine, sans-IO)
        self._cur: OutFrame | None = None
        self._statuses = b""
        self._into: Batch | None = None  # the batch of the READ payload being received ...
        self._drained = False  # ... and whether the payload goes to scratch memory instead (see _drain)
        self._payload = PayloadReceiver()  # how READ payloads are received
        # Holds on the buffers of attach frames in flight when the lane died, given back by settle()
        # (under _state_lock, as is _settled: whether settle() has given them back).
        self._unsettled: list[Pin] = []
        self._settled = False

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
            except Exception as e:  # noqa: BLE001 - the frame is in flight: abort() below ends it
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
            if frame.pin is not None:  # the target may read it yet; held before the frame (its batch) ends
                self._keep(frame.pin)
            self.peer.fail_frame(frame, reason)

    def _keep(self, pin: Pin) -> None:
        """Hold ``pin``'s buffers until :meth:`settle`: the target may still serve the attach frame it
        belongs to, which this dead lane carried unanswered."""
        with self._state_lock:
            if not self._settled:  # else the target closed its end before this frame went (or the engine closed)
                pin.take()
                self._unsettled.append(pin)

    def settle(self, force: bool = False) -> bool:
        """Whether nothing sent on this dead lane can reach the target any more: no attach frame was
        unanswered when it died, or the target has closed its end of the connection since (it serves a
        frame when it reads it, and it read all it ever will), or ``force`` (the engine closes). Gives
        back the holds of :meth:`_keep` then; the caller may close the socket."""
        with self._state_lock:
            if self._unsettled and not force and self._peer_open():
                return False
            pins, self._unsettled, self._settled = self._unsettled, [], True
        for pin in pins:
            pin.release()
        return True

    def _peer_open(self) -> bool:
        """Whether the target still holds its end of this connection open (our end is shut down)."""
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _PEER_OPEN
        except OSError:  # no state to read: the socket is gone
            return False

    def overdue(self, now: float) -> bool:
        cur = self._cur  # a reply being received counts too (a peer may trickle it)
        return any(now >= f.batch.deadline for f in list(self.inflight.values())) or (
            cur is not None and now >= cur.batch.deadline)

    def carries(self, batch: Batch) -> bool:
        cur = self._cur
        if cur is not None and cur.batch is batch:
            return True
        for frame in list(self.inflight.values()):  # a plain loop: asked a few times per batch, on every batch
            if frame.batch is batch:
                return True
        return False

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
        reader = self._reader
        waited = False
        while True:
            if reader.state == P.PAYLOAD:
                if not self._drained and self._into is not None and self._into.done:
                    self._drain()
                n, now_waited = self._payload.receive(sock, reader.views, not waited)
                waited = waited or now_waited  # once a call: the driver checks deadlines between calls
                if not n:
                    return
                if reader.views:
                    continue
                reader.payload_done()
                self._finish()
                if not self.inflight:  # no reply is due: skip the read that would find nothing
                    return
                continue
            n = recv_some_into(sock, reader.into, reader.got, reader.need)
            if not n:
                return
            what = reader.received(n)
            if what == P.NOTHING:
                continue
            if what == P.PEER_ERROR:
                raise ProtocolError(f"peer reported a protocol error: {reader.body.decode(errors='replace')}")
            statuses, payload = reader.statuses, reader.payload_len
            frame = self.inflight.pop(reader.req_id, None)
            if frame is None:
                raise ProtocolError(f"RESP for unknown request id {reader.req_id}")
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
                    self._into, self._drained = frame.batch, False
                    reader.expect_payload(views)
                    continue
            elif payload:
                raise ProtocolError("WRITE reply carries a payload")
            self._finish()
            if not self.inflight:
                return

    def _drain(self) -> None:
        """The batch of the READ being received has ended (the engine closed): receive the rest of its
        payload into scratch memory, never into the caller's, which may be freed by now."""
        left = sum(v.nbytes for v in self._reader.views)
        scratch = memoryview(bytearray(min(left, _SCRATCH)))
        self._reader.views = [scratch[:min(_SCRATCH, left - off)] for off in range(0, left, _SCRATCH)]
        self._drained = True

    def drop_current(self) -> None:
        """End the frame whose reply was being received when this lane died (called by the driver role,
        with the lane out of the poll set: nobody receives into it any more)."""
        cur, self._cur, self._into = self._cur, None, None
        self._reader.detach()  # the connection is gone: it reads nothing more
        if cur is not None:
            self.peer.fail_frame(cur, self.reason or f"connection to {self.peer.name} lost")

    def _finish(self) -> None:
        frame, self._cur = self._cur, None
        self._into = None
        assert frame is not None
        self.load -= frame.nbytes
        if frame.stage is None and not any(self._statuses):  # the usual case: all served, nothing staged
            frame.batch.parts_completed(frame.refs)
        else:
            self.peer.complete(frame, self._statuses)


class Progress:
    """The driver role: one waiting thread at a time reads replies for all lanes of one peer (threads
    waiting on different peers read at once)."""

    def lanes(self) -> int:
        """Lanes open now (to this peer)."""
        return len(self._lanes)

    def __init__(self, spin_us: int) -> None:
        self._spinner = Spinner(spin_us)
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
        self._closed = False  # set by close(): drivers leave, waiters return
        self._pipe_lock = threading.Lock()  # guards writes to the wake-up pipe against its release
        self._pipe_open = True
        self._settling: list[Lane] = []  # dead lanes whose target may still serve an attach frame (see _settle)
        self.on_tick: Callable[[float], None] = lambda now: None

    def add(self, lane: Lane) -> None:
        with self._cv:
            closed = self._closed
            if not closed:
                self._lanes.add(lane)
        if closed:  # opened by a retry racing close(): nobody would ever read or close it
            lane.abort("engine closed")
            lane.sock.close()
            return
        self.changed()

    def changed(self) -> None:
        """The lane set changed: make the driver rebuild its poll set now."""
        self._version += 1
        self._wake()

    def _wake(self) -> None:
        """Wake the driver out of poll (never writes to the pipe's fd numbers once released)."""
        with self._pipe_lock:
            if self._pipe_open:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:  # full: a wake-up is pending anyway
                    pass

    def wait(self, batch: Batch, block: bool = True, until_clear: Peer | None = None) -> None:
        """Drive replies until ``batch`` is done or past its deadline (once, without blocking, if not ``block``);
        with ``until_clear``, also stop once that peer carries no frame of ``batch`` (its other frames go to
        other peers, whose replies other drivers read)."""
        end = batch.deadline + GRACE
        while not batch.done and not self._closed:
            if until_clear is not None and not until_clear.carries(batch):
                return
            if self._role.acquire(False):  # nobody drives: this thread does
                try:
                    self._drive(batch, block, until_clear)
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
        if self._closed or not self._role.acquire(False):
            return
        try:
            self._reap()
            self.on_tick(time.monotonic())
        finally:
            self._hand_over()

    def _reap(self) -> dict[int, Lane]:
        """Drop aborted lanes (closing their sockets once settled, see :meth:`_settle`) and return the live
        ones by fd."""
        with self._cv:
            dead = [lane for lane in self._lanes if lane.aborted]
            for lane in dead:
                self._lanes.discard(lane)
            live = {lane.fd: lane for lane in self._lanes}
        for lane in dead:
            lane.drop_current()
        self._settling += dead
        if self._settling:
            self._settle()
        return live

    def _settle(self, force: bool = False) -> bool:
        """Close the sockets of dead lanes that are settled (:meth:`Lane.settle`); the others keep theirs
        open, since the state of that connection is how we learn that the target closed its end. Whether
        some are left (checked again on each tick). Driver role only."""
        left = []
        for lane in self._settling:
            if lane.settle(force):
                lane.sock.close()
            else:
                left.append(lane)
        self._settling = left
        return bool(left)

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

    def _drive(self, batch: Batch, block: bool, until_clear: Peer | None) -> None:
        try:
            self._drive_replies(batch, block, until_clear)
        finally:
            self._spinner.release()

    def _drive_replies(self, batch: Batch, block: bool, until_clear: Peer | None) -> None:
        spinner = self._spinner
        last = time.monotonic()
        spin = spinner.after_traffic(last)
        next_check = last + _CHECK_PERIOD
        while not batch.done and not self._closed:
            if self._version != self._poll_version:  # lanes came or went
                self._rebuild_poll_set()
            poller, lanes = self._poll_cache
            events = poller.poll(0)
            now = time.monotonic()
            if not events:
                if not block or now >= batch.deadline + GRACE:
                    self.on_tick(now)
                    return
                if now >= next_check:
                    next_check = now + _CHECK_PERIOD
                    self.on_tick(now)
                    if self._settling:
                        self._settle()
                    continue
                if now - last < spin:
                    continue
                if spin:
                    spinner.wasted()
                    spin = 0.0
                events = poller.poll(max(1, min(50, int((batch.deadline - now) * 1000) + 1)))
                if not events:
                    continue
                now = time.monotonic()
                spinner.woke(now - last)
            last = now
            spin = spinner.after_traffic(now)
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
            if until_clear is not None and not until_clear.carries(batch):
                return

    def close(self) -> None:
        """End every lane's frames, make the driver leave, then release sockets and the wake-up pipe.

        Only once no thread is inside the driver role: a thread polling or
        reading an fd that was closed under it would get EBADF, or worse, read
        whatever file took its number meanwhile. If the driver does not leave in
        time, the fds are left open rather than closed under it. Lanes whose
        target may still serve an attach frame get :data:`_SETTLE_WAIT` seconds
        to settle; then their buffers are let go of anyway.
        """
        with self._cv:
            self._closed = True
            lanes = list(self._lanes)
        for lane in lanes:
            lane.abort("engine closed")
        self._wake()
        if not self._role.acquire(timeout=_CLOSE_WAIT):
            log.warning("a thread is still driving TCP replies %.0fs after close; its fds stay open", _CLOSE_WAIT)
            return
        try:
            self._reap()
            end = time.monotonic() + _SETTLE_WAIT
            while self._settle(time.monotonic() >= end):
                time.sleep(0.01)
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)
        finally:
            self._role.release()


class Peer:
    """All lanes to one remote engine endpoint."""

    def __init__(self, name: str, endpoint: str, instance: str, lanes: int, connect_timeout: float,
                 send_timeout: float, socket_buffer: int | None, progress: Progress,
                 on_stale: Callable[[str], None], hello: dict, on_refused: Callable[[Peer, int], None],
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

    def _connect(self, timeout: float) -> Lane:
        """A new lane, connected and greeted within ``timeout`` seconds."""
        try:
            sock = dial(self.endpoint, timeout, self.security, self.name)
        except OSError as e:
            self._on_stale(self.name)
            raise ConnectionError(f"cannot connect to {self.name} at {self.endpoint}: {e}") from None
        try:
            tune_socket(sock, self.socket_buffer)
            sock.sendall(P.encode_hello(self.name, **self.hello))
            instance = self._instance_of(read_control(sock, P.HELLO, "HELLO"))
            if instance != self.instance:
                self._on_stale(self.name)
                raise SegmentError(
                    f"peer {self.name} at {self.endpoint} restarted (instance {instance[:64]!r}, "
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

    def _instance_of(self, body: bytes) -> str:
        """The instance id a HELLO reply states; ProtocolError unless it is a JSON object whose
        ``instance`` (and ``name``, ``host``, ``pidns``, where present) are strings."""
        try:
            ident = P.loads_bounded(body)
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, a number of 5000 digits, too deep
            raise ProtocolError(f"{self.name} at {self.endpoint} sent a malformed HELLO reply: "
                                f"{type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(ident, dict) or not isinstance(ident.get("instance"), str) or any(
                not isinstance(ident.get(key, ""), str) for key in ("name", "host", "pidns")):
            raise ProtocolError(f"{self.name} at {self.endpoint} sent a malformed HELLO reply: expected a JSON "
                                f"object with string instance, name, host and pidns, got {body[:100]!r}")
        return ident["instance"]

    def _pick(self, deadline: float) -> Lane:
        """The least loaded live lane, opening missing lanes first (each within ``connect_timeout``, and
        before ``deadline``, that of the frame to send)."""
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
                    left = min(self.connect_timeout, deadline - time.monotonic())
                    if left <= 0:
                        raise TimeoutError(f"deadline passed before a connection to {self.name} was opened")
                    lane = self._lanes[i] = self._connect(left)
                if best is None or lane.load < best.load:
                    best = lane
            assert best is not None
            return best

    def send(self, frame: OutFrame) -> None:
        """Send ``frame`` on the least loaded lane; end it FAILED if no lane can be had. Never raises:
        the frame may come from ``Lane.abort``, which popped it, and must not be lost."""
        for _ in range(3):
            try:
                lane = self._pick(frame.batch.deadline)
            except Exception as e:  # noqa: BLE001 - whatever a peer made connecting fail with
                why = str(e) if isinstance(e, (OSError, SegmentError, ProtocolError, ValueError)) \
                    else f"connecting to {self.name} failed: {e!r}"
                late = time.monotonic() >= frame.batch.deadline
                self._end(frame, State.TIMEOUT if late else State.FAILED, why)
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
                if frame.kind == P.READ and not batch.done:  # the bytes are in host staging: to the GPU first
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
        tcp = frames.without_attach(frame, entries)
        self.on_refused(self, len(tcp.refs))
        frame.batch.set_transport(list(tcp.refs), "tcp")
        self.send(tcp)

    def fail_frame(self, frame: OutFrame, reason: str) -> None:
        """A frame's lane died: retry it once on another lane unless its deadline passed (or its batch
        ended: the engine closed)."""
        if frame.batch.done:
            self._end(frame, State.FAILED, reason)  # releases a stage; the batch ignores the report
        elif time.monotonic() >= frame.batch.deadline:
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

    def carries(self, batch: Batch) -> bool:
        """Whether a frame of ``batch`` waits for its reply on one of this peer's lanes."""
        for lane in self._lanes:
            if lane is not None and lane.carries(batch):
                return True
        return False

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
