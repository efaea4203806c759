"""Every failure is reported with the right error and a reason, within its timeout, and harms nothing else."""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time

import pytest

from helpers.memory import sha
from moonlet import (
    ConfigError,
    EngineConfig,
    MemoryAccessError,
    MetadataError,
    Op,
    RegistrationError,
    Request,
    SegmentError,
    State,
    TransferEngine,
    TransferError,
)
from moonlet.transport.tcp import protocol as P


def test_unknown_segment_p2p(engine):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(MetadataError, match="cannot fetch the descriptor"):
        engine.open_segment(f"127.0.0.1:{port}")
    with pytest.raises(SegmentError, match="not host:port"):
        engine.open_segment("node-a")


def test_unknown_segment_http(metadata_server):
    with TransferEngine("a", metadata_server.url) as eng:
        with pytest.raises(SegmentError, match="unknown segment 'nobody'"):
            eng.open_segment("nobody")


def test_out_of_bounds_remote(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    before = peer.digest(peer.addr, peer.size)
    with pytest.raises(TransferError, match="not inside a registered buffer") as e:
        engine.write(buf.addr, seg, peer.addr + peer.size - 10, 100)
    assert e.value.statuses[0].state is State.FAILED
    # A range past the end of the address space, and one below the buffer.
    for addr in (peer.addr - 4096, (1 << 64) - 50):
        st = engine.submit([Request(Op.WRITE, buf.addr, seg, addr, 100)]).wait()[0]
        assert st.state is State.FAILED and "not inside a registered buffer" in st.reason
    assert peer.digest(peer.addr, peer.size) == before  # nothing touched


def test_target_refuses_what_a_stale_cache_allowed(engine, local, peer):
    """The target checks every range itself: a forged descriptor cannot reach unregistered memory."""
    buf, _ = local
    seg = engine.open_segment(peer.name)
    before = peer.digest(peer.addr, peer.size)
    forged = dict(seg.descriptor.buffers[0], length=peer.size * 4)
    seg.descriptor.buffers[0] = forged
    seg.update(seg.descriptor)
    st = engine.submit([Request(Op.WRITE, buf.addr, seg, peer.addr + peer.size, 4096)]).wait()[0]
    assert st.state is State.FAILED
    assert "refused" in st.reason and "not inside a registered buffer" in st.reason
    st = engine.submit([Request(Op.READ, buf.addr, seg, peer.addr + peer.size + 8, 64)]).wait()[0]
    assert st.state is State.FAILED
    assert peer.digest(peer.addr, peer.size) == before


def test_one_bad_request_does_not_spoil_the_batch(engine, local, peer):
    buf, mem = local
    seg = engine.open_segment(peer.name)
    mem[:8192] = os.urandom(8192)
    seg.descriptor.buffers[0] = dict(seg.descriptor.buffers[0], length=peer.size + 4096)
    seg.update(seg.descriptor)
    reqs = [Request(Op.WRITE, buf.addr, seg, peer.addr, 4096),
            Request(Op.WRITE, buf.addr, seg, peer.addr + peer.size, 4096),  # refused by the target
            Request(Op.WRITE, buf.addr + 4096, seg, peer.addr + 4096, 4096)]
    states = [s.state for s in engine.submit(reqs).wait()]
    assert states == [State.COMPLETED, State.FAILED, State.COMPLETED]
    assert peer.digest(peer.addr, 8192) == sha(mem[:8192])


def test_read_only_remote_buffer(engine, local, peer_factory):
    ro = peer_factory("--read-only")
    buf, mem = local
    seg = engine.open_segment(ro.name)
    before = ro.digest(ro.addr, 4096)
    st = engine.submit([Request(Op.WRITE, buf.addr, seg, ro.addr, 4096)]).wait()[0]
    assert st.state is State.FAILED and "does not allow" in st.reason
    assert ro.digest(ro.addr, 4096) == before
    engine.read(buf.addr, seg, ro.addr, 4096)
    assert sha(mem[:4096]) == before


def test_unregistered_local_memory(engine, peer):
    seg = engine.open_segment(peer.name)
    stray = bytearray(4096)
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(stray))
    with pytest.raises(MemoryAccessError, match="local range .* is not inside a registered buffer"):
        engine.write(addr, seg, peer.addr, 4096)


