"""Many peers, many reactors, many buffers: the target spreads peers over its reactor threads, serves every
one of them correctly and fairly, closes cleanly while all are busy, and keeps per-connection memory bounded;
the initiator serves many peers from many threads; spinning backs off under contention."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.engines import initiator, transport
from helpers.memory import register_random
from helpers.net import connect, raw_read, recv_exact
from helpers.procs import open_fds, rss_kib, wait_threads
from moonlet import Op, Request, State
from moonlet.memory import Denied
from moonlet.transport import spin
from moonlet.transport.tcp import protocol as P
from moonlet.transport.tcp.dial import read_control

ROOT = Path(__file__).resolve().parent.parent
PEER = str(ROOT / "tests" / "helpers" / "scale_peer.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, PEER, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def test_sixteen_initiator_processes_move_random_bytes_through_one_target():
    span = 256 << 10
    with initiator(reactors=4, request_timeout=60.0) as target:
        buf, mem = register_random(target, 16 * span)
        procs = [_spawn("moves", target.name, buf.addr + i * span, span, 1000 + i, 30) for i in range(16)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        for i, r in enumerate(results):
            assert r["ok"], f"initiator {i}: {r.get('error')}"
            assert hashlib.sha256(mem[i * span:(i + 1) * span]).hexdigest() == r["sha256"], f"span {i} differs"


def test_authenticated_connections_are_spread_over_the_reactors():
    with initiator(reactors=3) as target:
        buf, mem = register_random(target, 1 << 20)
        server = transport(target, "tcp").server
        assert server.reactors == 3
        peers = [initiator(lanes=2) for _ in range(3)]
        try:
            for eng in peers:
                local, view = register_random(eng, 1 << 20)
                eng.submit_many(Op.READ, target.name, [local.addr], [buf.addr], [1 << 20]).check()
                assert bytes(view) == bytes(mem)  # the first request opens both lanes
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sorted(loop.load for loop in server._shared.loops) != [2, 2, 2]:
                time.sleep(0.01)
            assert sorted(loop.load for loop in server._shared.loops) == [2, 2, 2]
            assert server.connections == 6
        finally:
            for eng in peers:
                eng.close()


def test_a_flooding_peer_leaves_a_bulk_mover_its_share():
    """One reactor: a peer pipelining one-byte WRITE frames as fast as it can, and a peer moving 1 MiB blocks.
    Turns are bounded per connection, so the mover keeps at least a fifth of what it moves alone."""
    with initiator(reactors=1) as target, initiator() as mover:
        tbuf, _ = register_random(target, 64 << 20)
        local, _ = register_random(mover, 32 << 20)
        addrs = [i << 20 for i in range(32)]

        def batches(seconds: float) -> int:
            end, done = time.monotonic() + seconds, 0
            while time.monotonic() < end:
                mover.submit_many(Op.WRITE, target.name, [local.addr + a for a in addrs],
                                  [tbuf.addr + a for a in addrs], [1 << 20] * 32).check()
                done += 1
            return done

        batches(0.3)
        alone = batches(2.0)
        flooder = _spawn("flood", target.name, tbuf.addr + (48 << 20))
        try:
            assert json.loads(flooder.stdout.readline())["flooding"]  # type: ignore[union-attr]
            time.sleep(0.2)
            shared = batches(2.0)
        finally:
            out, _ = flooder.communicate("", timeout=30)
        frames = json.loads(out.strip().splitlines()[-1])["frames"]
        assert frames > 10_000, "the flooder hardly sent anything: the test shows nothing"
        assert shared >= alone / 5, f"{shared} batches with the flooder, {alone} alone"


def test_ten_thousand_buffers_each_reached_exactly():
    size, count = 4096, 10_000
    with initiator(reactors=2) as target, initiator() as eng:
        import mmap

        region = mmap.mmap(-1, size * count)
        bufs = [target.register(memoryview(region)[i * size:(i + 1) * size]) for i in range(count)]
        local, view = register_random(eng, 512 * size)
        rng = random.Random(7)
        chosen = rng.sample(range(count), 512)
        offs = [rng.randrange(0, size // 2) for _ in chosen]
        lens = [rng.randrange(1, size - o) for o in offs]
        remotes = [bufs[i].addr + o for i, o in zip(chosen, offs)]
        locals_ = [local.addr + k * size for k in range(512)]
        eng.submit_many(Op.WRITE, target.name, locals_, remotes, lens).check()
        for k, (i, o, n) in enumerate(zip(chosen, offs, lens)):
            assert region[i * size + o:i * size + o + n] == bytes(view[k * size:k * size + n]), f"buffer {i}"
        view[:] = bytes(len(view))
        eng.submit_many(Op.READ, target.name, locals_, remotes, lens).check()
        for k, (i, o, n) in enumerate(zip(chosen, offs, lens)):
            assert bytes(view[k * size:k * size + n]) == region[i * size + o:i * size + o + n]
        # A range across two neighbouring buffers is inside neither: the initiator says so, and so does the
        # target, which checks on its own (a raw READ, past the initiator's check).
        statuses = eng.submit([Request(Op.WRITE, local.addr, target.name, bufs[10].addr + size - 8, 16)]).wait()
        assert statuses[0].state == State.FAILED and "overruns buffer" in statuses[0].reason
        with connect(target.name) as sock:
            sock.sendall(P.encode_request(P.READ, 9, [(bufs[10].addr + size - 8, 16), (bufs[11].addr, 16)]))
            reply = recv_exact(sock, P.PREFIX_SIZE + 2 + 16)
            assert reply[P.PREFIX_SIZE:P.PREFIX_SIZE + 2] == bytes([Denied.NOT_REGISTERED, 0])
            assert reply[-16:] == region[11 * size:11 * size + 16]


def test_closing_a_target_while_every_reactor_is_busy_ends_every_request_and_leaks_nothing():
    threads_before, fds_before = threading.active_count(), open_fds()
    peers = [initiator(request_timeout=30.0) for _ in range(4)]
    target = initiator(reactors=3)
    tbuf, _ = register_random(target, 4 * (32 << 20))
    ends: list[list] = [[] for _ in peers]
    started = threading.Barrier(len(peers) + 1)

    def move(k: int) -> None:
        eng = peers[k]
        local, _ = register_random(eng, 32 << 20)
        addrs = [i << 20 for i in range(32)]
        op = Op.WRITE if k % 2 else Op.READ
        started.wait()
        while True:
            statuses = eng.submit_many(op, target.name, [local.addr + a for a in addrs],
                                       [tbuf.addr + k * (32 << 20) + a for a in addrs], [1 << 20] * 32).wait()
            bad = [s for s in statuses if not s.ok]
            if bad:
                ends[k] = bad
                return

    workers = [threading.Thread(target=move, args=(k,)) for k in range(len(peers))]
    for w in workers:
        w.start()
    started.wait()
    time.sleep(0.5)
    server = transport(target, "tcp").server
    assert all(loop.load for loop in server._shared.loops), "not every reactor had a peer"
    target.close()
    for w in workers:
        w.join(60)
        assert not w.is_alive(), "a request did not end after its target closed"
    for bad in ends:
        assert bad and all(s.state in (State.FAILED, State.TIMEOUT) and s.reason for s in bad)
    for eng in peers:
        eng.close()
    assert wait_threads(threads_before) <= threads_before
    assert open_fds() <= fds_before


def test_sixty_four_peers_hold_with_bounded_memory_each():
    """64 connections, each authenticated by a frame and served one request: what the target holds per
    connection stays under 64 KiB (state, reader, queues; the kernel's socket buffers are not counted)."""
    with initiator(reactors=4) as target:
        buf, mem = register_random(target, 1 << 20)
        warm = [connect(target.name) for _ in range(4)]
        for s in warm:
            s.sendall(P.encode_hello("warm"))
        time.sleep(0.2)
        before = rss_kib()
        socks = []
        for i in range(64):
            s = connect(target.name, 10)
            s.sendall(P.encode_hello(f"peer{i}"))
            read_control(s, P.HELLO, "HELLO")
            assert raw_read(s, buf.addr + i * 64, 64)[-64:] == bytes(mem[i * 64:(i + 1) * 64])
            socks.append(s)
        server = transport(target, "tcp").server
        deadline = time.monotonic() + 5
        while server.connections < 68 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections == 68
        grown = rss_kib() - before
        assert grown < 64 * 64, f"64 connections grew the target by {grown} KiB"
        for s in socks + warm:
            s.close()


def test_one_thread_waits_for_a_batch_spread_over_two_peers():
    with initiator() as a, initiator() as b, initiator() as eng:
        abuf, amem = register_random(a, 1 << 20)
        bbuf, bmem = register_random(b, 1 << 20)
        local, view = register_random(eng, 2 << 20)
        reqs = [Request(Op.READ, local.addr + i * 65536, a.name if i % 2 else b.name,
                        (abuf if i % 2 else bbuf).addr + i * 65536, 65536) for i in range(16)]
        view[:] = bytes(len(view))
        assert all(s.ok for s in eng.submit(reqs).wait())
        for i in range(16):
            src = amem if i % 2 else bmem
            assert bytes(view[i * 65536:(i + 1) * 65536]) == bytes(src[i * 65536:(i + 1) * 65536])


def test_threads_waiting_on_different_peers_each_drive_their_own():
    targets = [initiator() for _ in range(4)]
    try:
        with initiator() as eng:
            local, view = register_random(eng, 4 << 20)
            mems = [register_random(t, 1 << 20) for t in targets]
            errors: list[str] = []

            def pull(k: int) -> None:
                tbuf, tmem = mems[k]
                for _ in range(20):
                    part = view[k << 20:(k + 1) << 20]
                    part[:] = bytes(1 << 20)
                    eng.submit_many(Op.READ, targets[k].name, [local.addr + (k << 20)], [tbuf.addr],
                                    [1 << 20]).check()
                    if bytes(part) != bytes(tmem):
                        errors.append(f"peer {k}: bytes differ")
                        return

            ths = [threading.Thread(target=pull, args=(k,)) for k in range(4)]
            for t in ths:
                t.start()
            for t in ths:
                t.join(60)
            assert not errors
            peers = [p for p in transport(eng, "tcp")._all_peers()]
            assert len({id(p.progress) for p in peers}) == 4  # a driver role per peer
    finally:
        for t in targets:
            t.close()


# -- spinning -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_process(monkeypatch):
    state = spin._Process()
    monkeypatch.setattr(spin, "PROCESS", state)
    return state


def test_a_spin_window_shrinks_when_nothing_comes_and_grows_when_it_would_have_paid(fresh_process, monkeypatch):
    monkeypatch.setattr(spin, "_run_delay", lambda: 0.0)
    s = spin.Spinner(1000)
    assert s.after_traffic(1.0) == pytest.approx(1e-3)
    s.wasted()
    s.wasted()
    assert s.after_traffic(1.1) == pytest.approx(250e-6)
    for _ in range(10):
        s.wasted()
    assert s.window == 0 and s.after_traffic(1.2) == 0  # nothing left to spin ...
    s.woke(0.2e-3)  # ... until a blocking wait ends within the limit: the window covers that gap again
    assert s.after_traffic(1.3) == pytest.approx(0.4e-3)
    s.woke(5e-3)  # later than the limit: spinning would not have caught it
    assert s.window == pytest.approx(0.4e-3)
    s.wasted()
    s.woke(10e-6)  # a short gap still at least doubles the window
    assert s.window == pytest.approx(0.4e-3)
    s.woke(0.9e-3)
    assert s.window == pytest.approx(1e-3)  # never past the limit


def test_one_thread_of_a_process_spins_at_a_time(fresh_process, monkeypatch):
    monkeypatch.setattr(spin, "_run_delay", lambda: 0.0)
    first, second = spin.Spinner(1000), spin.Spinner(1000)
    assert first.after_traffic(1.0) > 0
    assert second.after_traffic(1.0) == 0  # the slot is taken: this one blocks at once
    first.wasted()
    assert second.after_traffic(1.001) > 0


def test_spinning_stops_for_the_whole_process_when_a_spinner_waits_for_a_cpu(fresh_process, monkeypatch):
    delay = [0.0]
    monkeypatch.setattr(spin, "_run_delay", lambda: delay[0])
    s, other = spin.Spinner(1000), spin.Spinner(1000)
    now = 1.0
    assert s.after_traffic(now) > 0
    for _ in range(spin._LOOKS):  # looks running, each finding it waited half the time since the last
        now += 0.01
        delay[0] += 0.005
        s.after_traffic(now)
    assert s.after_traffic(now + 0.001) == 0
    assert other.after_traffic(now + 0.001) == 0  # the whole process backs off ...
    assert other.after_traffic(now + spin._BACK_OFF + 0.01) > 0  # ... for a while


def test_a_look_now_and_then_that_finds_a_wait_for_a_cpu_does_not_stop_spinning(fresh_process, monkeypatch):
    """Only _LOOKS looks running that find the thread waiting for a CPU mean contention: the engine's own threads
    on a small machine wait that much at a few looks in a hundred."""
    delay = [0.0]
    monkeypatch.setattr(spin, "_run_delay", lambda: delay[0])
    s = spin.Spinner(1000)
    now = 1.0
    s.after_traffic(now)
    for look in range(100):
        now += 0.01
        if look % spin._LOOKS:  # contended at all but one look in every _LOOKS
            delay[0] += 0.005
        assert s.after_traffic(now) > 0, look
