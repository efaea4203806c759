"""Mooncake's wire (``EngineConfig.mooncake_wire``) against peers that misbehave on purpose.

Handshake messages too deep, too long or of the wrong shape, answers that
trickle, peers that open hundreds of handshakes and send a byte now and then,
a data connection whose reply is never read, and data connections left idle:
each costs the peer its own connection and nothing else, and the target's
threads, memory and CPU stay bounded.  Raw Mooncake frames throughout.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.memory import sha
from helpers.net import connect, recv_exact
from helpers.procs import cpu_seconds, proc_status, rss_kib
from moonlet import EngineConfig, TransferEngine
from moonlet.errors import MetadataError, ProtocolError
from moonlet.transport.mooncake_wire import protocol as MP


def message(kind: int, body: bytes) -> bytes:
    """A handshake message carrying ``body`` as is (no JSON check, unlike MP.encode_handshake)."""
    return struct.pack("<Q", len(body) + 1) + bytes([kind]) + body


def closed_without_answer(sock: socket.socket, within: float = 3.0) -> bool:
    """Whether the peer closes ``sock`` within ``within`` seconds having sent nothing."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def handshake(endpoint: str, kind: int, body: dict, timeout: float = 5.0) -> tuple[int, dict]:
    """One honest Mooncake handshake: send, read the answer to the end (the target half-closes), close."""
    with connect(endpoint, timeout) as s:
        s.sendall(MP.encode_handshake(kind, body))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answer = MP.HandshakeReader().feed(data)
    assert answer is not None, f"incomplete answer of {len(data)} bytes"
    return answer


def data_port(endpoint: str) -> int:
    kind, desc = handshake(endpoint, MP.METADATA, {"name": "probe-segment", "buffers": []})
    assert kind == MP.METADATA and desc["protocol"] == "tcp"
    return desc["tcp_data_port"]


def mooncake_read(sock: socket.socket, addr: int, n: int) -> bytes:
    """A protocol v2 READ on a data connection: the status frame, then the bytes."""
    sock.sendall(MP.encode_header(MP.READ, addr, n, True))
    assert MP.parse_status(recv_exact(sock, MP.STATUS.size))
    return recv_exact(sock, n)


# -- bounded parsing, sans-IO --------------------------------------------------------------

HOSTILE_JSON = [
    (b"[" * 60000, "deeper than 32 levels"),
    (b"[[[]", "do not pair up"),
    (b"[" * 40000 + b"]" * 40000, "deeper than 32 levels"),
    (b'{"a":' * 30000 + b"1" + b"}" * 30000, "deeper than 32 levels"),
    (b'{"s": "' + b'\\"[' * 20000 + b'", "t": ' + b"[" * 33 + b"]" * 33 + b"}", "deeper than 32 levels"),
    (b'{"x": NaN}', "malformed"),
    (b'{"name": "\xff\xfe"}', "malformed"),
    (b'{"x": ' + b"9" * 5000 + b"}", "malformed"),
    (b"[1, 2]", "not an object"),
]


def test_handshake_json_is_parsed_bounded():
    """Too deep, NaN, bad UTF-8, huge numbers, wrong shape: a ProtocolError naming the problem, nothing else;
    brackets and escaped quotes inside strings are text, not nesting."""
    for body, why in HOSTILE_JSON:
        with pytest.raises(ProtocolError, match=why):
            MP.HandshakeReader().feed(message(MP.METADATA, body))
    odd = {"name": "[" * 5000 + '\\"{' * 100, "buffers": [{"name": "}]" * 50, "addr": 4096, "length": 10}]}
    assert MP.HandshakeReader().feed(MP.encode_handshake(MP.METADATA, odd)) == (MP.METADATA, odd)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='[]{}"\\,:1a ', max_size=120) | st.recursive(
    st.integers() | st.text(alphabet='[]{}"\\a', max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]"\\a', max_size=3), inner,
                                                                 max_size=3), max_leaves=60).map(json.dumps)
       | st.tuples(st.integers(0, 40), st.sampled_from(['"]"', '"\\\\"', "1", "[]"])).map(
           lambda t: '{"k":[' * t[0] + t[1] + "]}" * t[0]))
