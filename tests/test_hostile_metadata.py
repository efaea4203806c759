"""Hostile metadata: poisoned descriptors in every store, a store writer without the secret, and an HTTP
metadata server under abuse (cut-off, stalled and oversized PUTs) -- real servers, real sockets."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

import pytest

from helpers.engines import initiator
from helpers.memory import register_random
from helpers.net import connect, metadata_http
from helpers.procs import rss_kib, wait_threads
from helpers.stores import Store
from moonlet import MetadataServer, SegmentError
from moonlet.errors import ProtocolError
from moonlet.metadata import EtcdMetadata, HttpMetadata, RedisMetadata
from moonlet.security import Secret, Security
from moonlet.segment import SegmentDescriptor
from moonlet.transport.tcp import protocol as P
from moonlet.transport.tcp.dial import dial

SECRET = "correct horse battery staple"
TIMEOUT = 5.0


def descriptor(**fields) -> bytes:
    """A well-formed descriptor of segment "victim", with ``fields`` replaced."""
    d = {"version": 1, "name": "victim", "instance": "i0", "host": "h", "pid": 1, "pidns": "", "generation": 0,
         "control": None, "endpoints": {"tcp": "127.0.0.1:1"}, "transports": ["tcp"],
         "buffers": [{"addr": 1 << 20, "length": 4096, "location": "cpu:0", "remote_read": True,
                      "remote_write": True}]}
    d.update(fields)
    return json.dumps(d).encode()


def buffer(**fields) -> list[dict]:
    return [{"addr": 1 << 20, "length": 4096, "location": "cpu:0", **fields}]


# Each: the bytes, and what the SegmentError must name.
HOSTILE = {
    "deep nesting": (b"[" * 60000, "nested deeper"),
    "address 1e400": (descriptor(buffers=buffer(addr="1e400")).replace(b'"1e400"', b"1e400"), "buffers[0].addr"),
    "address 2**70": (descriptor(buffers=buffer(addr=1 << 70)), "buffers[0].addr"),
    "negative length": (descriptor(buffers=buffer(length=-4096)), "buffers[0].length"),
    "zero length": (descriptor(buffers=buffer(length=0)), "buffers[0].length"),
    "range past 2**64": (descriptor(buffers=buffer(addr=(1 << 64) - 4096, length=8192)), "buffers[0].length"),
    "float address": (descriptor(buffers=buffer(addr=4096.5)), "buffers[0].addr"),
    "right as a string": (descriptor(buffers=buffer(remote_write="no")), "buffers[0].remote_write"),
    "bool pid": (descriptor(pid=True), "pid"),
    "endpoint not text": (descriptor(endpoints={"tcp": 7}), "endpoints['tcp']"),
    "too many buffers": (descriptor(buffers=[0] * 200_000), "buffers has 200000 entries"),
    "huge text": (descriptor(host="h" * 100_000), "host is 100000 characters"),
}


# == defect 1: descriptors are parsed bounded and checked field by field, from every store ====================

@pytest.fixture(params=["p2p", "http", "etcd", "redis"])
def store(request, tmp_path):
    """(kind, metadata URL, planter): a real store, and a writer of it (``planter.publish(name, bytes)``)."""
    kind = request.param
    if kind == "p2p":
        with FakePeer() as fake:
            yield kind, "p2p", fake
        return
    if kind == "http":
        with MetadataServer(port=0) as srv:
            yield kind, srv.url, HttpMetadata(srv.url, TIMEOUT)
        return
    srv = Store(kind, str(tmp_path)).start()
    try:
        backend = (EtcdMetadata if kind == "etcd" else RedisMetadata)(srv.url, TIMEOUT, 30)
        yield kind, srv.url, backend
        backend.close()
    finally:
        srv.stop()


class FakePeer:
    """A peer-to-peer "engine" that answers every GET_DESC with the descriptor it was given."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)  # how soon the accept loop sees it should stop
        self.name = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.body = b"{}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def publish(self, name: str, body: bytes) -> None:
        self.body = body

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    head = conn.recv(P.PREFIX_SIZE + P.MIN_TARGET_TAIL, socket.MSG_WAITALL)
                    conn.sendall(P.encode_control(P.DESC, self.body, P.parse_prefix(head).req_id))
                except (OSError, ProtocolError):
                    pass

    def __enter__(self) -> FakePeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(TIMEOUT * 2)
        self._sock.close()


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_descriptor_is_a_segment_error_naming_the_field(case):
    data, field = HOSTILE[case]
    with pytest.raises(SegmentError, match="segment descriptor") as err:
        SegmentDescriptor.from_json(data)
    assert field in str(err.value)


