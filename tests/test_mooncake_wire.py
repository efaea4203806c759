"""Wire interop with real Mooncake engines (``EngineConfig.mooncake_wire``), and Mooncake's formats sans-IO.

The interop tests drive Mooncake's own engine (its wheel, in its own
virtualenv; ``.ci/run`` builds it) through ``mooncake_peer.py`` and move
random bytes both ways, peer to peer and through an HTTP metadata server.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.memory import sha
from mooncake_peer import NO_MOONCAKE, MooncakePeer, mooncake_python
from moonlet import EngineConfig, MetadataServer, Op, TransferEngine
from moonlet.errors import ConfigError, ProtocolError, TransferError
from moonlet.transport.mooncake_wire import protocol as MP

needs_mooncake = pytest.mark.skipif(mooncake_python() is None, reason=NO_MOONCAKE)


# -- the formats, sans-IO --------------------------------------------------------------------

def test_handshake_round_trip_and_old_protocol():
    msg = MP.encode_handshake(MP.METADATA, {"name": "a:1", "buffers": []})
    assert struct.unpack_from("<Q", msg)[0] == len(msg) - 8 and msg[8] == MP.METADATA and msg.endswith(b"}\n")
    reader = MP.HandshakeReader()
    assert reader.feed(msg[:5]) is None and reader.feed(msg[5:20]) is None
    assert reader.feed(msg[20:]) == (MP.METADATA, {"name": "a:1", "buffers": []})
    old = MP.encode_handshake(MP.OLD_PROTOCOL, {"x": 1})
    assert old[8:9] == b"{" and MP.HandshakeReader().feed(old) == (MP.OLD_PROTOCOL, {"x": 1})
    assert MP.looks_like_handshake(msg) and MP.looks_like_handshake(old)


def test_moonlet_frames_and_garbage_are_not_handshakes():
    from moonlet.transport.tcp import protocol as P
    assert not MP.looks_like_handshake(P.encode_control(P.GET_DESC, bytes(16), 1))
    assert not MP.looks_like_handshake(b"GET / HTTP/1.1\r\n\r\n")
    assert not MP.looks_like_handshake(struct.pack("<Q", 1 << 30) + b"\x01{}")  # longer than Mooncake allows
    with pytest.raises(ProtocolError, match="at most"):
        MP.HandshakeReader().feed(struct.pack("<Q", 1 << 21) + b"\x01{")
    with pytest.raises(ProtocolError, match="unknown Mooncake handshake type"):
        MP.HandshakeReader().feed(struct.pack("<Q", 3) + b"\x09{}")
    with pytest.raises(ProtocolError, match="malformed"):
        MP.HandshakeReader().feed(struct.pack("<Q", 3) + b"\x01{x")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_handshake_reader_fuzz(data):
    try:
        MP.HandshakeReader().feed(data)
    except ProtocolError:
        pass


def test_data_header_and_status_frames():
    head = MP.encode_header(MP.WRITE, 0x7F0000001000, 4096, True)
    assert len(head) == 24 and head[16] == 0x81
    assert MP.parse_header(head) == (MP.WRITE, 0x7F0000001000, 4096, True)
    assert MP.parse_header(MP.encode_header(MP.READ, 5, 6, False)) == (MP.READ, 5, 6, False)
    assert MP.encode_status(True) == b"\0\0\0\0VTCM"  # what Mooncake 0.3.13 sends
    assert MP.parse_status(MP.encode_status(True)) and not MP.parse_status(MP.encode_status(False))
    with pytest.raises(ProtocolError, match="status frame"):
        MP.parse_status(b"01234567")
    with pytest.raises(ProtocolError, match="opcode"):
        MP.parse_header(struct.pack("<QQB7x", 1, 2, 0x83))


def test_descriptor_conversion():
    native = {"name": "n", "buffers": [{"addr": 4096, "length": 10, "location": "cpu:0"},
                                       {"addr": 1 << 40, "length": 10, "location": "cuda:0"}]}
    d = MP.mooncake_descriptor(native, "10.0.0.1", 7000)
    assert d["buffers"] == [{"name": "n", "addr": 4096, "length": 10}]  # host memory only
    assert (d["tcp_data_host"], d["tcp_data_port"], d["tcp_proto_version"]) == ("10.0.0.1", 7000, 2)
    assert MP.native_descriptor(d, "n") is native
    theirs = {"name": "mc", "protocol": "tcp", "tcp_data_port": 15000, "tcp_proto_version": 2,
              "buffers": [{"name": "mc", "addr": 8192, "length": 64}]}
    mine = MP.native_descriptor(theirs, "mc", "10.0.0.2:16000")
    assert mine["endpoints"] == {"mooncake": "tcp", "mooncake_rpc": "10.0.0.2:16000",
                                 "mooncake_tcp": "10.0.0.2:15000;v2"}
    assert mine["buffers"] == [{"addr": 8192, "length": 64, "location": "cpu:0"}]
    with pytest.raises(ProtocolError):
        MP.native_descriptor({"buffers": [{"addr": "x"}]}, "mc")


def test_mooncake_wire_refuses_a_secret():
    with pytest.raises(ConfigError, match="cluster secret"):
        EngineConfig(mooncake_wire=True, secret="s" * 16)


# -- a moonlet engine speaking Mooncake's wire ------------------------------------------------

def test_plain_and_wire_engines_still_talk_moonlet(wire_engine, peer_factory):
    """A moonlet peer without Mooncake's wire opens a wire engine's segment and the other way round."""
    mem = bytearray(os.urandom(1 << 20))
    buf = wire_engine.register(mem)
    plain = peer_factory()
    data = bytes(mem[:65536])
    assert wire_engine.write(buf.addr, plain.name, plain.addr, 65536).transport in ("tcp", "shm")
    assert plain.digest(plain.addr, 65536) == sha(data)
    wired = peer_factory("--config", '{"mooncake_wire": true}')
    with TransferEngine(config=EngineConfig(request_timeout=10.0, transports=("tcp",))) as eng:
        other = bytearray(1 << 20)
        b = eng.register(other)
        assert eng.read(b.addr, wired.name, wired.addr, 1 << 20).transport == "tcp"
        assert sha(other[:]) == wired.digest(wired.addr, 1 << 20)


@pytest.fixture(params=["p2p", "http"])
def mooncake_metadata(request):
    """(moonlet metadata spec, Mooncake metadata string) of one metadata mode."""
    if request.param == "p2p":
        yield "p2p", "P2PHANDSHAKE"
    else:
        with MetadataServer(port=0) as srv:
            yield srv.url, srv.url


def _engine(spec: str, name: str) -> TransferEngine:
    return TransferEngine(name, spec, config=EngineConfig(request_timeout=15.0, mooncake_wire=True))


@needs_mooncake
def test_moonlet_initiator_mooncake_target(mooncake_metadata):
    spec, theirs = mooncake_metadata
    peer = MooncakePeer(theirs, "127.0.0.1" if spec == "p2p" else f"mc-target-{os.getpid()}")
    try:
        with _engine(spec, f"ml-init-{os.getpid()}") as eng:
            mem = bytearray(os.urandom(4 << 20))
            buf = eng.register(mem)
            seg = eng.open_segment(peer.name)
            assert seg.descriptor.endpoints["mooncake"] == "tcp"
            n, off = (1 << 20) + 123, 4097
            status = eng.write(buf.addr, peer.name, peer.addr + off, n)
            assert status.transport == "mooncake_tcp"
            assert peer.call(op="sha", addr=peer.addr + off, n=n)["sha"] == sha(mem[:n])
            # READ what the peer holds elsewhere (its own random bytes)
            roff = 2 << 20
            eng.read(buf.addr + roff, peer.name, peer.addr + roff, n)
            assert sha(mem[roff:roff + n]) == peer.call(op="sha", addr=peer.addr + roff, n=n)["sha"]
            # 64 scattered 4 KiB writes, then read back into other memory and compare
            mem[:] = os.urandom(4 << 20)
            offs = [i * 12288 + 512 for i in range(64)]
            batch = eng.submit([(Op.WRITE, buf.addr + o, seg, peer.addr + o, 4096) for o in offs])
            assert all(s.ok and s.transport == "mooncake_tcp" for s in batch.wait())
            back = 3 << 20
            batch = eng.submit([(Op.READ, buf.addr + back + i * 4096, seg, peer.addr + o, 4096)
                                for i, o in enumerate(offs)])
            assert all(s.ok for s in batch.wait())
            assert all(mem[back + i * 4096: back + (i + 1) * 4096] == mem[o:o + 4096] for i, o in enumerate(offs))
            # outside the peer's memory: refused before anything is sent, the good request still lands
            batch = eng.submit([(Op.WRITE, buf.addr, seg, peer.addr + peer.size - 10, 4096),
                                (Op.WRITE, buf.addr, seg, peer.addr, 4096)])
            bad, good = batch.wait()
            assert not bad.ok and "not inside a registered buffer" in bad.reason and good.ok
            assert peer.call(op="sha", addr=peer.addr, n=4096)["sha"] == sha(mem[:4096])
            # a notification to the Mooncake engine
            eng.notify(peer.name, "kv-9", "done")
            assert peer.call(op="notifies")["notes"] == [["kv-9", "done"]]
    finally:
        peer.close()


@needs_mooncake
def test_mooncake_initiator_moonlet_target(mooncake_metadata):
    spec, theirs = mooncake_metadata
    with _engine(spec, f"ml-target-{os.getpid()}") as eng:
        mem = bytearray(os.urandom(4 << 20))
        buf = eng.register(mem)
        ro = bytearray(os.urandom(1 << 20))
        ro_buf = eng.register(ro, remote_write=False)
        peer = MooncakePeer(theirs, "127.0.0.1" if spec == "p2p" else f"mc-init-{os.getpid()}")
        try:
            n, off = (1 << 20) + 123, 8191
            got = peer.call(op="write", segment=eng.name, local=peer.addr, remote=buf.addr + off, n=n)
            assert got["rc"] == 0 and sha(mem[off:off + n]) == got["sha"]
            got = peer.call(op="read", segment=eng.name, local=peer.addr + (2 << 20), remote=buf.addr + (3 << 20),
                            n=65536)
            assert got["rc"] == 0 and got["sha"] == sha(mem[3 << 20:(3 << 20) + 65536])
            # a batch of scattered blocks
            offs = [i * 8192 for i in range(32)]
            got = peer.call(op="batch", write=True, segment=eng.name, locals=[peer.addr + o for o in offs],
                            remotes=[buf.addr + o for o in offs], lengths=[4096] * 32)
            assert got["rc"] == 0 and got["sha"] == [sha(mem[o:o + 4096]) for o in offs]
            # memory registered read-only: the write is refused, the bytes stay
            before = sha(ro[:])
            got = peer.call(op="write", segment=eng.name, local=peer.addr, remote=ro_buf.addr, n=4096)
            assert got["rc"] != 0 and sha(ro[:]) == before
            # ... but reading it is fine
            got = peer.call(op="read", segment=eng.name, local=peer.addr, remote=ro_buf.addr, n=4096)
            assert got["rc"] == 0 and got["sha"] == sha(ro[:4096])
            # a notification from the Mooncake engine
            assert peer.call(op="notify", segment=eng.name, local=peer.addr, remote=buf.addr, n=64, name="kv-17",
                             msg="ready")["rc"] == 0
            assert ("kv-17", "ready") in eng.notifications()
        finally:
            peer.close()


def test_mooncake_write_outside_registered_memory_is_refused_by_the_target(wire_engine):
    """A request outside registered memory (a stale or forged descriptor) meets the target's own check."""
    mem = bytearray(os.urandom(1 << 20))
    buf = wire_engine.register(mem)
    host, _, rest = wire_engine.descriptor().endpoints["mooncake_tcp"].rpartition(":")
    port = int(rest.split(";")[0])
    before = sha(mem[:])
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(MP.encode_header(MP.WRITE, buf.addr + (1 << 20) - 100, 4096, True) + bytes(4096))
        assert not MP.parse_status(s.recv(8))
        try:
            assert s.recv(1) == b""  # and the connection is closed
        except ConnectionResetError:  # (with the unread payload still queued, closing resets it)
            pass
    assert sha(mem[:]) == before
    with socket.create_connection((host, port), timeout=5) as s:  # the target still serves good requests
        s.sendall(MP.encode_header(MP.READ, buf.addr, 4096, True))
        assert MP.parse_status(s.recv(8))
        data = b""
        while len(data) < 4096:
            data += s.recv(4096 - len(data))
        assert data == mem[:4096]