def test_bounded_json_agrees_with_json(text):
    """parse_json gives what json.loads gives, or a ProtocolError exactly when json fails or nests past 32."""
    try:
        want = json.loads(text)
    except ValueError:
        want = ProtocolError
    try:
        got = MP.parse_json(text.encode(), "fuzz")
    except ProtocolError:
        assert want is ProtocolError or _depth(want) > MP.MAX_DEPTH
    else:
        assert got == want and _depth(got) <= MP.MAX_DEPTH


@pytest.mark.parametrize("desc, why", [
    ({"protocol": "tcp", "tcp_data_port": float("inf")}, "tcp_data_port must be int"),
    ({"protocol": "tcp", "tcp_data_port": 1 << 80}, "out of range"),
    ({"protocol": "tcp", "tcp_data_port": 7000, "tcp_proto_version": 1e300}, "tcp_proto_version must be int"),
    ({"protocol": ["tcp"]}, "protocol must be str"),
    ({"buffers": "abc"}, "buffers must be list"),
    ({"buffers": [7]}, "not a JSON object"),
    ({"buffers": [{"addr": 1.5e300, "length": 1}]}, "addr must be int"),
    ({"buffers": [{"addr": True, "length": 1}]}, "addr must be int"),
    ({"buffers": [{"addr": (1 << 64) - 1, "length": 2}]}, "64-bit address space"),
    ({"buffers": [{"addr": 4096}]}, "length must be int"),
])
def test_malformed_mooncake_descriptors_are_protocol_errors(desc, why):
    with pytest.raises(ProtocolError, match=why):
        MP.native_descriptor(desc, "mc", "10.0.0.2:16000")


def test_notification_messages_are_bounded_by_their_header():
    """A notification longer than a note can be is refused from its first 9 bytes, before its body is read."""
    head = struct.pack("<Q", (1 << 20) - 1) + bytes([MP.NOTIFY])  # within what other messages may carry
    with pytest.raises(ProtocolError, match="notify message of .* bytes"):
        MP.HandshakeReader().feed(head)
    with pytest.raises(ProtocolError, match="at most 32768"):
        MP.notification({"name": "n", "notify_msg": "m" * MP.NOTE_MAX})
    with pytest.raises(ProtocolError, match="must be strings"):
        MP.notification({"name": ["n"], "notify_msg": "m"})


# -- the handshake on a live engine ------------------------------------------------------------

@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_hostile_handshakes_close_only_their_connection(wire_engine):
    """Deep JSON, bad UTF-8, an oversized or over-long notification: that connection closes, unanswered and
    unqueued; honest handshakes and notifications before and after are served."""
    rpc = wire_engine.name
    host = rpc.rsplit(":", 1)[0]
    mem = bytearray(os.urandom(1 << 16))
    buf = wire_engine.register(mem)
    assert data_port(rpc) == MP.split_data_endpoint(wire_engine.descriptor().endpoints["mooncake_tcp"])[1]
    big_note = json.dumps({"name": "big", "notify_msg": "x" * 40000}).encode()
    hostile = [message(MP.METADATA, b'{"a":' + b"[" * 60000), message(MP.METADATA, b"{" * 30000 + b"}" * 30000),
               message(MP.METADATA, b'{"name": "\xff", "pad": "' + b"p" * 40 + b'"}'), message(MP.NOTIFY, big_note)]
    for msg in hostile:
        with connect(rpc) as s:
            s.sendall(msg)
            assert closed_without_answer(s)
    # a notification claiming more bytes than a note can hold is cut off after its header, not buffered
    with connect(rpc) as s:
        s.sendall(struct.pack("<Q", (1 << 20) - 1) + bytes([MP.NOTIFY]) + b'{"name": "n", "notify_msg": "aaaaaaaaa')
        assert closed_without_answer(s)
    assert handshake(rpc, MP.NOTIFY, {"name": "kv-1", "notify_msg": "ready"}) == \
        (MP.NOTIFY, {"name": "", "notify_msg": "success"})
    assert wire_engine.notifications() == [("kv-1", "ready")]  # the big one was never queued
    with socket.create_connection((host, data_port(rpc)), timeout=5) as s:
        assert mooncake_read(s, buf.addr, len(mem)) == mem


