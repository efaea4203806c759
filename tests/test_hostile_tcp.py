"""Hostile peers against the TCP target: no frame stops it, exhausts its memory, starves the other peers,
fills its connection table, spins it when descriptors run out, or pins a buffer forever."""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers.engines import initiator, transport
from helpers.memory import sha
from helpers.net import connect, raw_read, unanswered
from helpers.procs import rss_kib
from moonlet import Op, TransferEngine
from moonlet.errors import MoonletError, ProtocolError
from moonlet.security import Secret, Security
from moonlet.transport.tcp import protocol as P
from moonlet.transport.tcp.client import fetch_descriptor
from moonlet.transport.tcp.dial import read_control

SECRET = "correct horse battery staple"


def read_32(s: socket.socket, addr: int) -> bytes:
    """A lone 32-byte READ on a raw connection: the bytes, or ConnectionError/OSError."""
    got = raw_read(s, addr, 32)
    assert got[P.PREFIX_SIZE] == 0, "the READ was refused"
    return got[P.PREFIX_SIZE + 1:]


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """Whether the target closes ``s`` within ``timeout`` (whatever it said before)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def round_trips(eng: TransferEngine, target_name: str, target_addr: int, rounds: int) -> int:
    """Write then read back 4 KiB of random bytes ``rounds`` times; how many came back intact."""
    m = mmap.mmap(-1, 8192)
    buf = eng.register(m)
    seg = eng.open_segment(target_name)
    done = 0
    try:
        for k in range(rounds):
            m[:4096] = os.urandom(4096)
            try:
                eng.write(buf.addr, seg, target_addr + k * 4096, 4096)
                eng.read(buf.addr + 4096, seg, target_addr + k * 4096, 4096)
            except Exception:  # noqa: BLE001 - counted as not done
                continue
            done += m[4096:] == m[:4096]
    finally:
        eng.unregister(buf)
    return done


# -- 1: no exception from one peer's bytes ends the reactor -----------------------------------------------


@pytest.mark.parametrize("kind", [P.HELLO, P.CONNECT], ids=["HELLO", "CONNECT"])
def test_deeply_nested_json_is_refused_and_the_server_goes_on(peer, kind):
    bystander = connect(peer.name)  # a peer already connected: it must keep its connection
    try:
        assert read_32(bystander, peer.addr) == read_32(bystander, peer.addr)
        with connect(peer.name) as s:
            s.sendall(P.encode_control(kind, b"[" * 60000))
            with pytest.raises(ProtocolError, match="nested deeper than 32 levels"):
                read_control(s, P.HELLO, "HELLO")
        data = read_32(bystander, peer.addr)
        assert sha(data) == peer.digest(peer.addr, 32)
        with initiator() as eng:
            assert round_trips(eng, peer.name, peer.addr, 3) == 3
    finally:
        bystander.close()


def nested(depth: int) -> list:
    out: list = [1]
    for _ in range(depth - 1):
        out = [out]
    return out


def test_json_depth_is_bounded_before_parsing():
    ok = {"name": "a[{", "pidns": "pid:[4026531836]", "q": '\\"[[[' * 40, "deep": nested(31)}
    assert P.decode_hello(json.dumps(ok).encode()) == ok  # depth 32; brackets inside strings do not count
    for body in (b"[" * 60000, b"[" * 33 + b"]" * 33, json.dumps({"name": "x", "l": nested(32)}).encode()):
        with pytest.raises(ProtocolError, match="nested deeper than 32 levels"):
            P.decode_hello(body)
        with pytest.raises(ProtocolError, match="nested deeper than 32 levels"):
            P.decode_connect(body)


def test_a_bug_while_serving_one_connection_ends_that_connection_only():
    mem = bytearray(os.urandom(1 << 16))
    with initiator() as target:
        buf = target.register(mem)
        server = transport(target, "tcp").server
        with connect(target.name) as bystander:
            assert read_32(bystander, buf.addr) == mem[:32]
            for loop in server._shared.loops:
                loop._describe = lambda: 1 // 0  # a bug reached through a peer's frame
            with connect(target.name) as s:
                s.sendall(P.encode_get_desc())
                with pytest.raises(ProtocolError, match="ZeroDivisionError"):
                    read_control(s, P.DESC, "GET_DESC")
            assert read_32(bystander, buf.addr + 64) == mem[64:96]
        assert server.failure is None


def test_a_reactor_that_dies_says_so(caplog):
    caplog.set_level(logging.CRITICAL, logger="moonlet")
    with initiator() as target:
        server = transport(target, "tcp").server

        def broken(now: float) -> None:
            raise RuntimeError("a bug in the loop itself")

        loop = server._shared.loops[-1]  # whichever reactor dies, the engine is broken
        loop._tick = broken
        loop._wake()  # a loop turn now
        for _ in range(100):
            if server.failure is not None:
                break
            time.sleep(0.05)
        assert server.failure is not None and "RuntimeError: a bug in the loop itself" in server.failure
        with pytest.raises(MoonletError, match="engine is broken and must be closed: .*a bug in the loop"):
            target.submit_many(Op.WRITE, target.name, [0], [0], [1])
    assert any(r.levelno == logging.CRITICAL and "stopped serving" in r.getMessage() for r in caplog.records)


# -- 2: a refused WRITE's payload drains through bounded memory --------------------------------------------


def test_a_huge_refused_write_does_not_grow_memory(peer):
    """A 40-byte WRITE head at an unregistered address announcing 2**48 bytes, then 64 MiB of them."""
    before = rss_kib(peer.pid)
    untouched = peer.digest(peer.addr, 32 << 20)
    with connect(peer.name) as s:
        s.sendall(P.encode_request(P.WRITE, 1, [(0x1000, P.MAX_PAYLOAD)]))
        junk = os.urandom(1 << 20)
        for _ in range(64):
            s.sendall(junk)  # swallowed, a MiB at a time, by one scratch buffer
        with initiator() as eng:  # meanwhile another peer is served
            assert round_trips(eng, peer.name, peer.addr + (32 << 20), 10) == 10
        grown = rss_kib(peer.pid) - before
        assert grown < 32 * 1024, f"the target grew {grown} KiB"
    assert peer.digest(peer.addr, 32 << 20) == untouched


# -- 6: small frames are budgeted; unread replies are capped by what they hold ----------------------------


@pytest.mark.parametrize("kind", ["GET_DESC", "READ"])
def test_small_frames_whose_replies_go_unread_do_not_starve_others_or_grow_memory(peer_factory, kind):
    """Four connections send small frames and read no reply. Socket buffers are small, so replies soon
    queue in the target; it must stop reading those connections and keep serving another peer."""
    peer = peer_factory("--config", json.dumps({"socket_buffer": 65536}))
    for _ in range(100):  # a descriptor of some size: every DESC reply is a copy of it
        peer.call("register 4096")
    frame = P.encode_get_desc() if kind == "GET_DESC" else P.encode_request(P.READ, 1, [(peer.addr, 26)])
    burst = frame * 4096
    before = rss_kib(peer.pid)
    floods = []
    try:
        for _ in range(4):
            s = connect(peer.name)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            floods.append(s)
        left = {s: memoryview(burst) for s in floods}
        sent = stalled = 0
        while sent < (64 << 20) and stalled < 10:  # until the target stops taking frames for half a second
            progress = False
            for s in floods:
                try:
                    n = s.send(left[s])
                except BlockingIOError:
                    continue
                sent += n
                left[s] = left[s][n:] or memoryview(burst)
                progress = True
            stalled = 0 if progress else stalled + 1
            if not progress:
                time.sleep(0.05)
        with initiator() as eng:  # another peer is served, all its requests within their deadline
            assert round_trips(eng, peer.name, peer.addr + (32 << 20), 20) == 20
        grown = rss_kib(peer.pid) - before
        assert grown < 96 * 1024, f"the target grew {grown} KiB after {sent} bytes of {kind} frames"
    finally:
        for s in floods:
            s.close()


# -- 7: silent and unauthenticated sockets cannot fill the connection table --------------------------------


def test_silent_sockets_do_not_crowd_out_peers(peer_factory):
    """Without a secret: 40 sockets that never send a byte, against a table of 16."""
    target = peer_factory("--config", json.dumps({"max_connections": 16}))
    far = target.addr + (48 << 20)  # bytes nobody writes
    expect = target.digest(far, 32)
    silent: list[socket.socket] = []
    with initiator() as eng:
        assert round_trips(eng, target.name, target.addr, 2) == 2  # its lanes are in before the flood
        lanes = eng.stats()["tcp_connects"]
        try:
            silent += [connect(target.name) for _ in range(40)]
            served = 0
            for _ in range(40):
                silent.append(connect(target.name))  # the flood goes on
                with connect(target.name) as s:
                    try:
                        served += sha(read_32(s, far)) == expect
                    except OSError:
                        pass
            assert served == 40
            assert len(unanswered(silent)) <= 16 - 2
            assert round_trips(eng, target.name, target.addr, 2) == 2
            assert eng.stats()["tcp_connects"] == lanes  # the lanes that had spoken were never pushed out
        finally:
            for s in silent:
                s.close()


def test_unauthenticated_sockets_have_a_quota_of_their_own(peer_factory):
    """With a secret: a client that never authenticates holds 7 connections (with the initiator's two lanes,
    a full table of 8), reconnecting whenever one is dropped."""
    target = peer_factory("--config", json.dumps({"secret": SECRET, "max_connections": 8,
                                                  "max_unauthenticated": 4, "connect_timeout": 1.0}))
    security = Security(secret=Secret(SECRET.encode()))
    stop = threading.Event()
    held: list[socket.socket] = []
    dialed = [0]

    def attack() -> None:
        while not stop.is_set():
            for s in [s for s in held if s not in unanswered(held)]:
                held.remove(s)
                s.close()
            while len(held) < 7 and not stop.is_set():
                held.append(connect(target.name))
                dialed[0] += 1
            stop.wait(0.02)

    attacker = threading.Thread(target=attack, daemon=True)
    with initiator(secret=SECRET) as eng:
        assert round_trips(eng, target.name, target.addr, 2) == 2
        lanes = eng.stats()["tcp_connects"]
        attacker.start()
        try:
            time.sleep(0.3)
            served = 0
            for _ in range(40):
                try:
                    served += json.loads(fetch_descriptor(target.name, 5.0, security))["name"] == target.name
                except Exception:  # noqa: BLE001 - counted as not served
                    pass
            assert served == 40
            assert round_trips(eng, target.name, target.addr, 2) == 2
            assert eng.stats()["tcp_connects"] == lanes
        finally:
            stop.set()
            attacker.join(5)
            time.sleep(0.3)  # the last ones dialed are accepted (and others closed) by now
            still = unanswered(held)
            for s in held:
                s.close()
    assert dialed[0] > 40 and len(still) <= 4


def test_idle_connections_are_closed_and_initiators_reconnect(peer_factory):
    target = peer_factory("--config", json.dumps({"idle_timeout": 1.0}))
    with initiator() as eng:
        assert round_trips(eng, target.name, target.addr, 2) == 2
        lanes = eng.stats()["tcp_connects"]
        with connect(target.name) as s:
            read_32(s, target.addr)  # a peer that spoke once, then went quiet
            assert closed_by_peer(s, 5.0)
        time.sleep(0.5)  # the lanes went quiet at the same time
        assert round_trips(eng, target.name, target.addr + 65536, 3) == 3
        assert eng.stats()["tcp_connects"] > lanes


# -- 8: out of file descriptors, the reactor rests instead of spinning ------------------------------------

_FD_STARVED = r"""
import json, logging, os, resource, sys, time
from moonlet import EngineConfig, TransferEngine