@needs_mooncake
def test_transfer_engine_bench_against_a_moonlet_target():
    """Mooncake's own transfer_engine_bench completes against `moonlet bench --mode target --mooncake-wire`."""
    bench = Path(mooncake_python()).parent.parent / "lib"
    found = sorted(bench.glob("python3*/site-packages/mooncake/transfer_engine_bench"))
    assert found, f"no transfer_engine_bench under {bench}"
    target = subprocess.Popen([sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target",
                               "--mooncake-wire", "--buffer-size", "64M"], stdout=subprocess.PIPE, text=True)
    try:
        name = target.stdout.readline().split()[1]
        for op in ("write", "read"):
            done = subprocess.run([str(found[0]), "--mode=initiator", "--metadata_server=P2PHANDSHAKE",
                                   "--local_server_name=127.0.0.1", f"--segment_id={name}", "--protocol=tcp",
                                   f"--operation={op}", "--block_size=65536", "--batch_size=32", "--threads=2",
                                   "--duration=2", "--buffer_size=67108864"], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            m = re.search(r"Test completed: duration [\d.]+, batch count (\d+), throughput ([\d.]+) GB/s",
                          done.stderr)
            assert m and int(m.group(1)) > 0 and float(m.group(2)) > 0, done.stderr[-2000:]
    finally:
        target.terminate()
        target.wait(10)


def test_moonlet_notify_to_an_unreachable_mooncake_peer_says_so(wire_engine):
    """A Mooncake segment whose RPC port is gone: the notification raises with the reason."""
    from moonlet.segment import Segment, SegmentDescriptor

    d = MP.native_descriptor({"name": "mc", "protocol": "tcp", "tcp_data_port": 1, "buffers": []}, "mc",
                             "127.0.0.1:1")
    seg = Segment("mc", SegmentDescriptor.from_json(d))
    with pytest.raises(TransferError, match="Mooncake"):
        wire_engine.notify(seg, "a", "b", timeout=2)


@needs_mooncake
def test_mixed_cluster_through_the_mooncake_api(monkeypatch):
    """One node switched to `moonlet.mooncake` (one import changed), the other still on Mooncake: both directions."""
    import ctypes

    from moonlet.mooncake import TransferEngine as ShimEngine

    monkeypatch.delenv("MOONLET_SECRET", raising=False)
    peer = MooncakePeer("P2PHANDSHAKE")
    shim = ShimEngine()
    try:
        assert shim.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        addr = shim.allocate_managed_buffer(1 << 20)
        data = os.urandom(1 << 20)
        ctypes.memmove(addr, data, len(data))
        assert shim.transfer_sync_write(peer.name, addr, peer.addr, 1 << 20) == 0
        assert peer.call(op="sha", addr=peer.addr, n=1 << 20)["sha"] == sha(data)
        me = f"127.0.0.1:{shim.get_rpc_port()}"
        got = peer.call(op="read", segment=me, local=peer.addr + (2 << 20), remote=addr + 4096, n=65536)
        assert got["rc"] == 0 and got["sha"] == sha(data[4096:4096 + 65536])
    finally:
        peer.close()


def test_protocol_v1_both_sides(wire_engine):
    """A peer that advertises tcp_proto_version 1 gets v1 requests (no status frames), and they land."""
    from moonlet.segment import Segment, SegmentDescriptor

    with TransferEngine(config=EngineConfig(request_timeout=10.0, mooncake_wire=True)) as eng:
        target = bytearray(os.urandom(1 << 20))
        tbuf = wire_engine.register(target)
        host, port, _ = MP.split_data_endpoint(wire_engine.descriptor().endpoints["mooncake_tcp"])
        old = {"name": "old", "protocol": "tcp", "tcp_data_host": host, "tcp_data_port": port,
               "tcp_proto_version": 1, "buffers": [{"name": "old", "addr": tbuf.addr, "length": tbuf.length}]}
        seg = Segment("old", SegmentDescriptor.from_json(MP.native_descriptor(old, "old")))
        assert seg.descriptor.endpoints["mooncake_tcp"].endswith(";v1")
        mine = bytearray(os.urandom(1 << 20))
        buf = eng.register(mine)
        assert eng.write(buf.addr, seg, tbuf.addr + 100, 300000).transport == "mooncake_tcp"
        assert target[100:300100] == mine[:300000]
        eng.read(buf.addr + 500000, seg, tbuf.addr + 600000, 65536)
        assert mine[500000:565536] == target[600000:665536]