def test_a_handshake_shorter_than_a_moonlet_frame_head_is_answered(wire_engine):
    """Mooncake's shortest messages (a NOTIFY with one-letter name and message: 39 bytes) are shorter than the
    40 bytes the listener reads with a moonlet prefix: they are handed over as soon as they are recognised."""
    note = MP.encode_handshake(MP.NOTIFY, {"name": "a", "notify_msg": "b"})
    assert len(note) < 40
    assert handshake(wire_engine.name, MP.NOTIFY, {"name": "a", "notify_msg": "b"}, timeout=3.0) == \
        (MP.NOTIFY, {"name": "", "notify_msg": "success"})
    assert wire_engine.notifications() == [("a", "b")]


def _hostile_rpc(answer: bytes, trickle: float = 0.0) -> tuple[str, threading.Thread, socket.socket]:
    """A fake Mooncake RPC port that reads one handshake message and answers ``answer`` (a byte every
    ``trickle`` seconds if set)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def run() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(1 << 20)
                if not trickle:
                    conn.sendall(answer)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)
                    return
                for i in range(len(answer)):
                    conn.sendall(answer[i:i + 1])
                    time.sleep(trickle)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return f"127.0.0.1:{srv.getsockname()[1]}", t, srv


@pytest.mark.parametrize("answer, why", [
    (message(MP.METADATA, b"[" * 60000), "deeper"),
    (message(MP.METADATA, b'{"x":' * 20000 + b"0" + b"}" * 20000), "deeper"),
    (MP.encode_handshake(MP.METADATA, {"name": "mc", "protocol": "tcp", "tcp_data_port": 1 << 70}), "out of range"),
    (message(MP.METADATA, b'{"name": "mc", "protocol": "tcp", "tcp_data_port": 1e999}'), "tcp_data_port must be int"),
], ids=["deep-array", "deep-object", "huge-port", "infinite-port"])
def test_opening_a_hostile_mooncake_peer_raises_metadata_error(answer, why):
    """The initiator side of the handshake: what a hostile peer answers becomes a MetadataError naming it."""
    endpoint, t, srv = _hostile_rpc(answer)
    try:
        with TransferEngine(config=EngineConfig(mooncake_wire=True, metadata_timeout=3.0)) as eng:
            with pytest.raises(MetadataError, match=why):
                eng.open_segment(endpoint)
    finally:
        srv.close()
        t.join(10)


def test_a_trickled_answer_ends_at_the_metadata_timeout():
    """A peer that answers a byte every 0.2 s cannot hold the initiator past metadata_timeout."""
    answer = MP.encode_handshake(MP.METADATA, {"name": "mc", "protocol": "tcp", "pad": "p" * 200})
    endpoint, t, srv = _hostile_rpc(answer, trickle=0.2)
    try:
        with TransferEngine(config=EngineConfig(mooncake_wire=True, metadata_timeout=1.0)) as eng:
            start = time.monotonic()
            with pytest.raises(MetadataError, match="no complete Mooncake handshake answer .* within 1 s"):
                eng.open_segment(endpoint)
            assert time.monotonic() - start < 3.0
    finally:
        srv.close()
        t.join(10)


def test_trickling_handshakes_keep_threads_and_memory_bounded(peer_factory):
    """600 handshakes that send their first bytes and then one byte every 0.5 s, against max_connections=8:
    the target's thread count and RSS stay flat, and an honest handshake is answered alongside and after."""
    target = peer_factory("--size", str(1 << 20), "--config", json.dumps({"mooncake_wire": True,
                                                                          "max_connections": 8}))
    host = target.name.rsplit(":", 1)[0]
    dport = data_port(target.name)
    threads0, rss0 = proc_status(target.pid, "Threads"), rss_kib(target.pid)
    head = MP.encode_handshake(MP.METADATA, {"name": "t" * 4000})[:40]  # the listener hands over after 40 bytes
    socks = []
    try:
        for _ in range(600):
            try:
                s = connect(target.name, timeout=2)
                s.sendall(head)
            except OSError:
                continue
            socks.append(s)
        most = proc_status(target.pid, "Threads")
        for rnd in range(4):
            time.sleep(0.5)
            for s in list(socks):
                try:
                    s.send(b"t", socket.MSG_DONTWAIT)
                except OSError:
                    s.close()
                    socks.remove(s)
            most = max(most, proc_status(target.pid, "Threads"))
            if rnd == 2:  # alongside: the tricklers still hold their handshakes
                assert data_port(target.name) == dport
        assert most - threads0 <= 4, f"{most} threads (from {threads0})"
        assert rss_kib(target.pid) - rss0 < 32 * 1024  # KiB
    finally:
        for s in socks:
            s.close()
    assert data_port(target.name) == dport  # and after
    with socket.create_connection((host, dport), timeout=5) as s:
        assert sha(mooncake_read(s, target.addr, 1 << 20)) == target.digest(target.addr, 1 << 20)


