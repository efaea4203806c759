"""Misuse of the engine API and hostile initiator-side peers: every request ends by its deadline with a reason,
no byte lands in memory after its transfer ended or its buffer was unregistered, unregister is all or
nothing, close() hands waiters their statuses, and timeouts are finite numbers in a documented range."""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from helpers.memory import random_mmap, sha
from helpers.net import recv_exact
from helpers.procs import open_fds
from moonlet import ConfigError, EngineConfig, Op, RegistrationError, Request, State, TransferEngine, config
from moonlet.batch import Batch
from moonlet.errors import MemoryAccessError
from moonlet.memory import Buffer, Denied, MemoryRegistry
from moonlet.segment import Segment, SegmentDescriptor
from moonlet.transport.shm import cma
from moonlet.transport.tcp import protocol as P

MAX_TIMEOUT = 1e6  # the documented cap on every timeout (config.MAX_TIMEOUT)
REMOTE = 1 << 30  # where the fake target claims a buffer
HELLO_OK = json.dumps({"name": "fake", "instance": "fake", "host": "elsewhere", "pidns": ""}).encode()


def recv_frame(c: socket.socket) -> tuple[P.Prefix, bytes]:
    """One frame from the initiator: its prefix, and its table (a WRITE's payload is read and dropped)."""
    p = P.parse_prefix(recv_exact(c, P.PREFIX_SIZE))
    table = recv_exact(c, p.table_size)
    if p.payload_len:
        recv_exact(c, p.payload_len)
    return p, table


class FakeTarget:
    """A raw-socket moonlet target in a thread: ``serve(number, conn)`` handles each connection, numbered
    in arrival order (the initiator's HELLO is first on each). Every socket has a timeout."""

    def __init__(self, serve: Callable[[int, socket.socket], None]) -> None:
        self._serve = serve
        self._ls = socket.create_server(("127.0.0.1", 0))
        self._ls.settimeout(0.1)
        self.port = self._ls.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for number in range(1000):
            while not self.stop.is_set():
                try:
                    c, _ = self._ls.accept()
                    break
                except TimeoutError:
                    continue
                except OSError:
                    return
            else:
                return
            c.settimeout(10)
            self.conns.append(c)
            threading.Thread(target=self._run, args=(number, c), daemon=True).start()

    def _run(self, number: int, c: socket.socket) -> None:
        try:
            self._serve(number, c)
        except OSError:
            pass

    def segment(self) -> Segment:
        desc = SegmentDescriptor(f"127.0.0.1:{self.port}", "fake", "elsewhere", 1,
                                 {"tcp": f"127.0.0.1:{self.port}"},
                                 [{"addr": REMOTE, "length": 1 << 30, "location": "cpu:0"}])
        return Segment(desc.name, desc)

    def close(self) -> None:
        self.stop.set()
        self._ls.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fake_factory():
    made: list[FakeTarget] = []

    def make(serve: Callable[[int, socket.socket], None]) -> FakeTarget:
        made.append(FakeTarget(serve))
        return made[-1]

    yield make
    for f in made:
        f.close()


def hello(c: socket.socket, body: bytes = HELLO_OK) -> None:
    """Read the initiator's HELLO, answer with ``body``."""
    p, _ = recv_frame(c)
    assert p.kind == P.HELLO
    c.sendall(P.encode_control(P.HELLO, body))