def test_every_store_hands_hostile_descriptors_to_the_check(store):
    """Poisoned descriptors planted in a store (or served by a peer) are refused by open_segment with a
    SegmentError naming the field; nothing else escapes and no request gets as far as a transport."""
    kind, url, planter = store
    with initiator("reader", url) as eng:
        name = planter.name if kind == "p2p" else "victim"
        for case, (data, field) in HOSTILE.items():
            if kind == "p2p":
                data = data.replace(b'"victim"', json.dumps(name).encode())
            planter.publish(name, data)
            with pytest.raises(SegmentError) as err:
                eng.open_segment(name)
            assert field in str(err.value), (case, str(err.value))
        # A good descriptor still opens: the checks refuse only what is wrong.
        planter.publish(name, descriptor(name=name))
        assert eng.open_segment(name).buffers[0].addr == 1 << 20


# == defect 3: a store writer without the secret, and a relay of the AUTH handshake =============================

class Relay:
    """The attacker's listener: relays each connection byte for byte to the real target (a thread each, at
    most 8) and, once the initiator has gone, uses the connection it holds to the target itself (a READ of
    the target's memory).  ``outcomes`` gets, per relayed connection, the kind of frame the target answered
    that READ with (or "closed") and the frame's body."""

    def __init__(self, target: str, addr: int) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.endpoint = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._target = target
        self._addr = addr
        self.connections = 0
        self.outcomes: list[tuple[str, bytes]] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        while not self._stop and self.connections < 8:
            try:
                down, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            t = threading.Thread(target=self._relay, args=(down,), daemon=True)
            self._threads.append(t)
            t.start()

    def _relay(self, down: socket.socket) -> None:
        with down, connect(self._target, TIMEOUT) as up:
            self._pump(down, up)
            self.outcomes.append(self._use(up))

    @staticmethod
    def _pump(down: socket.socket, up: socket.socket) -> None:
        """Both ways until the initiator closes (bounded by TIMEOUT)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([down, up], [], [], 0.1)
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if s is down and not data:
                    return
                if data:
                    (up if s is down else down).sendall(data)

    def _use(self, up: socket.socket) -> tuple[str, bytes]:
        try:
            up.sendall(P.encode_request(P.READ, 77, [(self._addr, 64)]))
            head = up.recv(P.PREFIX_SIZE, socket.MSG_WAITALL)
            if len(head) < P.PREFIX_SIZE:
                return "closed", b""
            kind = P.PREFIX.unpack_from(head)[2]
            body = up.recv(64 << 10)
            return P.KINDS.get(kind, str(kind)), body
        except OSError:
            return "closed", b""

    def close(self) -> None:
        self._stop = True
        for t in list(self._threads):
            t.join(TIMEOUT * 3)
        self._sock.close()


@pytest.fixture
def guarded(peer_factory):
    """A metadata server and a target engine (another process) publishing to it, holding SECRET."""
    with MetadataServer(port=0) as srv:
        target = peer_factory("--metadata", srv.url, "--name", "victim", "--config", json.dumps({"secret": SECRET}))
        yield srv, target


@pytest.mark.parametrize("forgery", ["seal kept", "seal dropped"])
def test_store_writer_without_the_secret_cannot_reroute_a_segment(guarded, forgery):
    """The attacker rewrites the victim's endpoints.tcp in the HTTP store to its relay; the honest initiator
    refuses the descriptor, the relay never gets an authenticated channel, the target's bytes are unchanged."""
    srv, target = guarded
    before = target.digest(target.addr, 1 << 20)
    status, raw = metadata_http(srv, "GET", "moonlet/segments/victim")
    assert status == 200
    d = json.loads(raw)
    relay = Relay(d["endpoints"]["tcp"], target.addr)
    try:
        d["endpoints"]["tcp"] = relay.endpoint
        if forgery == "seal dropped":
            d.pop("hmac", None)
        forged = json.dumps(d, separators=(",", ":")).encode()
        assert metadata_http(srv, "PUT", "moonlet/segments/victim", forged)[0] == 200
        with initiator("honest", srv.url, secret=SECRET) as eng:
            buf, _ = register_random(eng, 1 << 16)
            with pytest.raises(SegmentError, match="not signed with the cluster secret" if forgery == "seal dropped"
                               else "wrong signature"):
                eng.open_segment("victim")
                eng.write(buf.addr, "victim", target.addr, 1 << 16)
    finally:
        relay.close()
    assert relay.connections == 0 and not relay.outcomes  # the initiator never dialed the relay
    assert target.digest(target.addr, 1 << 20) == before