class Count(logging.Handler):
    n = 0  # warnings about accepting connections
    def emit(self, record):
        if record.levelno >= logging.WARNING and "accept" in record.getMessage():
            Count.n += 1

logging.getLogger("moonlet").addHandler(Count())
logging.getLogger("moonlet").propagate = False
eng = TransferEngine(config=EngineConfig(transports=("tcp",)))
mem = bytearray(os.urandom(4096))
buf = eng.register(mem)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fill = []
while True:
    try:
        fill.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
print(json.dumps({"name": eng.name, "addr": buf.addr, "sha": __import__("hashlib").sha256(mem[:32]).hexdigest()}),
      flush=True)
sys.stdin.readline()  # the parent's connections wait in the backlog: the listener is readable
t0 = os.times()
time.sleep(1.0)
t1 = os.times()
for fd in fill[:16]:
    os.close(fd)
print(json.dumps({"cpu": t1.user - t0.user + t1.system - t0.system, "warnings": Count.n}), flush=True)
sys.stdin.readline()
print(json.dumps({"warnings": Count.n}), flush=True)
eng.close()
"""


def test_out_of_descriptors_the_listener_rests():
    child = subprocess.Popen([sys.executable, "-c", _FD_STARVED], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    waiting: list[socket.socket] = []
    try:
        info = json.loads(child.stdout.readline())
        waiting += [connect(info["name"]) for _ in range(3)]  # accepted by the kernel, not by the engine
        child.stdin.write("go\n")
        child.stdin.flush()
        starved = json.loads(child.stdout.readline())
        assert starved["cpu"] < 0.3, f"the engine burnt {starved['cpu']:.2f} s of CPU in 1 s"
        assert starved["warnings"] == 1  # once per episode
        for s in waiting:  # descriptors are free again: the connections waiting are served
            assert sha(read_32(s, info["addr"])) == info["sha"]
        child.stdin.write("next\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline())["warnings"] == 1
    finally:
        for s in waiting:
            s.close()
        child.kill()
        child.wait()


# -- 11: a frame that stops half way is abandoned after the request timeout --------------------------------


def test_a_stalled_write_releases_its_buffer(peer_factory):
    target = peer_factory("--config", json.dumps({"request_timeout": 1.0}))
    addr = target.call(f"register {1 << 20}")["addr"]
    with connect(target.name) as s:
        s.sendall(P.encode_request(P.WRITE, 1, [(addr, 1 << 20)]) + os.urandom(1000))
        assert closed_by_peer(s, 5.0)  # abandoned after about request_timeout
        landed = target.digest(addr, 1 << 20)  # (the first 1000 bytes went straight to the buffer)
        assert target.call(f"unregister {addr}") == {"ok": True}  # nothing pins it any more
        try:
            s.sendall(os.urandom((1 << 20) - 1000))
        except OSError:
            pass
    time.sleep(0.2)
    assert target.digest(addr, 1 << 20) == landed
    with initiator() as eng:
        assert round_trips(eng, target.name, target.addr, 2) == 2