def trickle(c: socket.socket, stop: threading.Event) -> None:
    """Answer HELLO, then answer a READ with its RESP head and payload a little at a time, until stopped."""
    hello(c)
    p, table = recv_frame(c)
    size = sum(int.from_bytes(table[k + 8:k + 16], "little") for k in range(0, len(table), 16))
    c.sendall(P.encode_response(p.req_id, bytes(p.count), size))
    chunk = os.urandom(4096)
    for _ in range(min(size // 4096, 2000)):
        if stop.is_set():
            return
        c.sendall(chunk)
        time.sleep(0.005)


def wait_in_thread(batch, bound: float) -> tuple[list | None, BaseException | None, float]:
    """``batch.wait()`` in a thread given ``bound`` seconds: (statuses, exception, seconds taken);
    statuses None if it had not returned by then."""
    out: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["st"] = batch.wait()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["exc"] = e
        out["took"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(bound)
    return out.get("st"), out.get("exc"), out.get("took", math.inf)


# -- 5: unregister waits for this engine's transfers on a local buffer -----------------------------------


def test_unregister_waits_for_a_read_in_flight(engine, peer):
    """A 64 MiB READ in flight, then unregister(local): it returns only once the READ has ended (all of it
    landed), and no byte lands afterwards."""
    mem = random_mmap(peer.size)
    buf = engine.register(mem)
    seg = engine.open_segment(peer.name)
    expect = peer.digest(peer.addr, peer.size)
    batch = engine.submit_many(Op.READ, seg, [buf.addr], [peer.addr], [peer.size])
    engine.unregister(buf)
    assert batch.done
    assert [s.state for s in batch.statuses()] == [State.COMPLETED]
    assert sha(mem) == expect
    assert engine.buffers() == []
    pattern = os.urandom(1 << 20) * (peer.size >> 20)
    mem[:] = pattern
    time.sleep(0.3)
    assert mem[:] == pattern
    with pytest.raises(MemoryAccessError, match="not inside a registered buffer"):
        engine.submit([Request(Op.READ, buf.addr, seg, peer.addr, 4096)])


def test_unregister_ends_a_stalled_read_and_nothing_lands_after(fake_factory):
    """A READ whose reply trickles in forever: unregister waits config.request_timeout, the READ ends
    TIMEOUT, and no byte of the payload the peer keeps sending reaches the memory afterwards."""
    stop = threading.Event()
    fake = fake_factory(lambda n, c: trickle(c, stop))
    size = 8 << 20
    with TransferEngine(config=EngineConfig(transports=("tcp",), request_timeout=0.5)) as eng:
        mem = random_mmap(size)
        buf = eng.register(mem)
        batch = eng.submit([Request(Op.READ, buf.addr, fake.segment(), REMOTE, size)], timeout=30)
        time.sleep(0.1)  # bytes are arriving
        t0 = time.monotonic()
        eng.unregister(buf)
        assert time.monotonic() - t0 < 0.5 + 2
        assert batch.done
        st = batch.statuses()
        assert all(s.state is State.TIMEOUT and s.reason for s in st), st
        pattern = os.urandom(1 << 20) * (size >> 20)
        mem[:] = pattern
        time.sleep(0.3)  # the fake sends 800 KB/s while its socket is open
        assert mem[:] == pattern
        stop.set()


def test_a_batch_pins_each_local_buffer_once(engine, peer):
    """A running batch holds each distinct local buffer once (not once per request) and lets go exactly once,
    whichever way it ends (completed, failed at submit, failed in part): afterwards both buffers
    unregister at once."""

    def holds() -> tuple[int, ...]:
        return tuple(sum(buf in b.pinned for b in engine._live) for buf in (ba, bb))

    a, b = bytearray(os.urandom(1 << 20)), bytearray(os.urandom(1 << 20))
    ba, bb = engine.register(a), engine.register(b)
    seg = engine.open_segment(peer.name)
    reqs = [Request(Op.WRITE, ba.addr, seg, peer.addr, 4096), Request(Op.WRITE, bb.addr, seg, peer.addr + 4096, 4096),
            Request(Op.READ, ba.addr + 8192, seg, peer.addr + 8192, 4096),
            Request(Op.READ, ba.addr + 16384, seg, peer.addr + 8192, 4096)]
    for _ in range(3):
        batch = engine.submit(reqs)  # nobody has read the replies yet: it is still running
        assert holds() == (1, 1)
        assert all(s.ok for s in batch.wait())
        assert holds() == (0, 0)
        many = engine.submit_many(Op.WRITE, seg, [ba.addr, ba.addr + 4096], [peer.addr, peer.addr + 4096], [4096] * 2)
        assert holds() == (1, 0)
        assert all(s.ok for s in many.wait())
    bad = [Request(Op.WRITE, ba.addr, seg, peer.addr + peer.size, 4096)]  # no such remote range
    assert engine.submit(bad).wait()[0].state is State.FAILED
    part = engine.submit([Request(Op.WRITE, bb.addr, seg, peer.addr, 4096), *bad])
    assert [s.state for s in part.wait()] == [State.COMPLETED, State.FAILED]
    assert holds() == (0, 0)
    for buf in (ba, bb):
        t0 = time.monotonic()
        engine.unregister(buf)
        assert time.monotonic() - t0 < 1
    assert engine.buffers() == []


def test_a_read_payload_for_an_ended_batch_lands_in_scratch():
    """The batch of a READ whose payload is half received ends (as close() ends batches): the rest of the
    payload is drained from the connection into scratch memory, never into the caller's, and the lane
    reads the next reply as usual."""
    from moonlet.transport.tcp.client import Lane, Peer, Progress
    from moonlet.transport.tcp.frames import OutFrame

    progress = Progress(0)
    peer = Peer("fake", "127.0.0.1:1", "fake", 1, 1.0, 1.0, None, progress, lambda name: None, {},
                lambda p: None)
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    try:
        lane = Lane(peer, ours)
        size = 3 << 20
        user = bytearray(os.urandom(size))
        before = bytes(user)
        batch = Batch(2, time.monotonic() + 30)
        batch.add_parts([(0, 1), (1, 1)], "tcp")
        frame = OutFrame(P.READ, [REMOTE, size], [memoryview(user)], [0], batch, size)
        lane.inflight[frame.req_id] = frame
        first = os.urandom(size // 3)
        sender = threading.Thread(target=theirs.sendall, args=(P.encode_response(frame.req_id, bytes(1), size)
                                                               + first,))
        sender.start()
        for _ in range(500):
            lane.on_readable()
            if user[:len(first)] == first:
                break
            time.sleep(0.01)
        sender.join(5)
        assert user[:len(first)] == first  # received into the caller's memory while the batch runs
        batch.end_all(State.FAILED, "engine closed")
        later = OutFrame(P.READ, [REMOTE, 4096], [memoryview(bytearray(4096))], [1], batch, 4096)
        lane.inflight[later.req_id] = later
        rest = os.urandom(size - len(first)) + P.encode_response(later.req_id, bytes(1), 4096) + os.urandom(4096)
        sender = threading.Thread(target=theirs.sendall, args=(rest,))
        sender.start()
        for _ in range(500):
            lane.on_readable()
            if not lane.inflight and lane._cur is None:
                break
            time.sleep(0.01)
        sender.join(5)
        assert not lane.inflight and not lane.aborted  # the stream stayed in step
        assert user[len(first):] == before[len(first):]  # no byte landed after the batch ended
        assert [s.state for s in batch.statuses()] == [State.FAILED] * 2
        assert all(s.reason == "engine closed" for s in batch.statuses())
    finally:
        ours.close()
        theirs.close()
        progress.close()


def _proc_state(pid: int, tid: str) -> str:
    """The scheduler state letter of thread ``tid`` of process ``pid`` ("T": stopped)."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not cma.AVAILABLE, reason="process_vm_readv/writev need Linux")
def test_unregister_waits_for_a_same_host_target_that_may_still_copy(peer_factory):
    """Over the attached same-host path the target copies a READ into our memory itself, when it reads the
    frame. With the target stopped (SIGSTOP) once the frame is sent, the READ ends TIMEOUT, yet
    unregister(local) does not succeed while the target could still write: it raises RegistrationError
    after request_timeout and the buffer stays registered. Once the target runs again it serves the frame
    into that still registered memory and closes the lane; unregister then succeeds, and no byte lands
    after it returned."""
    size = 4 << 20
    peer = peer_factory("--size", str(size))  # registered with register(mmap), not allocate(): no memfd
    with TransferEngine(config=EngineConfig(transports=("shm",), request_timeout=1.0)) as eng:
        mem = random_mmap(size)
        buf = eng.register(mem)
        seg = eng.open_segment(peer.name)
        assert all("memfd" not in b for b in seg.descriptor.buffers)  # so the target copies, not us
        assert eng.read(buf.addr, seg, peer.addr, 4096).transport == "shm"  # every lane up, HELLO done
        expect = peer.digest(peer.addr, size)
        out: dict = {}

        def unregister() -> None:
            try:
                eng.unregister(buf)
                out["ok"] = True
            except RegistrationError as e:
                out["error"] = str(e)

        os.kill(peer.pid, signal.SIGSTOP)
        try:
            for _ in range(500):  # kill() only queues the signal: wait until every thread has stopped
                if all(_proc_state(peer.pid, t) == "T" for t in os.listdir(f"/proc/{peer.pid}/task")):
                    break
                time.sleep(0.01)
            batch = eng.submit_many(Op.READ, seg, [buf.addr], [peer.addr], [size], timeout=0.5)
            assert batch.wait()[0].state is State.TIMEOUT
            th = threading.Thread(target=unregister, daemon=True)
            th.start()
            th.join(1.0 + 1.5)
            stopped = dict(out)  # what unregister did while the target could not run
            pattern = os.urandom(1 << 20) * (size >> 20)
            mem[:] = pattern  # the caller reuses the memory
        finally:
            os.kill(peer.pid, signal.SIGCONT)
        th.join(5)
        for _ in range(500):  # running again, the target serves the frame it had received
            if mem[:] != pattern:
                break
            time.sleep(0.01)
        time.sleep(0.1)  # the copy is whole
        if "ok" in stopped:
            assert mem[:] == pattern, "the target wrote into the memory after unregister(local) returned"
        assert "still in use by 1 transfer(s)" in stopped.get("error", ""), stopped
        assert eng.buffers() == [buf]  # all or nothing: still registered ...
        assert sha(mem) == expect  # ... and the target's late copy landed there, as it may
        t0 = time.monotonic()
        eng.unregister(buf)  # the target has closed its end of the lane: nothing more can come
        assert time.monotonic() - t0 < 1
        assert eng.buffers() == []
        mem[:] = pattern
        time.sleep(0.3)
        assert mem[:] == pattern


# -- 11: unregister is all or nothing --------------------------------------------------------------------


def test_registry_remove_is_all_or_nothing():
    """A held pin: remove() refuses new pins while it waits, then gives up, leaving the buffer exactly as
    registered; once the pin goes, remove() succeeds."""
    reg = MemoryRegistry()
    mem = bytearray(os.urandom(1 << 16))
    from moonlet.memory import address_of

    addr, length, keep = address_of(mem)
    buf = reg.add(Buffer(addr, length, "cpu:0", keepalive=keep))
    (got,), held = reg.acquire([(addr, 4096)], write=True)
    assert got is buf
    seen: dict = {}

    def remove() -> None:
        try:
            reg.remove(addr, timeout=0.6)
        except RegistrationError as e:
            seen["error"] = str(e)

    th = threading.Thread(target=remove)
    th.start()
    time.sleep(0.2)  # draining now
    (during,), pinned = reg.acquire([(addr, 4096)], write=False)
    assert during == Denied.NOT_REGISTERED and pinned == []
    assert reg.find(addr, 4096) is None
    with pytest.raises(RegistrationError, match="already being unregistered"):
        reg.remove(addr, timeout=0.1)
    th.join(5)
    assert "still in use by 1 transfer(s)" in seen["error"] and "stays registered" in seen["error"]
    # Restored exactly: listed, found, pinnable, and still guarding its range.
    assert reg.buffers() == [buf] and len(reg) == 1
    assert reg.find(addr + 100, 100) is buf
    (again,), pinned = reg.acquire([(addr, 4096)], write=True)
    assert again is buf
    reg.release(pinned)
    with pytest.raises(RegistrationError, match="already registered"):
        reg.add(Buffer(addr, length, "cpu:0"))
    reg.release(held)
    assert reg.remove(addr, timeout=0.5) is buf
    assert reg.buffers() == [] and reg.find(addr, 1) is None
    (after,), _ = reg.acquire([(addr, 4096)], write=True)
    assert after == Denied.NOT_REGISTERED


def test_engine_unregister_with_a_held_pin_changes_nothing(peer):
    """A peer's transfer holds an allocate()d buffer past request_timeout: unregister raises naming it, and
    the buffer stays registered, published and usable (its memory too); once released, unregister works."""
    with TransferEngine(config=EngineConfig(transports=("tcp",), request_timeout=0.5)) as eng:
        buf = eng.allocate(1 << 20)
        mem = memoryview((ctypes.c_char * buf.length).from_address(buf.addr)).cast("B")
        mem[:] = os.urandom(buf.length)
        seg = eng.open_segment(peer.name)
        (pinned_buf,), held = eng._registry.acquire([(buf.addr, 4096)], write=True)  # as the server does
        assert pinned_buf is buf
        with pytest.raises(RegistrationError, match=r"still in use by 1 transfer\(s\)"):
            eng.unregister(buf)
        assert eng.buffers() == [buf]
        assert any(d["addr"] == buf.addr for d in eng.descriptor().buffers)
        eng.write(buf.addr, seg, peer.addr, 1 << 20)
        assert peer.digest(peer.addr, 1 << 20) == sha(mem)
        eng.read(buf.addr + 4096, seg, peer.addr + (1 << 20), 8192)
        assert sha(mem[4096:12288]) == peer.digest(peer.addr + (1 << 20), 8192)
        eng._registry.release(held)
        eng.unregister(buf)
        assert eng.buffers() == []
        assert all(d["addr"] != buf.addr for d in eng.descriptor().buffers)
        with pytest.raises(MemoryAccessError):
            eng.write(buf.addr, seg, peer.addr, 4096)


# -- 12: whatever a peer sends, every request ends by its deadline ----------------------------------------


JUNK_HELLOS = {
    "list": b"[]",
    "list of numbers": b"[1, 2, 3]",
    "null": b"null",
    "huge number": b"1" * 5000,
    "float overflow": b"1e999",
    "not utf-8": b"\x80\x81\x82\xff",
    "instance not a string": b'{"instance": 5, "name": "fake"}',
    "deeply nested": b"[" * 60000,
}


@pytest.mark.parametrize("junk", list(JUNK_HELLOS), ids=list(JUNK_HELLOS))
def test_junk_hello_on_reconnect_fails_every_request(fake_factory, junk):
    """The peer answers the first HELLO, drops the connection when the frames come, and answers the
    reconnect with junk: every request ends FAILED with a reason, and wait() neither raises nor hangs."""
    def serve(n: int, c: socket.socket) -> None:
        if n == 0:
            hello(c)
            recv_frame(c)  # the first request frame: drop the connection with it in flight
            c.close()
        else:
            hello(c, JUNK_HELLOS[junk].ljust(P.MIN_TARGET_TAIL))  # padded: a HELLO has at least 16 bytes
            time.sleep(5)

    fake = fake_factory(serve)
    with TransferEngine(config=EngineConfig(transports=("tcp",), lanes=1)) as eng:
        buf = eng.register(bytearray(os.urandom(1 << 16)))
        seg = fake.segment()
        reqs = [Request(Op.READ if i % 2 else Op.WRITE, buf.addr + i * 4096, seg, REMOTE + i * 4096, 4096)
                for i in range(8)]
        deadline = 3.0
        batch = eng.submit(reqs, timeout=deadline)
        st, exc, took = wait_in_thread(batch, deadline + 5)
        assert exc is None, repr(exc)
        assert st is not None and took < deadline + 2
        assert all(s.state is State.FAILED and s.reason for s in st), st
        assert any("malformed HELLO" in s.reason for s in st), st
        again, exc, _ = wait_in_thread(batch, 1)  # a second wait returns the same at once
        assert exc is None and again == st


def test_reply_stalled_midway_ends_by_the_deadline(fake_factory):
    """The peer sends a READ reply's head and part of its payload, then keeps the connection open and
    silent: the READ ends TIMEOUT by its deadline (plus a little), and wait() returns."""
    stop = threading.Event()

    def serve(n: int, c: socket.socket) -> None:
        hello(c)
        p, table = recv_frame(c)
        size = int.from_bytes(table[8:16], "little")
        c.sendall(P.encode_response(p.req_id, bytes(p.count), size) + os.urandom(size // 2))
        stop.wait(10)

    fake = fake_factory(serve)
    with TransferEngine(config=EngineConfig(transports=("tcp",), lanes=1)) as eng:
        buf = eng.register(bytearray(1 << 20))
        batch = eng.submit([Request(Op.READ, buf.addr, fake.segment(), REMOTE, 1 << 20)], timeout=1.0)
        st, exc, took = wait_in_thread(batch, 8)
        stop.set()
        assert exc is None, repr(exc)
        assert st is not None and took < 1.0 + 2, took
        assert st[0].state is State.TIMEOUT and "deadline passed" in st[0].reason


# -- 13: close() while another thread waits --------------------------------------------------------------


def test_close_while_another_thread_waits(fake_factory):
    """20 times: a thread waits on a batch a silent peer never answers; close() from this thread hands it
    FAILED "engine closed" statuses, never an exception."""
    fake = fake_factory(lambda n, c: (hello(c), time.sleep(10)))
    fds, threads = open_fds(), threading.active_count()
    for trial in range(20):
        eng = TransferEngine(config=EngineConfig(transports=("tcp",)))
        buf = eng.register(bytearray(1 << 16))
        batch = eng.submit([Request(Op.READ, buf.addr, fake.segment(), REMOTE, 4096),
                            Request(Op.WRITE, buf.addr + 4096, fake.segment(), REMOTE, 4096)], timeout=30)
        out: dict = {}

        def waiter(batch: Batch, out: dict) -> None:
            try:
                out["st"] = batch.wait()
            except BaseException as e:  # noqa: BLE001 - reported to the test
                out["exc"] = e

        th = threading.Thread(target=waiter, args=(batch, out), daemon=True)
        th.start()
        time.sleep(0.02 + 0.005 * (trial % 5))  # the waiter is driving (polling the wake-up pipe)
        eng.close()
        th.join(5)
        assert not th.is_alive(), f"trial {trial}: wait() did not return after close()"
        assert "exc" not in out, f"trial {trial}: {out['exc']!r}"
        assert all(s.state is State.FAILED and "engine closed" in s.reason for s in out["st"]), out["st"]
    # Every engine released its sockets and wake-up pipe, and its threads ended (the fake holds 40 sockets).
    assert open_fds() <= fds + 40 + 5
    assert threading.active_count() <= threads + 40 + 5


# -- 16: timeouts are finite numbers in (0, MAX_TIMEOUT] --------------------------------------------------


BAD_TIMEOUTS = [math.inf, -math.inf, math.nan, 1e30, MAX_TIMEOUT * 2, 0, -1, True, "5"]
RANGE = r"must be a finite number of seconds in \(0, 1e\+06\]"


@pytest.mark.parametrize("field", ["request_timeout", "connect_timeout", "metadata_timeout", "metadata_ttl"])
def test_config_refuses_unbounded_timeouts(field):
    assert getattr(config, "MAX_TIMEOUT", None) == MAX_TIMEOUT
    for bad in BAD_TIMEOUTS:
        with pytest.raises(ConfigError, match=f"{field} {RANGE}"):
            EngineConfig(**{field: bad})
    with pytest.raises(ConfigError, match=f"{field} {RANGE}"):
        TransferEngine(**{field: math.inf})
    assert getattr(EngineConfig(**{field: MAX_TIMEOUT}), field) == MAX_TIMEOUT


def test_every_timeout_argument_is_checked(tcp_engine, peer):
    """submit, submit_many, write, read, their async forms, notify and Batch.wait refuse what the
    configuration refuses, with a ConfigError naming the argument and the range; the cap itself works."""
    engine = tcp_engine
    buf = engine.register(bytearray(os.urandom(1 << 16)))
    seg = engine.open_segment(peer.name)
    one = [Request(Op.WRITE, buf.addr, seg, peer.addr, 4096)]
    calls = {
        "submit": lambda t: engine.submit(one, timeout=t),
        "submit_many": lambda t: engine.submit_many(Op.WRITE, seg, [buf.addr], [peer.addr], [4096], timeout=t),
        "submit_many (several buffers)": lambda t: engine.submit_many(Op.WRITE, seg, [buf.addr, buf.addr],
                                                                       [peer.addr, 1 << 60], [4096, 4096], timeout=t),
        "write": lambda t: engine.write(buf.addr, seg, peer.addr, 4096, timeout=t),
        "read": lambda t: engine.read(buf.addr, seg, peer.addr, 4096, timeout=t),
        "write_async": lambda t: asyncio.run(engine.write_async(buf.addr, seg, peer.addr, 4096, timeout=t)),
        "read_async": lambda t: asyncio.run(engine.read_async(buf.addr, seg, peer.addr, 4096, timeout=t)),
        "notify": lambda t: engine.notify(seg, "note", "text", timeout=t),
        "Batch.wait": lambda t: engine.submit(one).wait(timeout=t),
    }
    for call in calls.values():
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ConfigError, match=f"timeout {RANGE}"):
                call(bad)
    # Nothing was left running by a refused call, and the largest timeout works end to end.
    assert engine.submit(one, timeout=MAX_TIMEOUT).wait(timeout=MAX_TIMEOUT)[0].ok
    assert engine.write(buf.addr, seg, peer.addr, 1 << 16, timeout=MAX_TIMEOUT).ok
    assert peer.digest(peer.addr, 1 << 16) == sha(buf_bytes(buf))
    engine.unregister(buf)
    # The same at the cap in the configuration: sockets take it as their send timeout (no OverflowError).
    with TransferEngine(config=EngineConfig(transports=("tcp",), request_timeout=MAX_TIMEOUT,
                                            connect_timeout=MAX_TIMEOUT)) as eng:
        data = bytearray(os.urandom(1 << 20))
        buf = eng.register(data)
        eng.write(buf.addr, eng.open_segment(peer.name), peer.addr, len(data))
        assert peer.digest(peer.addr, len(data)) == sha(data)
        eng.unregister(buf)


def buf_bytes(buf: Buffer) -> bytes:
    return bytes((ctypes.c_char * buf.length).from_address(buf.addr))
