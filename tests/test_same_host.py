"""Same-host transport: chosen automatically, refused cleanly, and never fooled by a forged pid."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys

import pytest

from helpers.memory import sha
from helpers.net import connect
from moonlet import EngineConfig, Op, Request, TransferEngine
from moonlet.memory import Denied
from moonlet.transport.shm import cma
from moonlet.transport.tcp import protocol as P

pytestmark = pytest.mark.skipif(not cma.AVAILABLE, reason="process_vm_readv/writev need Linux")
PR_SET_DUMPABLE = 4


def test_auto_picks_shm_for_a_same_host_peer(peer):
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(1 << 20))
        buf = eng.register(mem)
        seg = eng.open_segment(peer.name)
        st = eng.write(buf.addr, seg, peer.addr + 3, 1 << 20)
        assert st.transport == "shm"
        assert peer.digest(peer.addr + 3, 1 << 20) == sha(mem)
        dst = bytearray(200 * 4096)
        dbuf = eng.register(dst)
        statuses = eng.submit([Request(Op.READ, dbuf.addr + i * 4096, seg, peer.addr + 3 + i * 100, 100)
                               for i in range(200)]).wait()
        assert {s.transport for s in statuses} == {"shm"} and all(s.ok for s in statuses)
        for i in range(200):
            assert dst[i * 4096:i * 4096 + 100] == mem[i * 100:(i + 1) * 100]


@contextlib.contextmanager
def refusing_target(peer_factory):
    """A target that may not attach to this process (not dumpable), an engine, 64 KiB of random bytes
    registered, and the target's segment: ``(target, engine, mem, buf, seg)``."""
    target = peer_factory("--no-ptrace")  # cannot attach to a non-dumpable process
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        with TransferEngine() as eng:
            mem = bytearray(os.urandom(65536))
            yield target, eng, mem, eng.register(mem), eng.open_segment(target.name)
    finally:
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


def test_refused_attach_falls_back_to_tcp(peer_factory, caplog):
    with refusing_target(peer_factory) as (target, eng, mem, buf, seg):
        first = eng.submit([Request(Op.WRITE, buf.addr + i * 4096, seg, target.addr + i * 4096, 4096)
                            for i in range(16)]).wait()
        assert all(s.ok and s.transport == "tcp" for s in first)
        assert target.digest(target.addr, 65536) == sha(mem)
        assert "refused" in caplog.text and "using TCP" in caplog.text
        # Later requests go straight to TCP, and reads work too.
        copy = bytearray(65536)
        st = eng.read(eng.register(copy).addr, seg, target.addr, 65536)
        assert st.transport == "tcp" and copy == mem


@pytest.mark.parametrize("count,gap", [(1, 5), (16, 5), (16, 0)])
def test_refused_attach_falls_back_to_tcp_for_array_submits(peer_factory, count, gap):
    """A lone request, a batch, and a batch of adjacent requests (which travels as one range)."""
    with refusing_target(peer_factory) as (target, eng, mem, buf, seg):
        size = 65536 // count - gap
        statuses = eng.submit_many(Op.WRITE, seg, [buf.addr + gap + i * 4096 for i in range(count)],
                                   [target.addr + 7 + i * 4096 for i in range(count)], [size] * count).wait()
        assert len(statuses) == count and all(s.ok and s.transport == "tcp" for s in statuses)
        for i in range(count):
            assert target.digest(target.addr + 7 + i * 4096, size) == sha(mem[gap + i * 4096:gap + i * 4096 + size])


def _attached_socket(peer, pid: int) -> socket.socket:
    """A raw connection to ``peer`` whose HELLO claims to come from process ``pid`` on this host (this
    process: the target may copy our memory; another: a forged claim)."""
    with TransferEngine() as eng:
        ident = eng._identity()
    s = connect(peer.name)
    s.sendall(P.encode_hello(peer.name, pid=pid, host=ident["host"], pidns=ident["pidns"]))
    hdr = s.recv(P.PREFIX_SIZE, socket.MSG_WAITALL)
    s.recv(P.parse_prefix(hdr).payload_len, socket.MSG_WAITALL)
    return s


def _one_entry(s: socket.socket, kind: int, req_id: int, remote: int, length: int, mine: int) -> int:
    """Send a one-entry PULL/PUSH frame; the status the target answers."""
    s.sendall(P.encode_request_flat(kind, req_id, [remote, length, mine]))
    reply = s.recv(P.PREFIX_SIZE + 1, socket.MSG_WAITALL)
    assert P.parse_single_reply(reply) is not None and P.parse_prefix(reply).req_id == req_id
    return reply[P.PREFIX_SIZE]


