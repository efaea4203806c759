"""Same-host paths against a poisoned metadata store, and notifications against a flooding peer.

Rights are the target's: a descriptor a store altered must not let an honest
initiator write (or read) shared memory the target keeps to itself, and the
kernel must refuse a writable mapping of it to anyone.  A peer sending
notifications must not grow the receiver's memory without a bound.
"""

from __future__ import annotations

import errno
import json
import mmap
import os

import pytest

from helpers.memory import sha
from helpers.net import metadata_http
from helpers.procs import rss_kib
from moonlet import EngineConfig, MoonletError, Op, Request, State, TransferEngine, TransferError
from moonlet.errors import ProtocolError
from moonlet.memory import SharedMemory
from moonlet.metadata.http import KEY_PREFIX
from moonlet.transport.shm import cma
from moonlet.transport.tcp import protocol as P
from moonlet.transport.tcp.dial import dial, read_control

pytestmark = pytest.mark.skipif(not (cma.AVAILABLE and hasattr(os, "memfd_create")),
                                reason="same-host mappings need Linux memfds")

SECRET = "hostile same host secret 0123456789"
DENIED = "does not allow this access"


def _store(srv, method: str, name: str, body: bytes | None = None) -> bytes:
    """GET or PUT the descriptor of ``name`` on the metadata server, over real HTTP."""
    status, data = metadata_http(srv, method, f"{KEY_PREFIX}{name}", body)
    assert status == 200, (status, data)
    return data


def _edit(value, match, change, seen: list):
    """``value`` (parsed JSON) with every dict for which ``match`` holds replaced by ``change(it)``; the
    dicts matched go to ``seen``. A descriptor wrapped as a JSON string (a signed envelope) is edited too."""
    if isinstance(value, dict):
        if match(value):
            seen.append(dict(value))
            return change(value)
        return {k: _edit(v, match, change, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_edit(v, match, change, seen) for v in value]
    if isinstance(value, str) and value.startswith("{"):
        try:
            inner = json.loads(value)
        except ValueError:
            return value
        return json.dumps(_edit(inner, match, change, seen), separators=(",", ":"))
    return value


def _flip(srv, name: str, addr: int, **changes) -> dict:
    """Rewrite the stored descriptor of ``name`` so the buffer at ``addr`` claims ``changes``; its entry as
    the target published it."""
    seen: list = []
    poisoned = _edit(json.loads(_store(srv, "GET", name)), lambda b: b.get("addr") == addr and "remote_write" in b,
                     lambda b: {**b, **changes}, seen)
    assert len(seen) == 1, "the buffer is not in the stored descriptor"
    _store(srv, "PUT", name, json.dumps(poisoned, separators=(",", ":")).encode())
    return seen[0]


def _control(srv, name: str) -> dict:
    """The generation page the stored descriptor of ``name`` offers (``{"memfd", "addr"}``)."""
    seen: list = []
    _edit(json.loads(_store(srv, "GET", name)), lambda d: "pidns" in d and "control" in d, lambda d: d, seen)
    assert len(seen) == 1 and seen[0]["control"], "no generation page in the stored descriptor"
    return seen[0]["control"]


def _assert_kernel_refuses_writable_map(pid: int, fd: int, size: int) -> bytes:
    """A writable shared mapping of the peer's memfd fails with EPERM (even for root); a read-only one
    works. The first bytes of the data, read through it."""
    f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError):
            os.pwrite(f, b"x", 4096)
        with mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ) as ro:
            return ro[4096:size]
    finally:
        os.close(f)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_flipped_remote_write_does_not_write_a_read_only_allocation(peer_factory, metadata_server, secret):
    config = json.dumps({"secret": secret} if secret else {})
    name = f"ro-target-{os.urandom(4).hex()}"
    target = peer_factory("--metadata", metadata_server.url, "--name", name, "--config", config)
    ro = target.call("allocate 65536 ro")["addr"]
    before = target.digest(ro, 65536)
    control = _control(metadata_server, name)
    published = _flip(metadata_server, name, ro, remote_write=True)
    assert published["remote_write"] is False and "memfd" in published  # sealed: offered for read-only mapping

    with TransferEngine(f"init-{os.urandom(4).hex()}", metadata_server.url,
                        config=EngineConfig(secret=secret, request_timeout=10.0)) as eng:
        mem = bytearray(os.urandom(65536))
        buf = eng.register(mem)
        try:
            seg = eng.open_segment(name)
        except MoonletError:  # a signed descriptor that was altered is refused outright
            assert secret is not None
        else:
            lone = eng.submit([Request(Op.WRITE, buf.addr, seg, ro, 65536)]).wait()[0]
            many = eng.submit_many(Op.WRITE, seg, [buf.addr + i * 4096 for i in range(16)],
                                   [ro + i * 4096 for i in range(16)], [4096] * 16).wait()
            for st in (lone, *many):
                assert st.state is State.FAILED
                if secret is None:  # the descriptor is believed: the target's own rights refuse it
                    assert DENIED in st.reason and st.transport == "shm", st.reason
            # Reading it is allowed, through the read-only mapping.
            back = bytearray(65536)
            assert eng.read(eng.register(back).addr, seg, ro, 65536).transport == "shm"
            assert sha(back) == before
    assert target.digest(ro, 65536) == before
    # Whatever a process was told, the kernel refuses it a writable mapping of the buffer and the generation page.
    assert sha(_assert_kernel_refuses_writable_map(target.pid, published["memfd"], 4096 + 65536)) == before
    _assert_kernel_refuses_writable_map(target.pid, control["memfd"], 4096 + 8)