def test_a_sealed_descriptor_is_valid_only_under_its_own_name(guarded, peer_factory):
    """A store writer copies one engine's (validly sealed) descriptor under another segment's name."""
    srv, target = guarded
    peer_factory("--metadata", srv.url, "--name", "other", "--config", json.dumps({"secret": SECRET}))
    _, raw = metadata_http(srv, "GET", "moonlet/segments/victim")
    assert metadata_http(srv, "PUT", "moonlet/segments/other", raw)[0] == 200
    with initiator("honest", srv.url, secret=SECRET) as eng:
        with pytest.raises(SegmentError, match="wrong signature"):
            eng.open_segment("other")
        assert eng.open_segment("victim").descriptor.pid == target.pid  # the real one still opens


def test_unsigned_descriptors_are_refused_when_a_secret_is_set(guarded):
    """An engine without the secret publishes to the same store: engines with the secret refuse its
    descriptor, saying why; without a secret nothing changes (they open each other as before)."""
    srv, _ = guarded
    with initiator("plain", srv.url) as plain, initiator("honest", srv.url, secret=SECRET) as eng:
        with pytest.raises(SegmentError, match="not signed with the cluster secret"):
            eng.open_segment("plain")
        assert plain.open_segment("victim").name == "victim"  # a secret engine's descriptor reads as before


def test_a_relayed_handshake_fails_on_both_sides(peer_factory):
    """dial() of the attacker's endpoint (no descriptor involved): the relay passes the AUTH messages to the
    real target, the initiator refuses the target's proof, and the relay's own READ is refused."""
    target = peer_factory("--config", json.dumps({"secret": SECRET}))
    relay = Relay(target.name, target.addr)
    try:
        with pytest.raises(ProtocolError, match="failed to prove it holds the cluster secret as the engine"):
            dial(relay.endpoint, TIMEOUT, Security(Secret(SECRET.encode()))).close()
        deadline = time.monotonic() + TIMEOUT
        while not relay.outcomes and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        relay.close()
    assert len(relay.outcomes) == 1
    kind, body = relay.outcomes[0]
    assert kind in ("ERROR", "closed") and (kind == "closed" or b"authentication" in body), relay.outcomes


def test_a_proof_made_for_the_relay_is_refused_by_the_target(peer_factory):
    """The target's half: even a careless initiator that sends its proof without checking the target's
    (made for the endpoint it dialed: the relay's) does not get the relayed connection authenticated."""
    from moonlet.security.auth import _INITIATOR, NONCE

    target = peer_factory("--config", json.dumps({"secret": SECRET}))
    relay = Relay(target.name, target.addr)
    try:
        with connect(relay.endpoint, TIMEOUT) as s:
            opening = os.urandom(NONCE)
            s.sendall(P.encode_control(P.AUTH, opening))
            head = s.recv(P.PREFIX_SIZE, socket.MSG_WAITALL)
            answer = s.recv(P.parse_prefix(head).payload_len, socket.MSG_WAITALL)
            proof = Secret(SECRET.encode()).mac(_INITIATOR, opening, answer[:NONCE], relay.endpoint.encode())
            s.sendall(P.encode_control(P.AUTH, proof) + P.encode_request(P.READ, 5, [(target.addr, 64)]))
            head = s.recv(P.PREFIX_SIZE, socket.MSG_WAITALL)
            assert P.PREFIX.unpack_from(head)[2] == P.ERROR
            assert b"authentication failed" in s.recv(4096)
    finally:
        relay.close()