def test_zero_and_negative_length(engine, local, peer):
    buf, _ = local
    seg = engine.open_segment(peer.name)
    with pytest.raises(MemoryAccessError, match="length must be positive"):
        engine.write(buf.addr, seg, peer.addr, 0)
    with pytest.raises(MemoryAccessError, match="length must be positive"):
        engine.submit([Request(Op.READ, buf.addr, seg, peer.addr, -5)])
    with pytest.raises(TransferError, match="op must be"):
        engine.submit([Request("write", buf.addr, seg, peer.addr, 5)])


def test_bad_segment_reference(engine, local, peer):
    """A request whose segment is neither a Segment nor a name is refused naming it, first or later in a batch."""
    buf, _ = local
    seg = engine.open_segment(peer.name)
    for ref in (None, 42):
        with pytest.raises(SegmentError, match=f"segment must be a Segment .* got {ref!r}"):
            engine.submit([Request(Op.WRITE, buf.addr, ref, peer.addr, 16)])
        with pytest.raises(SegmentError, match=f"segment must be a Segment .* got {ref!r}"):
            engine.submit([Request(Op.WRITE, buf.addr, seg, peer.addr, 16),
                           Request(Op.WRITE, buf.addr, ref, peer.addr, 16)])


def test_registration_errors(engine):
    mem = mmap.mmap(-1, 1 << 20)
    buf = engine.register(mem)
    with pytest.raises(RegistrationError, match="already registered"):
        engine.register(buf.addr, buf.length)
    with pytest.raises(RegistrationError, match="overlaps registered buffer"):
        engine.register(buf.addr + 4096, 1 << 20)
    with pytest.raises(RegistrationError, match="overlaps registered buffer"):
        engine.register(buf.addr - 4096, 8192)
    with pytest.raises(MemoryAccessError, match="length must be positive"):
        engine.register(buf.addr + (2 << 20), 0)
    with pytest.raises(RegistrationError, match="read-only"):
        engine.register(b"immutable")
    with pytest.raises(RegistrationError, match="empty buffer"):
        engine.register(bytearray())
    with pytest.raises(RegistrationError, match="location must look like"):
        engine.register(bytearray(10), location="gpu0")
    with pytest.raises(RegistrationError, match="no buffer is registered"):
        engine.unregister(buf.addr + 1)
    engine.unregister(buf)
    again = engine.register(mem)  # the range is free again
    assert again.addr == buf.addr


def test_bad_config():
    with pytest.raises(ConfigError, match="lanes"):
        EngineConfig(lanes=0)
    with pytest.raises(ConfigError, match="unknown config field"):
        EngineConfig().with_(lane=3)
    with pytest.raises(ConfigError, match="unknown metadata service"):
        TransferEngine("x", "zookeeper://h")
    with pytest.raises(ConfigError, match="unknown or unavailable transport"):
        TransferEngine(transports=("carrier-pigeon",))
    with pytest.raises(ConfigError, match="engine name"):
        TransferEngine("bad name", "http://127.0.0.1:1")


