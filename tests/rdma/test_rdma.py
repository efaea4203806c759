"""The RDMA transport against a real verbs device (soft-RoCE in tests/lab.sh, or a real NIC).

Every test moves random bytes between this process and a target engine in
another process and checks them by hash on the target's side.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import re
import subprocess
import time

import pytest

from helpers.engines import initiator, transport
from helpers.memory import random_mmap, register_random, sha
from helpers.procs import PeerProcess, open_fds
from moonlet import EngineConfig, TransferEngine
from moonlet.batch import Op, Request, State
from moonlet.transport.rdma import verbs

WHY = verbs.unavailable_reason()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"no RDMA device here ({WHY}); run tests/lab.sh")


@pytest.fixture(scope="module")
def target():
    """One target engine in another process for the whole module (a process start costs seconds in the lab)."""
    p = PeerProcess()
    yield p
    p.close()


@pytest.fixture
def rdma():
    with initiator(transports=("rdma",), request_timeout=10.0) as eng:
        yield eng


@pytest.fixture
def mem(rdma):
    return register_random(rdma, 64 << 20)


def test_descriptor_lists_nics_and_rkeys(rdma, mem):
    d = rdma.descriptor()
    assert d.nics and d.nics[0]["name"] in verbs.device_names()
    assert "rdma" in d.endpoints
    assert set(d.buffers[0]["rkeys"]) == {n["name"] for n in d.nics}


@pytest.mark.parametrize("size", [1, 4095, 65536, 1 << 20, 20 << 20 | 123])
def test_write_then_read_back(rdma, mem, target, size):
    buf, view = mem
    seg = rdma.open_segment(target.name)
    off, roff = random.randrange(0, 4096), random.randrange(0, 4096)
    view[off:off + size] = os.urandom(size)
    st = rdma.write(buf.addr + off, seg, target.addr + roff, size)
    assert st.transport == "rdma"
    assert target.digest(target.addr + roff, size) == sha(view[off:off + size])
    theirs = target.digest(target.addr + roff, size)
    view[32 << 20:(32 << 20) + size] = os.urandom(size)  # overwritten by the read
    rdma.read(buf.addr + (32 << 20), seg, target.addr + roff, size)
    assert sha(view[32 << 20:(32 << 20) + size]) == theirs


def test_batches_of_scattered_blocks(rdma, mem, target):
    buf, view = mem
    seg = rdma.open_segment(target.name)
    n, block = 300, 4096
    src = random.sample(range(1024), n)
    dst = random.sample(range(2048), n)
    reqs = [Request(Op.WRITE, buf.addr + s * block, seg, target.addr + d * block, block) for s, d in zip(src, dst)]
    statuses = rdma.submit(reqs).wait()
    assert all(s.ok and s.transport == "rdma" for s in statuses)
    for s, d in random.sample(list(zip(src, dst)), 20):
        assert target.digest(target.addr + d * block, block) == sha(view[s * block:(s + 1) * block])
    # and back, with submit_many, into another part of local memory
    base = 48 << 20
    view[base:base + n * block] = os.urandom(n * block)
    batch = rdma.submit_many(Op.READ, seg, [buf.addr + base + i * block for i in range(n)],
                             [target.addr + d * block for d in dst], [block] * n)
    assert all(s.ok for s in batch.wait())
    for i in random.sample(range(n), 20):
        assert sha(view[base + i * block:base + (i + 1) * block]) == sha(view[src[i] * block:(src[i] + 1) * block])


def test_buffers_registered_as_several_regions(peer_factory):
    """Large buffers are pinned as several memory regions; requests are cut at region edges on both sides."""
    chunk = 1 << 20
    target = peer_factory("--size", str(8 << 20), "--config", json.dumps({"rdma_mr_chunk": chunk}))
    cfg = EngineConfig(transports=("rdma",), rdma_mr_chunk=3 * chunk, slice_size=4 << 20)
    with TransferEngine(config=cfg) as eng:
        buf, m = register_random(eng, 16 << 20)
        assert len(buf.share["rkeys"][eng.descriptor().nics[0]["name"]]) == 6
        seg = eng.open_segment(target.name)
        assert len(seg.buffers[0].rkeys[eng.descriptor().nics[0]["name"]]) == 8
        for _ in range(6):
            n = random.randrange(1, 6 << 20)
            lo, ro = random.randrange(0, (16 << 20) - n), random.randrange(0, (8 << 20) - n)
            eng.write(buf.addr + lo, seg, target.addr + ro, n)
            assert target.digest(target.addr + ro, n) == sha(m[lo:lo + n])
            m[lo:lo + n] = os.urandom(n)
            eng.read(buf.addr + lo, seg, target.addr + ro, n)
            assert target.digest(target.addr + ro, n) == sha(m[lo:lo + n])


def test_bad_rkey_fails_with_reason_and_spares_the_rest(rdma, mem, target):
    buf, view = mem
    seg = rdma.open_segment(target.name)
    before = target.digest(target.addr, 1 << 20)
    d = seg.descriptor
    good = dict(d.buffers[0])
    forged = dict(good, rkeys={k: [x ^ 0x5A5A for x in v] for k, v in good["rkeys"].items()},
                  addr=good["addr"] + (60 << 20), length=1 << 20)
    d.buffers = [dict(good, length=60 << 20), forged]
    seg.update(d)
    reqs = [Request(Op.WRITE, buf.addr + i * 65536, seg, good["addr"] + (1 << 20) + i * 65536, 65536)
            for i in range(8)]
    reqs.insert(3, Request(Op.WRITE, buf.addr, seg, forged["addr"], 4096))
    statuses = rdma.submit(reqs).wait()
    assert statuses[3].state is State.FAILED and "refused access" in statuses[3].reason
    assert [s.state for i, s in enumerate(statuses) if i != 3] == [State.COMPLETED] * 8
    assert target.digest(good["addr"] + (1 << 20), 8 * 65536) == sha(view[:8 * 65536])
    assert target.digest(target.addr, 1 << 20) == before
    # the engine recovered: later transfers work without reopening anything
    view[:4096] = os.urandom(4096)
    rdma.write(buf.addr, seg, target.addr, 4096)
    assert target.digest(target.addr, 4096) == sha(view[:4096])


def test_out_of_range_remote_address(rdma, mem, target):
    buf, _ = mem
    seg = rdma.open_segment(target.name)
    st = rdma.submit([Request(Op.READ, buf.addr, seg, target.addr + target.size, 4096)]).wait()[0]
    assert st.state is State.FAILED and "not inside a registered buffer" in st.reason
    # a descriptor forged to claim more: the target's NIC enforces the region's real bounds
    seg.descriptor.buffers[0] = dict(seg.descriptor.buffers[0], length=target.size + (1 << 20))
    seg.update(seg.descriptor)
    before = target.digest(target.addr, target.size)
    st = rdma.submit([Request(Op.WRITE, buf.addr, seg, target.addr + target.size - 2048, 4096)]).wait()[0]
    assert st.state is State.FAILED and "refused access" in st.reason
    assert target.digest(target.addr, target.size) == before


def test_read_only_buffer_refuses_writes(rdma, mem, peer_factory):
    buf, _ = mem
    ro = peer_factory("--read-only")
    seg = rdma.open_segment(ro.name)
    before = ro.digest(ro.addr, 1 << 20)
    st = rdma.submit([Request(Op.WRITE, buf.addr, seg, ro.addr, 4096)]).wait()[0]
    assert st.state is State.FAILED and "does not allow this access" in st.reason
    # a descriptor forged to say writable: the memory region itself lacks REMOTE_WRITE
    seg.descriptor.buffers[0] = dict(seg.descriptor.buffers[0], remote_write=True)
    seg.update(seg.descriptor)
    st = rdma.submit([Request(Op.WRITE, buf.addr, seg, ro.addr, 4096)]).wait()[0]
    assert st.state is State.FAILED and "refused access" in st.reason
    assert ro.digest(ro.addr, 1 << 20) == before
    rdma.read(buf.addr, seg, ro.addr, 4096)  # reading is allowed


def test_peer_killed_mid_batch(rdma, mem, peer_factory):
    buf, _ = mem
    victim, other = peer_factory(), peer_factory()
    seg_v, seg_o = rdma.open_segment(victim.name), rdma.open_segment(other.name)
    rdma.write(buf.addr, seg_v, victim.addr, 4096)  # connected
    reqs = [Request(Op.WRITE, buf.addr + (i % 32) * (1 << 20), seg_v, victim.addr + (i % 60) * (1 << 20), 1 << 20)
            for i in range(1500)]  # longer than the test on soft-RoCE: the kill lands mid-batch
    start = time.monotonic()
    batch = rdma.submit(reqs, timeout=30.0)
    time.sleep(0.3)
    victim.kill()
    statuses = batch.wait()
    elapsed = time.monotonic() - start
    assert elapsed < 20.0  # the death is noticed, not waited out
    assert all(s.state is not State.PENDING for s in statuses)
    failed = [s for s in statuses if not s.ok]
    assert failed and all(s.state is State.FAILED and "peer" in s.reason for s in failed), {s.reason for s in failed}
    # the other peer is unaffected
    rdma.write(buf.addr, seg_o, other.addr, 1 << 20)
    assert other.digest(other.addr, 1 << 20) == sha(mem[1][:1 << 20])


def _qp_count() -> int:
    out = subprocess.run(["rdma", "resource", "show"], capture_output=True, text=True).stdout
    return sum(int(m) for m in re.findall(r"\bqp (\d+)", out))


def test_queue_pairs_torn_down_over_100_open_close_cycles(target):
    data = mmap.mmap(-1, 1 << 20)
    with TransferEngine(config=EngineConfig(transports=("rdma",))) as warm:  # first-use costs out of the way
        warm.write(warm.register(data).addr, warm.open_segment(target.name), target.addr, 4096)
    qps, fds = _qp_count(), open_fds()
    for i in range(100):
        data[:4096] = os.urandom(4096)
        with TransferEngine(config=EngineConfig(transports=("rdma",))) as eng:
            eng.write(eng.register(data).addr, eng.open_segment(target.name), target.addr + i * 4096, 4096)
        assert target.digest(target.addr + i * 4096, 4096) == sha(data[:4096])
    time.sleep(0.5)  # the target tears its half down when the control connection closes
    assert _qp_count() == qps
    assert open_fds() <= fds + 2


def test_unreachable_rdma_falls_back_to_tcp(mem, target):
    with TransferEngine(config=EngineConfig(request_timeout=10.0, transports=("rdma", "tcp"))) as eng:
        buf, m = register_random(eng, 1 << 20)
        seg = eng.open_segment(target.name)
        d = seg.descriptor
        d.nics = [dict(d.nics[0], name="no-such-nic")]
        d.buffers[0] = dict(d.buffers[0], rkeys={"no-such-nic": [1]})
        seg.update(d)
        st = eng.write(buf.addr, seg, target.addr, 1 << 20)
        assert st.transport == "tcp"
        assert target.digest(target.addr, 1 << 20) == sha(m[:])


def test_deadline_passes_mid_transfer(rdma, mem, target):
    buf, view = mem
    seg = rdma.open_segment(target.name)
    reqs = [Request(Op.WRITE, buf.addr, seg, target.addr, 32 << 20) for _ in range(8)]  # slow on soft-RoCE
    statuses = rdma.submit(reqs, timeout=0.3).wait()
    assert all(s.state in (State.COMPLETED, State.TIMEOUT) for s in statuses)
    assert any(s.state is State.TIMEOUT for s in statuses)
    view[:4096] = os.urandom(4096)
    rdma.write(buf.addr, seg, target.addr, 4096)  # the QP was replaced
    assert target.digest(target.addr, 4096) == sha(view[:4096])


def test_queue_pairs_need_the_cluster_secret(peer_factory):
    from moonlet import MetadataServer

    secret = "rdma cluster secret, 32 bytes.."
    with MetadataServer() as server:
        target = peer_factory("--metadata", server.url, "--name", "guarded", "--config",
                              json.dumps({"secret": secret}))
        before = target.digest(target.addr, 1 << 20)
        m = random_mmap(1 << 20)
        with TransferEngine("stranger", server.url, config=EngineConfig(transports=("rdma",))) as eng:
            st = eng.submit([Request(Op.WRITE, eng.register(m).addr, eng.open_segment("guarded"), target.addr,
                                     1 << 20)]).wait()[0]
            assert st.state is State.FAILED and "authentication required" in st.reason
        assert target.digest(target.addr, 1 << 20) == before
        with TransferEngine("friend", server.url, config=EngineConfig(transports=("rdma",), secret=secret)) as eng:
            st = eng.write(eng.register(m).addr, eng.open_segment("guarded"), target.addr, 1 << 20)
            assert st.transport == "rdma"
        assert target.digest(target.addr, 1 << 20) == sha(m[:])


def test_memory_the_nic_cannot_register_says_why(rdma, target):
    import ctypes

    m = mmap.mmap(-1, 1 << 16)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(addr), 1 << 16, 0) == 0  # no access: ibv_reg_mr refuses it
    buf = rdma.register(addr, 1 << 16)
    st = rdma.submit([Request(Op.WRITE, buf.addr, rdma.open_segment(target.name), target.addr, 4096)]).wait()[0]
    assert st.state is State.FAILED and "could not register it" in st.reason, st.reason


def test_a_broken_rdma_path_moves_its_requests_to_tcp(target):
    """QPs fail mid-batch and new ones are refused: the flushed slices finish over TCP, bytes intact."""
    cfg = EngineConfig(transports=("rdma", "tcp"), request_timeout=30.0)
    with TransferEngine(config=cfg) as eng:
        buf, m = register_random(eng, 64 << 20)
        seg = eng.open_segment(target.name)
        eng.write(buf.addr, seg, target.addr, 4096)  # queue pairs up
        rdma = transport(eng, "rdma")
        for ep in rdma._endpoints.values():  # from now on the target refuses new queue pairs for this NIC
            ep.nic = dict(ep.nic, name="no-such-nic")
        reqs = [Request(Op.WRITE, buf.addr + i * (1 << 20), seg, target.addr + i * (1 << 20), 1 << 20)
                for i in range(48)]
        batch = eng.submit(reqs)
        for dev in rdma._devices.values():  # the NIC path breaks with most of the batch in flight
            with dev.lock:
                for q in list(dev.qps.values()):
                    q.fail("test: NIC path broken")
        statuses = batch.wait()
        assert all(s.ok for s in statuses), [s for s in statuses if not s.ok][:3]
        assert any(s.transport == "tcp" for s in statuses)
        assert target.digest(target.addr, 48 << 20) == sha(m[:48 << 20])