def test_flipped_remote_read_does_not_read_an_unreadable_allocation(peer_factory, metadata_server):
    name = f"noread-target-{os.urandom(4).hex()}"
    target = peer_factory("--metadata", metadata_server.url, "--name", name)
    hidden = target.call("allocate 65536 noread")["addr"]
    published = _flip(metadata_server, name, hidden, remote_read=True)
    with TransferEngine(f"init-{os.urandom(4).hex()}", metadata_server.url,
                        config=EngineConfig(request_timeout=10.0)) as eng:
        mem = bytearray(os.urandom(65536))
        keep = bytes(mem)
        buf = eng.register(mem)
        seg = eng.open_segment(name)
        st = eng.submit([Request(Op.READ, buf.addr, seg, hidden, 4096)]).wait()[0]
        assert st.state is State.FAILED and DENIED in st.reason
        many = eng.submit_many(Op.READ, seg, [buf.addr + i * 4096 for i in range(8)],
                               [hidden + i * 4096 for i in range(8)], [4096] * 8).wait()
        assert all(s.state is State.FAILED and DENIED in s.reason for s in many)
        assert bytes(mem) == keep  # nothing of the target's landed here
        # Writing it is allowed (the target checked it).
        assert eng.write(buf.addr, seg, hidden, 65536).ok
        assert target.digest(hidden, 65536) == sha(keep)
    assert published["remote_read"] is False and "memfd" not in published  # a mapping cannot stop reads


def test_read_only_allocation_is_not_offered_for_mapping_where_it_cannot_be_sealed(monkeypatch):
    """Without F_SEAL_FUTURE_WRITE (Linux < 5.1) nothing would stop a peer mapping the memfd writable:
    peers are then not told about it, and go through the engine, which checks."""
    monkeypatch.setattr(SharedMemory, "_F_SEAL_FUTURE_WRITE", 1 << 30)  # a seal no kernel knows: EINVAL
    with TransferEngine() as eng:
        ro = eng.allocate(4096, remote_write=False)
        rw = eng.allocate(4096)
        assert "memfd" not in ro.describe() and rw.describe()["memfd"] == rw.keepalive.fd
        assert eng.descriptor().control is None  # nor the generation page


# -- notifications ------------------------------------------------------------------


def _raw_note(endpoint: str, body: dict) -> None:
    """Send one notification as raw CONNECT frame; raise ProtocolError with the receiver's refusal."""
    with dial(endpoint, 5.0) as sock:
        sock.sendall(P.encode_connect({"service": "notify", **body}))
        read_control(sock, P.CONNECT, "notification")


def test_oversize_and_malformed_notes_are_refused_on_receipt():
    with TransferEngine() as b:
        endpoint = b.descriptor().endpoints["tcp"]
        with pytest.raises(ProtocolError, match="notification too large"):
            _raw_note(endpoint, {"name": "x", "msg": "y" * 40000})  # past 32 Ki characters
        with pytest.raises(ProtocolError, match="notification too large"):
            _raw_note(endpoint, {"name": "n" * 20000, "msg": "y" * 20000})
        with pytest.raises(ProtocolError, match="string name and msg"):
            _raw_note(endpoint, {"name": ["x"], "msg": "y"})
        _raw_note(endpoint, {"name": "ok", "msg": "z" * 32000})
        assert b.notifications() == [("ok", "z" * 32000)]


def test_unread_notes_are_capped_in_bytes():
    """A peer sending the largest notes the receiver takes fills at most 16 MiB, then is told the queue is
    full; once the receiver reads its notes, the queue takes more."""
    with TransferEngine() as a, TransferEngine() as b:
        msg = os.urandom(16000).hex()  # 32,000 characters
        start = rss_kib() * 1024
        sent, refusal = 0, None
        for i in range(1600):  # 51 MB of notes, were they all kept
            try:
                a.notify(b.name, f"n{i}", msg)
            except TransferError as e:
                refusal = str(e)
                break
            sent += 1
        grown = rss_kib() * 1024 - start
        assert refusal is not None and "notification queue full" in refusal, f"{sent} notes taken"
        assert 400 <= sent <= 530  # 16 MiB of 32,000-character notes
        assert grown < 28 << 20, f"RSS grew {grown >> 20} MiB"
        with pytest.raises(TransferError, match="notification queue full"):
            a.notify(b.name, "more", msg)
        got = b.notifications()
        assert len(got) == sent and got[0] == ("n0", msg) and got[-1] == (f"n{sent - 1}", msg)
        a.notify(b.name, "again", "1")
        assert b.notifications() == [("again", "1")]


def test_a_flood_of_refused_notes_leaves_the_receiver_serving():
    """Refusals close only the sender's connection: the receiver goes on serving notes and transfers."""
    with TransferEngine() as a, TransferEngine() as b:
        endpoint = b.descriptor().endpoints["tcp"]
        for _ in range(20):
            with pytest.raises(ProtocolError):
                _raw_note(endpoint, {"name": "x", "msg": "y" * 33000})
        mem = bytearray(os.urandom(4096))
        dst = bytearray(4096)
        a.write(a.register(mem).addr, b.name, b.register(dst).addr, 4096)
        assert dst == mem
        a.notify(b.name, "done", "1")
        assert b.notifications() == [("done", "1")]