def test_peer_killed_mid_batch(engine, local, peer_factory):
    victim = peer_factory()
    survivor = peer_factory()
    buf, mem = local
    vseg, sseg = engine.open_segment(victim.name), engine.open_segment(survivor.name)
    reqs = [Request(Op.WRITE, buf.addr, vseg, victim.addr, 32 << 20) for _ in range(8)]
    t0 = time.monotonic()
    batch = engine.submit(reqs, timeout=10)
    victim.kill()
    statuses = batch.wait()
    assert time.monotonic() - t0 < 12
    assert all(s.state in (State.COMPLETED, State.FAILED, State.TIMEOUT) for s in statuses)
    # Later requests to the dead peer fail with a reason; the engine keeps serving others.
    st = engine.submit([Request(Op.WRITE, buf.addr, vseg, victim.addr, 4096)], timeout=5).wait()[0]
    assert st.state in (State.FAILED, State.TIMEOUT) and st.reason
    mem[:4096] = os.urandom(4096)
    engine.write(buf.addr, sseg, survivor.addr, 4096)
    assert survivor.digest(survivor.addr, 4096) == sha(mem[:4096])


def _silent_target():
    """A fake peer that answers HELLO with the instance asked for, then never replies again."""
    ls = socket.create_server(("127.0.0.1", 0))
    conns = []

    def run():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            conns.append(c)
            hdr = c.recv(P.PREFIX_SIZE, socket.MSG_WAITALL)
            p = P.parse_prefix(hdr)
            c.recv(p.payload_len, socket.MSG_WAITALL)
            c.sendall(P.encode_control(P.HELLO, b'{"name": "x", "instance": "fake"}'))

    threading.Thread(target=run, daemon=True).start()
    return ls, conns


def test_silent_peer_times_out(tcp_engine):
    engine = tcp_engine
    buf = engine.register(bytearray(8192))
    ls, conns = _silent_target()
    port = ls.getsockname()[1]
    from moonlet.segment import Segment, SegmentDescriptor

    desc = SegmentDescriptor(f"127.0.0.1:{port}", "fake", "h", 1, {"tcp": f"127.0.0.1:{port}"},
                             [{"addr": 1 << 30, "length": 1 << 20, "location": "cpu:0"}])
    seg = Segment(desc.name, desc)
    t0 = time.monotonic()
    st = engine.submit([Request(Op.READ, buf.addr, seg, 1 << 30, 4096)], timeout=0.5).wait()[0]
    assert st.state is State.TIMEOUT and "deadline passed" in st.reason
    assert time.monotonic() - t0 < 3
    batch = engine.submit([Request(Op.READ, buf.addr, seg, 1 << 30, 4096)], timeout=30)
    t0 = time.monotonic()
    st = batch.wait(timeout=0.3)[0]
    assert st.state is State.TIMEOUT and time.monotonic() - t0 < 3
    ls.close()
    for c in conns:
        c.close()


def test_unreachable_peer_fails_fast(tcp_engine):
    engine = tcp_engine
    buf = engine.register(bytearray(8192))
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    from moonlet.segment import Segment, SegmentDescriptor

    desc = SegmentDescriptor(f"127.0.0.1:{port}", "gone", "h", 1, {"tcp": f"127.0.0.1:{port}"},
                             [{"addr": 1 << 30, "length": 1 << 20, "location": "cpu:0"}])
    st = engine.submit([Request(Op.WRITE, buf.addr, Segment(desc.name, desc), 1 << 30, 4096)], timeout=5).wait()[0]
    assert st.state is State.FAILED and "cannot connect" in st.reason


def test_metadata_server_down(local, peer_factory, metadata_server):
    target = peer_factory("--metadata", metadata_server.url, "--name", "tgt")
    with TransferEngine("init", metadata_server.url) as eng:
        buf = eng.register(bytearray(os.urandom(8192)))
        seg = eng.open_segment("tgt")
        metadata_server.stop()
        # Peers that already resolved each other keep working.
        eng.write(buf.addr, seg, target.addr, 8192)
        with pytest.raises(MetadataError, match="unreachable"):
            eng.open_segment("someone-else")


def test_closed_engine_refuses_work(local):
    eng = TransferEngine()
    eng.close()
    with pytest.raises(Exception, match="engine is closed"):
        eng.register(bytearray(10))