def test_a_connection_meant_for_another_segment_is_refused(peer_factory):
    """The proofs cover the segment name the initiator means, and the target says when it is not its own."""
    target = peer_factory("--config", json.dumps({"secret": SECRET}))
    security = Security(Secret(SECRET.encode()))
    dial(target.name, TIMEOUT, security, target.name).close()
    with pytest.raises(ProtocolError, match="meant for another segment"):
        dial(target.name, TIMEOUT, security, "someone-else").close()


# == defect 15: the HTTP metadata server under abuse ==================================================

def _raw_put(srv: MetadataServer, key: str, announced: int, body: bytes) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    s.sendall(f"PUT /metadata?key={key} HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}\r\n\r\n".encode() + body)
    return s


def _status(s: socket.socket) -> str:
    """The status line the server answered on ``s`` ("" if it closed without one)."""
    try:
        return s.recv(4096).split(b"\r\n", 1)[0].decode()
    except OSError:
        return ""


def test_a_cut_off_put_is_not_stored(metadata_server):
    good = descriptor()
    assert metadata_http(metadata_server, "PUT", "k", good) == (200, b"metadata updated")
    s = _raw_put(metadata_server, "k", 1000, b"{" + os.urandom(15))  # 16 of 1,000 bytes, then gone
    s.shutdown(socket.SHUT_WR)
    assert " 200 " not in _status(s)
    s.close()
    assert metadata_http(metadata_server, "GET", "k") == (200, good)


def test_stalled_puts_are_capped_and_dropped_after_the_timeout():
    """40 PUTs that stall after 16 of 1,000 bytes: at most 8 get a thread, the others are refused at once;
    the 8 are dropped at their deadline with nothing stored, and the server serves on."""
    base = threading.active_count()
    with MetadataServer(port=0, max_clients=8, timeout=1.0) as srv:
        stalled = [_raw_put(srv, f"k{i}", 1000, os.urandom(16)) for i in range(40)]
        time.sleep(0.5)
        assert threading.active_count() <= base + 1 + 8  # the serving thread, and at most 8 handlers
        statuses = [_status(s) for s in stalled]  # the refused at once, the others at their deadline
        assert sum(st.startswith("HTTP/1.1 503") for st in statuses) >= 30, statuses
        assert not any(" 200 " in st for st in statuses), statuses
        assert wait_threads(base + 1, 3.0) <= base + 1
        assert all(metadata_http(srv, "GET", f"k{i}")[0] == 404 for i in range(40))
        assert metadata_http(srv, "PUT", "k0", b"{}") == (200, b"metadata updated")  # still serving
        for s in stalled:
            s.close()


def test_oversize_values_are_refused_and_memory_stays_bounded():
    mib = 1 << 20
    with MetadataServer(port=0, max_value=mib, max_total=8 * mib) as srv:
        s = _raw_put(srv, "big", 64 * mib, b"")  # refused from its Content-Length, before any byte is read
        assert _status(s).startswith("HTTP/1.1 413")
        s.close()
        value = os.urandom(mib)
        before = rss_kib() * 1024
        answers = [metadata_http(srv, "PUT", f"v{i}", value) for i in range(40)]
        grown = rss_kib() * 1024 - before
        stored = [i for i, (status, _) in enumerate(answers) if status == 200]
        assert 5 <= len(stored) < 8, answers
        full = [body for status, body in answers if status != 200]
        assert all(status in (200, 507) for status, _ in answers) and b"metadata store full" in full[0]
        assert grown < 8 * mib + 16 * mib, f"RSS grew by {grown >> 20} MiB for a store capped at 8 MiB"
        assert metadata_http(srv, "GET", f"v{stored[0]}") == (200, value)
        assert metadata_http(srv, "DELETE", f"v{stored[0]}")[0] == 200  # room again
        assert metadata_http(srv, "PUT", "again", value)[0] == 200
