"""Faults between "hosts" (network namespaces on a bridge, see netbed.py): kills, cut links, loss, jitter.

Every target engine runs in its own namespace; this process is the initiator
and reaches them over TCP through the bridge.  Every byte a request reports
COMPLETED is checked; a request may fail under faults, but never completes
with wrong bytes, and nothing hangs past its deadline.

Needs root and ``tc netem`` (the kernel module): tests/lab.sh provides both.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest
from netbed import NetBed, why_not

from helpers.engines import initiator
from helpers.memory import register_random, sha
from helpers.procs import PeerProcess
from moonlet import EngineConfig, TransferEngine
from moonlet.batch import Op, Request, State

WHY = why_not()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"no fault bed here: {WHY}")

SOAK_SECONDS = float(os.environ.get("MOONLET_SOAK_SECONDS", "60"))


@pytest.fixture(scope="module")
def bed():
    b = NetBed(4)
    yield b
    b.close()


def on_host(bed: NetBed, i: int, *args: str) -> PeerProcess:
    return PeerProcess("--size", str(32 << 20), "--config", json.dumps({"listen_host": bed.ip(i)}), *args,
                       prefix=tuple(bed.prefix(i)))


@pytest.fixture(scope="module")
def targets(bed):
    """A target engine on hosts 1..3, kept for the module (a process start costs seconds in the lab)."""
    peers = [on_host(bed, i) for i in range(1, 4)]
    yield peers
    for p in peers:
        p.close()


@pytest.fixture
def hosts(bed, targets):
    """The module's targets, with every link up and clean."""
    for i in range(1, 5):
        bed.clear(i)
        bed.link(i, True)
    return targets