def test_lone_attached_requests_are_checked_by_the_target(peer_factory):
    """The target's one-entry PULL/PUSH path copies what it may and refuses the rest, touching nothing."""
    rw, ro = peer_factory(), peer_factory("--read-only")
    data = bytearray(os.urandom(8192))
    mine = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
    with _attached_socket(rw, os.getpid()) as s:
        assert _one_entry(s, P.PULL, 1, rw.addr + 3, 5000, mine) == 0
        assert rw.digest(rw.addr + 3, 5000) == sha(data[:5000])
        back = bytearray(5000)
        back_addr = ctypes.addressof((ctypes.c_char * len(back)).from_buffer(back))
        assert _one_entry(s, P.PUSH, 2, rw.addr + 3, 5000, back_addr) == 0
        assert back == data[:5000]
        before = rw.digest(rw.addr + rw.size - 100, 100)
        assert _one_entry(s, P.PULL, 3, rw.addr + rw.size - 100, 200, mine) == Denied.NOT_REGISTERED
        assert rw.digest(rw.addr + rw.size - 100, 100) == before
        # An initiator address that is not mapped: the copy fails and says so; the connection goes on.
        assert _one_entry(s, P.PULL, 4, rw.addr, 4096, 0x10) == Denied.INITIATOR_FAULT
        assert _one_entry(s, P.PULL, 5, rw.addr + 3, 16, mine + 100) == 0
        assert rw.digest(rw.addr + 3, 16) == sha(data[100:116])
    with _attached_socket(ro, os.getpid()) as s:
        before = ro.digest(ro.addr, 4096)
        assert _one_entry(s, P.PULL, 6, ro.addr, 4096, mine) == Denied.NO_PERMISSION
        assert ro.digest(ro.addr, 4096) == before
        assert _one_entry(s, P.PUSH, 7, ro.addr, 4096, mine) == 0  # reading it is allowed
        assert sha(data[:4096]) == before


def test_forged_pid_is_not_attached(peer):
    """A client claiming someone else's pid must not make the target copy that process's memory."""
    victim = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with _attached_socket(peer, victim.pid) as s:
            s.sendall(P.encode_request_flat(P.PUSH, 5, [peer.addr, 64, 0x400000]))
            reply = s.recv(P.PREFIX_SIZE + 1, socket.MSG_WAITALL)
            assert P.parse_prefix(reply[:P.PREFIX_SIZE]).kind == P.RESP
            assert reply[P.PREFIX_SIZE] == Denied.ATTACH_REFUSED
    finally:
        victim.stdin.close()
        victim.wait()


def test_other_pid_namespace_uses_tcp(peer):
    with TransferEngine() as eng:
        seg = eng.open_segment(peer.name)
        d = seg.descriptor
        d.pidns = "pid:[0]"  # as a peer in another container would publish
        seg.update(d)
        buf = eng.register(bytearray(os.urandom(4096)))
        assert eng.write(buf.addr, seg, peer.addr, 4096).transport == "tcp"


def test_transports_option_orders_and_restricts(peer):
    with TransferEngine(transports=("tcp", "shm")) as eng:
        buf = eng.register(bytearray(os.urandom(4096)))
        assert eng.write(buf.addr, peer.name, peer.addr, 4096).transport == "tcp"
    with TransferEngine(config=EngineConfig(transports=("shm",))) as eng:
        buf = eng.register(bytearray(4096))
        st = eng.submit([Request(Op.WRITE, buf.addr, eng.name, buf.addr, 16)]).wait()[0]
        assert not st.ok and "no enabled transport (shm)" in st.reason
        # The descriptor still offers every path this engine serves (GPU ones too, where CUDA works).
        offered = json.loads(eng.descriptor().to_json())["transports"]
        assert {"shm", "tcp"} <= set(offered) and "local" not in offered


def test_allocated_buffer_is_copied_through_a_mapping(peer):
    with TransferEngine() as eng:
        mem = bytearray(os.urandom(4 << 20))
        buf = eng.register(mem)
        addr = peer.call("allocate 2097152")["addr"]
        ro = peer.call("allocate 65536 ro")["addr"]
        seg = eng.open_segment(peer.name)
        shm = next(t for t in eng._transports if t.name == "shm")
        st = eng.write(buf.addr, seg, addr + 1, 1 << 20)
        assert st.transport == "shm" and peer.digest(addr + 1, 1 << 20) == sha(mem[:1 << 20])
        assert len(shm._maps) == 1  # served by memcpy into the mapping, not by the target
        eng.read(buf.addr + (2 << 20), seg, addr + 5, 70000)
        assert sha(mem[2 << 20:(2 << 20) + 70000]) == peer.digest(addr + 5, 70000)
        before = peer.digest(ro, 64)
        bad = eng.submit([Request(Op.WRITE, buf.addr, seg, ro, 64)]).wait()[0]
        assert not bad.ok and "does not allow" in bad.reason and peer.digest(ro, 64) == before
        eng.read(buf.addr, seg, ro, 64)
        assert sha(mem[:64]) == before
        peer.call(f"unregister {addr}")  # released by the target: later requests fail cleanly
        late = eng.submit([Request(Op.WRITE, buf.addr, seg, addr, 64)]).wait()[0]
        assert not late.ok and ("unregistered" in late.reason or "not inside a registered" in late.reason)


def test_unregister_is_seen_through_the_generation_page(peer):
    with TransferEngine() as eng:
        buf = eng.register(bytearray(4096))
        extra = peer.call("register 65536")["addr"]
        seg = eng.open_segment(peer.name)
        assert seg.watch is not None and not seg.stale()
        peer.call(f"unregister {extra}")
        assert seg.stale()  # seen without asking the peer
        st = eng.submit([Request(Op.WRITE, buf.addr, seg, extra, 64)]).wait()[0]
        assert not st.ok and "is not inside a registered buffer of segment" in st.reason
        assert not seg.stale()  # the descriptor was re-fetched before routing