# -- the data port ------------------------------------------------------------------------------

def test_a_reply_nobody_reads_does_not_spin_the_data_port(peer_factory):
    """A READ whose reply is never read, plus one byte more: the target's reactor sleeps until the reader
    reads, then the bytes arrive intact."""
    size = 16 << 20
    target = peer_factory("--size", str(size), "--config", json.dumps({"mooncake_wire": True}))
    host, _ = target.name.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    with s:
        s.connect((host, data_port(target.name)))
        s.sendall(MP.encode_header(MP.READ, target.addr, size, True) + b"\x01")
        time.sleep(0.3)  # the reply fills the socket buffers and waits
        before = cpu_seconds(target.pid)
        time.sleep(1.5)
        used = cpu_seconds(target.pid) - before
        assert used < 0.3 * 1.5, f"the target burnt {used:.2f} s of CPU in 1.5 s"
        assert MP.parse_status(recv_exact(s, MP.STATUS.size))
        assert sha(recv_exact(s, size)) == target.digest(target.addr, size)


def test_idle_data_connections_are_closed():
    """A data connection that sends no request (or half a header) for idle_timeout is closed; one that keeps
    sending requests is not."""
    with TransferEngine(config=EngineConfig(request_timeout=10.0, mooncake_wire=True, idle_timeout=0.5)) as eng:
        mem = bytearray(os.urandom(1 << 16))
        buf = eng.register(mem)
        host, dport, _ = MP.split_data_endpoint(eng.descriptor().endpoints["mooncake_tcp"])
        idle = socket.create_connection((host, dport), timeout=5)
        half = socket.create_connection((host, dport), timeout=5)
        busy = socket.create_connection((host, dport), timeout=5)
        with idle, half, busy:
            assert mooncake_read(idle, buf.addr, 4096) == mem[:4096]
            half.sendall(MP.encode_header(MP.READ, buf.addr, 10, True)[:10])
            end = time.monotonic() + 2.0
            k = 0
            while time.monotonic() < end:  # a request every 0.2 s
                off = (k * 4096) % len(mem)
                assert mooncake_read(busy, buf.addr + off, 4096) == mem[off:off + 4096]
                k += 1
                time.sleep(0.2)
            assert closed_without_answer(idle, 1.0) and closed_without_answer(half, 1.0)
            assert mooncake_read(busy, buf.addr, len(mem)) == mem


@pytest.mark.parametrize("ram, rpc_meta, why", [
    (b'{"a":' + b"[" * 60000, b'{"ip_or_host_name": "127.0.0.1", "rpc_port": 1}', "deeper"),
    (b'{"protocol": "tcp", "tcp_data_port": 7000, "buffers": [{"addr": 1e999, "length": 1}]}',
     b'{"ip_or_host_name": "127.0.0.1", "rpc_port": 1}', "addr must be int"),
    (b'{"protocol": "tcp"}', b'{"ip_or_host_name": "h", "rpc_port": 1e999}', "rpc_port"),
    (b'{"protocol": "tcp"}', b"[" * 5000, "rpc_meta"),
], ids=["deep-descriptor", "infinite-addr", "infinite-rpc-port", "deep-rpc-meta"])
def test_poisoned_mooncake_keys_in_a_store_are_metadata_errors(metadata_server, ram, rpc_meta, why):
    """Mooncake's keys in a real HTTP metadata store, written by anyone: parsed bounded and checked."""
    import urllib.request

    def put(key: str, value: bytes) -> None:
        req = urllib.request.Request(f"{metadata_server.url}?key={key}", data=value, method="PUT")
        urllib.request.urlopen(req, timeout=5).close()

    put("mooncake/ram/poisoned", ram)
    put("mooncake/rpc_meta/poisoned", rpc_meta)
    with TransferEngine("reader", metadata_server.url, config=EngineConfig(mooncake_wire=True)) as eng:
        with pytest.raises(MetadataError, match=why):
            eng.open_segment("poisoned")