def retransmitted_segments() -> int:
    """TCP segments this namespace retransmitted so far (/proc/net/snmp RetransSegs)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")])


def test_kill_9_mid_batch_fails_its_requests_and_spares_other_peers(bed, hosts):
    victim, other = on_host(bed, 4), hosts[1]
    with initiator(request_timeout=10.0, connect_timeout=2.0) as eng:
        buf, mem = register_random(eng, 32 << 20)
        sv, so = eng.open_segment(victim.name), eng.open_segment(other.name)
        to_victim = eng.submit([Request(Op.WRITE, buf.addr + (i % 16) * (1 << 20), sv, victim.addr + i * (1 << 20),
                                        1 << 20) for i in range(24)], timeout=8.0)
        to_other = eng.submit([Request(Op.WRITE, buf.addr + (i % 16) * (1 << 20), so, other.addr + i * (1 << 20),
                                       1 << 20) for i in range(24)], timeout=30.0)
        start = time.monotonic()
        victim.kill()
        statuses = to_victim.wait()
        assert time.monotonic() - start < 9.0
        assert all(s.state in (State.COMPLETED, State.FAILED, State.TIMEOUT) for s in statuses)
        assert all(s.reason for s in statuses if not s.ok)
        assert all(s.ok for s in to_other.wait())
        for i in random.sample(range(24), 8):
            assert other.digest(other.addr + i * (1 << 20), 1 << 20) == sha(mem[(i % 16) << 20:((i % 16) + 1) << 20])


def test_link_cut_and_restored(bed, hosts):
    target = hosts[0]
    with initiator(request_timeout=10.0, connect_timeout=2.0) as eng:
        buf, mem = register_random(eng, 32 << 20)
        seg = eng.open_segment(target.name)
        eng.write(buf.addr, seg, target.addr, 4096)  # lanes are up
        batch = eng.submit([Request(Op.WRITE, buf.addr + i * (1 << 20), seg, target.addr + i * (1 << 20), 1 << 20)
                            for i in range(24)], timeout=4.0)
        bed.link(1, False)
        start = time.monotonic()
        statuses = batch.wait()
        assert time.monotonic() - start < 5.5  # the deadline holds on a dead link
        bed.link(1, True)
        for i, s in enumerate(statuses):
            assert s.state in (State.COMPLETED, State.TIMEOUT, State.FAILED), s
            if s.ok:  # anything reported complete really landed
                assert target.digest(target.addr + i * (1 << 20), 1 << 20) == sha(mem[i << 20:(i + 1) << 20])
        # the same engine carries on once the link is back: no restart, correct bytes both ways
        mem[:1 << 20] = os.urandom(1 << 20)
        eng.write(buf.addr, seg, target.addr, 1 << 20, timeout=20.0)
        assert target.digest(target.addr, 1 << 20) == sha(mem[:1 << 20])
        eng.read(buf.addr + (8 << 20), seg, target.addr, 1 << 20, timeout=20.0)
        assert sha(mem[8 << 20:9 << 20]) == sha(mem[:1 << 20])


def test_soak_under_loss_and_jitter(bed, hosts):
    """Several threads, several peers, mixed READ/WRITE, 5% loss and 10 ms jitter on every link."""
    for i in range(1, 4):
        bed.netem(i, "delay", "10ms", "10ms", "loss", "5%")
    threads, region = 4, 8 << 20  # each thread owns an 8 MiB region on every peer
    counts = {"requests": 0, "bytes": 0, "failures": 0, "data_errors": 0}
    lock = threading.Lock()
    resent = retransmitted_segments()
    with initiator(request_timeout=30.0, connect_timeout=2.0) as eng:
        segs = [eng.open_segment(h.name) for h in hosts]

        def worker(t: int) -> None:
            rng = random.Random(t)
            buf, mem = register_random(eng, 2 * region)
            src, dst = 0, region
            mine = {"requests": 0, "bytes": 0, "failures": 0, "data_errors": 0}
            end = time.monotonic() + SOAK_SECONDS
            while time.monotonic() < end:
                p = rng.randrange(len(hosts))
                base = hosts[p].addr + t * region
                slots = rng.sample(range(8), rng.randint(1, 6))
                sizes = [rng.choice((4096, 65536, rng.randrange(1, 1 << 20))) for _ in slots]
                offs = [rng.randrange(0, region - n) for n in sizes]  # local source: random bytes at random places
                writes = [Request(Op.WRITE, buf.addr + src + o, segs[p], base + s * (1 << 20), n)
                          for o, s, n in zip(offs, slots, sizes)]
                wst = eng.submit(writes).wait()
                done = [k for k, s in enumerate(wst) if s.ok]
                reads = [Request(Op.READ, buf.addr + dst + s * (1 << 20), segs[p], base + s * (1 << 20), n)
                         for k, (s, n) in enumerate(zip(slots, sizes)) if k in done]
                rst = eng.submit(reads).wait() if reads else []
                mine["requests"] += len(writes) + len(reads)
                mine["failures"] += sum(not s.ok for s in wst) + sum(not s.ok for s in rst)
                for k, s in zip(done, rst):
                    n, o, slot = sizes[k], offs[k], slots[k]
                    mine["bytes"] += 2 * n
                    if s.ok and mem[dst + slot * (1 << 20):dst + slot * (1 << 20) + n] != mem[src + o:src + o + n]:
                        mine["data_errors"] += 1
            with lock:
                for k, v in mine.items():
                    counts[k] += v

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(SOAK_SECONDS + 120)
        assert not any(th.is_alive() for th in pool)
        counts["frame_retries"] = eng.stats()["tcp_retries"]
        counts["tcp_segments_retransmitted"] = retransmitted_segments() - resent
    for i in range(1, 4):
        bed.clear(i)
    report = {"seconds": SOAK_SECONDS, "threads": threads, "peers": len(hosts),
              "netem": "delay 10ms 10ms loss 5% (both directions)", **counts}
    print("SOAK", json.dumps(report))
    if os.environ.get("MOONLET_SOAK_REPORT"):
        with open(os.environ["MOONLET_SOAK_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert counts["data_errors"] == 0
    assert counts["requests"] > 0 and counts["bytes"] > 0


def test_metadata_store_restart_mid_run(bed, peer_factory, tmp_path):
    """etcd restarts while transfers run: they go on with known peers, and descriptors come back."""
    from helpers.stores import Store

    store = Store("etcd", str(tmp_path), host=bed.ip(0)).start()
    try:
        target = peer_factory("--metadata", store.url, "--name", "target-1", "--ttl", "3", "--config",
                              json.dumps({"listen_host": bed.ip(1)}), prefix=tuple(bed.prefix(1)))
        with TransferEngine("initiator-0", store.url, config=EngineConfig(transports=("tcp",),
                                                                          metadata_ttl=3.0)) as eng:
            buf, mem = register_random(eng, 4 << 20)
            seg = eng.open_segment("target-1")
            store.stop()
            for k in range(5):  # the store is down: transfers to a resolved peer go on
                mem[:65536] = os.urandom(65536)
                eng.write(buf.addr, seg, target.addr + k * 65536, 65536)
                assert target.digest(target.addr + k * 65536, 65536) == sha(mem[:65536])
            store.start()
            deadline = time.monotonic() + 20
            while True:  # the target's keepalive re-publishes its descriptor under a new lease
                try:
                    with TransferEngine("initiator-1", store.url, config=EngineConfig(transports=("tcp",))) as fresh:
                        fresh.open_segment("target-1")
                        break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            eng.write(buf.addr, seg, target.addr, 65536)
            assert target.digest(target.addr, 65536) == sha(mem[:65536])
    finally:
        store.stop()
