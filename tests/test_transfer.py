"""Two-process transfers over TCP: random bytes written and read back, single and batched, sync and async."""

from __future__ import annotations

import asyncio
import os
import random
import threading

from helpers.memory import sha
from moonlet import EngineConfig, Op, Request, State, TransferEngine


def test_write_then_read_random_ranges(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    rng = random.Random(1)
    for _ in range(40):
        n = rng.choice([1, 7, 4096, rng.randrange(1, 3 << 20)])
        lo = rng.randrange(0, buf.length - n)
        ro = rng.randrange(0, peer.size - n)
        mem[lo:lo + n] = os.urandom(n)
        status = engine.write(buf.addr + lo, seg, peer.addr + ro, n)
        assert status.ok and status.transport == engine.config.transports[0]
        assert peer.digest(peer.addr + ro, n) == sha(mem[lo:lo + n])  # checked inside the target
        back = rng.randrange(0, buf.length - n)
        mem[back:back + n] = os.urandom(n)  # scribble so a read that moves nothing is caught
        engine.read(buf.addr + back, seg, peer.addr + ro, n)
        assert mem[back:back + n] == mem[lo:lo + n]


def test_batch_of_mixed_reads_and_writes(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    # Reads fetch what the target already holds; writes put fresh bytes in disjoint ranges.
    before = {}
    reqs = []
    for i in range(64):
        n = 4096 + i * 97
        ro = i * (256 << 10)
        lo = i * (512 << 10)
        if i % 2:
            mem[lo:lo + n] = os.urandom(n)
            reqs.append(Request(Op.WRITE, buf.addr + lo, seg, peer.addr + ro, n))
        else:
            before[i] = peer.digest(peer.addr + ro, n)
            reqs.append(Request(Op.READ, buf.addr + lo, seg, peer.addr + ro, n))
    statuses = engine.submit(reqs).wait()
    assert [s.state for s in statuses] == [State.COMPLETED] * 64
    for i, r in enumerate(reqs):
        lo = r.local_addr - buf.addr
        if r.op is Op.WRITE:
            assert peer.digest(r.remote_addr, r.length) == sha(mem[lo:lo + r.length])
        else:
            assert sha(mem[lo:lo + r.length]) == before[i]


def test_large_request_is_sliced_and_lands_whole(local, peer):
    with TransferEngine(config=EngineConfig(slice_size=1 << 20, lanes=3)) as eng:
        mem = bytearray(os.urandom(40 << 20))
        buf = eng.register(mem)
        seg = eng.open_segment(peer.name)
        eng.write(buf.addr, seg, peer.addr + 12345, 40 << 20)
        assert peer.digest(peer.addr + 12345, 40 << 20) == sha(mem)
        mem[:] = bytes(40 << 20)
        eng.read(buf.addr, seg, peer.addr + 12345, 40 << 20)
        assert peer.digest(peer.addr + 12345, 40 << 20) == sha(mem)


def test_async_forms(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)

    async def main():
        mem[:8192] = os.urandom(8192)
        await engine.write_async(buf.addr, seg, peer.addr, 8192)
        await engine.read_async(buf.addr + 65536, seg, peer.addr, 8192)
        batch = engine.submit([Request(Op.READ, buf.addr + (1 << 20) + i * 4096, seg, peer.addr + i * 1024, 1024)
                               for i in range(8)])
        return await batch

    statuses = asyncio.run(main())
    assert all(s.ok for s in statuses)
    assert mem[65536:65536 + 8192] == mem[:8192]
    for i in range(8):
        assert mem[(1 << 20) + i * 4096:(1 << 20) + i * 4096 + 1024] == mem[i * 1024:(i + 1) * 1024]


def test_concurrent_batches_from_threads(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    errors = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        base = t * (8 << 20)
        try:
            for _ in range(30):
                reqs = []
                for j in range(rng.randrange(1, 40)):
                    n = rng.randrange(1, 64 << 10)
                    off = base + j * (128 << 10)
                    mem[off:off + n] = os.urandom(n)
                    reqs.append(Request(Op.WRITE, buf.addr + off, seg, peer.addr + off, n))
                engine.submit(reqs).check()
                for r in reqs:  # read back into the upper half and compare
                    engine.read(r.local_addr + (32 << 20), seg, r.remote_addr, r.length)
                    lo = r.local_addr - buf.addr
                    assert mem[lo + (32 << 20):lo + (32 << 20) + r.length] == mem[lo:lo + r.length]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors


def test_poll_reaches_completion_without_wait(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    mem[:4096] = os.urandom(4096)
    batch = engine.submit([Request(Op.WRITE, buf.addr, seg, peer.addr, 4096)])
    for _ in range(100000):
        if batch.poll()[0].state is not State.PENDING:
            break
    assert batch.poll()[0].ok
    assert peer.digest(peer.addr, 4096) == sha(mem[:4096])


def test_transfer_to_own_segment_is_a_checked_memcpy():
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(1 << 20))
        buf = eng.register(mem)
        ro_mem = bytearray(os.urandom(8192))
        ro = eng.register(ro_mem, remote_write=False)
        st = eng.write(buf.addr, eng.name, buf.addr + 65536, 4096)
        assert st.transport == "local" and mem[65536:65536 + 4096] == mem[:4096]
        eng.read(buf.addr + 8192, eng.name, ro.addr, 8192)
        assert mem[8192:16384] == ro_mem
        statuses = eng.submit([Request(Op.WRITE, buf.addr, eng.name, ro.addr, 10),
                               Request(Op.WRITE, buf.addr, eng.name, buf.addr + (1 << 20) - 5, 10)]).wait()
        assert statuses[0].state is State.FAILED and "does not allow" in statuses[0].reason
        assert statuses[1].state is State.FAILED and "not inside a registered buffer" in statuses[1].reason


def test_peer_registering_more_memory_is_picked_up(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    extra = peer.call("register 1048576")["addr"]
    mem[:1000] = os.urandom(1000)
    engine.write(buf.addr, seg, extra + 10, 1000)  # the cached descriptor misses: re-fetched
    assert peer.digest(extra + 10, 1000) == sha(mem[:1000])


def test_restarted_peer_is_picked_up(engine, local, peer_factory):
    first = peer_factory()
    seg = engine.open_segment(first.name)
    buf, mem = local
    engine.write(buf.addr, seg, first.addr, 4096)
    port = first.name.rsplit(":", 1)[1]
    first.kill()
    second = peer_factory("--port", port, "--size", str(8 << 20))
    assert second.name == first.name
    mem[:4096] = os.urandom(4096)
    # If the new buffer lies where the old one did, the cache does not miss and the first
    # request meets the changed instance: it fails saying so, and the segment is re-resolved.
    first_try = engine.submit([Request(Op.WRITE, buf.addr, seg, second.addr, 4096)]).wait()[0]
    if not first_try.ok:
        assert "restarted" in first_try.reason or "lost" in first_try.reason, first_try.reason
        engine.write(buf.addr, seg, second.addr, 4096)
    assert second.digest(second.addr, 4096) == sha(mem[:4096])


def test_unregistered_buffer_is_not_reachable(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    extra = peer.call("register 65536")["addr"]
    engine.write(buf.addr, seg, extra, 100)
    peer.call(f"unregister {extra}")
    st = engine.submit([Request(Op.WRITE, buf.addr, seg, extra, 100)]).wait()[0]
    assert st.state is State.FAILED
    assert "not inside a registered buffer" in st.reason
