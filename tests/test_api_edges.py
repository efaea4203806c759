"""API rough edges: all-or-nothing registration, numpy integers as arguments, Batch.check's statuses, a p2p name
that points at something other than moonlet, and how far a local range overruns its buffer."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from helpers.engines import initiator, transport
from helpers.memory import register_random, sha
from helpers.procs import open_fds
from moonlet import (
    EngineConfig,
    MemoryAccessError,
    MetadataError,
    MetadataServer,
    MoonletError,
    Op,
    RegistrationError,
    Request,
    State,
    TransferEngine,
)
from moonlet.memory import address_of


def test_register_with_the_metadata_server_down_is_all_or_nothing() -> None:
    srv = MetadataServer(port=0).start()
    port = srv.port
    with initiator("edges-reg", srv.url, metadata_timeout=2.0) as eng:
        kept, _ = register_random(eng, 4096)
        srv.stop()
        before = [(b.addr, b.length) for b in eng.buffers()]
        fds = open_fds()
        data = bytearray(os.urandom(8192))
        with pytest.raises(MetadataError):
            eng.register(data)
        with pytest.raises(MetadataError):
            eng.allocate(1 << 20)
        assert [(b.addr, b.length) for b in eng.buffers()] == before
        assert open_fds() == fds  # the allocate()'s shared memory was released
        srv = MetadataServer(port=port).start()  # back, on the same port
        try:
            buf = eng.register(data)  # no "already registered"
            shared = eng.allocate(1 << 20)
            assert [(b.addr, b.length) for b in eng.buffers()] == sorted(
                [(kept.addr, kept.length), (buf.addr, buf.length), (shared.addr, shared.length)])
            with initiator(metadata=srv.url, name="edges-reader") as peer:
                seg = peer.open_segment("edges-reg")
                assert seg.find(buf.addr, len(data)) is not None
                assert seg.find(shared.addr, 1 << 20) is not None
        finally:
            eng.close()
            srv.stop()


def test_register_many_publishes_once_and_is_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from moonlet.metadata.http import HttpMetadata

    published: list[bytes] = []
    real = HttpMetadata.publish

    def counted(self: HttpMetadata, name: str, value: bytes) -> None:
        published.append(value)
        real(self, name, value)

    monkeypatch.setattr(HttpMetadata, "publish", counted)
    srv = MetadataServer(port=0).start()
    try:
        with initiator("edges-many", srv.url) as eng, initiator(metadata=srv.url, name="edges-many-peer") as peer:
            areas = [bytearray(os.urandom(4096 + 64 * i)) for i in range(50)]
            raw = bytearray(os.urandom(8192))
            raw_addr = address_of(raw)[0]
            published.clear()
            bufs = eng.register_many([*areas, (raw_addr, len(raw))])
            assert len(published) == 1  # one descriptor for the 51 ranges, not 51 ever longer ones
            assert [b.addr for b in bufs[:-1]] == [address_of(a)[0] for a in areas]
            assert (bufs[-1].addr, bufs[-1].length) == (raw_addr, len(raw))
            seg = peer.open_segment("edges-many")
            got = bytearray(len(raw))
            lbuf = peer.register(got)
            for i in (0, 17, 49):  # the peer reaches them through the one descriptor, bytes compared
                assert peer.read(lbuf.addr, seg, bufs[i].addr, len(areas[i])).ok
                assert sha(got[:len(areas[i])]) == sha(areas[i])
            assert peer.read(lbuf.addr, seg, raw_addr, len(raw)).ok and got == raw

            before = [(b.addr, b.length) for b in eng.buffers()]
            fresh, other = bytearray(os.urandom(4096)), bytearray(os.urandom(4096))
            with pytest.raises(MoonletError, match=r"targets\[1\]: .*already registered"):
                eng.register_many([fresh, areas[3]])  # the second is registered already: neither stays
            with pytest.raises(MoonletError, match=r"targets\[1\]: .*already registered"):
                eng.register_many([fresh, fresh])  # the same range twice in one call
            with pytest.raises(RegistrationError, match=r"targets\[1\]: .*not an \(address, length\) pair"):
                eng.register_many([fresh, (raw_addr,)])
            with pytest.raises(MemoryAccessError, match=r"targets\[0\]: length must be an integer"):
                eng.register_many([(fresh, True)])
            with pytest.raises(RegistrationError, match="use register"):
                eng.register_many((raw_addr, len(raw)))  # one pair, not a sequence of them
            with pytest.raises(RegistrationError, match="use register"):
                eng.register_many(fresh)  # a buffer, not a sequence of them
            # A transport refusing the third buffer: the two it took are withdrawn from it, nothing stays.
            tcp = transport(eng, "tcp")
            took, gave_back = [], []
            real_register, real_unregister = tcp.register, tcp.unregister

            def refuse_third(buf):
                if len(took) == 2:
                    raise RegistrationError("refused for the test")
                took.append(buf.addr)
                real_register(buf)

            def unregister(buf):
                gave_back.append(buf.addr)
                real_unregister(buf)

            monkeypatch.setattr(tcp, "register", refuse_third)
            monkeypatch.setattr(tcp, "unregister", unregister)
            third = bytearray(os.urandom(4096))
            with pytest.raises(RegistrationError, match="refused for the test"):
                eng.register_many([fresh, other, third])
            assert sorted(gave_back) == sorted(took) and len(took) == 2
            assert [(b.addr, b.length) for b in eng.buffers()] == before
            monkeypatch.setattr(tcp, "register", real_register)
            again = eng.register_many([fresh, other, third])  # the refusal left nothing behind to trip on
            for buf in again:
                eng.unregister(buf)
            srv.stop()
            with pytest.raises(MetadataError):
                eng.register_many([fresh, [address_of(other)[0], len(other)]])
            assert [(b.addr, b.length) for b in eng.buffers()] == before
            assert eng.register_many([]) == []
    finally:
        srv.stop()


@pytest.fixture
def pair() -> Iterator[tuple]:
    """An initiator with random local memory and a target with random memory, connected over TCP."""
    with initiator() as target, initiator() as eng:
        rbuf, rview = register_random(target, 1 << 16)
        lbuf, lview = register_random(eng, 1 << 16)
        yield eng, eng.open_segment(target.name), lbuf, lview, rbuf, rview


def test_write_and_read_take_numpy_integers(pair: tuple) -> None:
    eng, seg, lbuf, lview, rbuf, rview = pair
    n = np.int64(4096)
    status = eng.write(np.int64(lbuf.addr), seg, np.uint64(rbuf.addr + 8192), n)
    assert status.ok
    assert sha(rview[8192:12288]) == sha(lview[:4096])
    status = eng.read(np.int64(lbuf.addr + 16384), seg, np.int64(rbuf.addr), np.int32(2048))
    assert status.ok
    assert sha(lview[16384:16384 + 2048]) == sha(rview[:2048])
    with pytest.raises(MemoryAccessError, match="must be integers"):
        eng.write(float(lbuf.addr), seg, rbuf.addr, 16)


def test_batch_check_returns_the_statuses(pair: tuple) -> None:
    eng, seg, lbuf, lview, rbuf, rview = pair
    batch = eng.submit([Request(Op.WRITE, lbuf.addr + i * 1024, seg, rbuf.addr + i * 2048, 1024) for i in range(4)])
    statuses = batch.check()
    assert statuses is not None and len(statuses) == 4
    assert all(s.state is State.COMPLETED and s.transport == "tcp" for s in statuses)
    for i in range(4):
        assert sha(rview[i * 2048:i * 2048 + 1024]) == sha(lview[i * 1024:(i + 1) * 1024])


def test_local_overrun_says_by_how_many_bytes(pair: tuple) -> None:
    eng, seg, lbuf, lview, rbuf, rview = pair
    with pytest.raises(MemoryAccessError, match=rf"overruns registered buffer \[{lbuf.addr:#x}, \+65536\) "
                                                r"by 100 byte\(s\)"):
        eng.write(lbuf.addr + 65536 - 1000, seg, rbuf.addr, 1100)
    with pytest.raises(MemoryAccessError, match="no registered buffer holds its start"):
        eng.write(lbuf.addr + 65536, seg, rbuf.addr, 16)


def test_remote_overrun_says_by_how_many_bytes(pair: tuple) -> None:
    eng, seg, lbuf, lview, rbuf, rview = pair
    before = sha(rview)
    status = eng.submit([Request(Op.WRITE, lbuf.addr, seg, rbuf.addr + 65536 - 1000, 1100)]).wait()[0]
    assert status.state is State.FAILED
    assert f"overruns buffer [{rbuf.addr:#x}, +65536) by 100 byte(s)" in status.reason, status.reason
    status = eng.submit([Request(Op.READ, lbuf.addr, seg, rbuf.addr + 65536, 16)]).wait()[0]
    assert status.state is State.FAILED and f"none of its buffers holds the start {rbuf.addr + 65536:#x}" \
        in status.reason, status.reason
    assert sha(rview) == before


def test_a_misspelled_setting_is_warned_about_once(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MOONLET_LANE", "7")  # MOONLET_LANES meant
    monkeypatch.setenv("MOONLET_UNRELATED_KNOB", "1")  # close to nothing: another tool's, not a typo
    with caplog.at_level(logging.WARNING, logger="moonlet"):
        cfg = EngineConfig.from_env()
        EngineConfig.from_env()
    assert cfg.lanes == EngineConfig().lanes  # ignored, as the warning says
    warned = [r.getMessage() for r in caplog.records if "MOONLET_LANE " in r.getMessage() + " "]
    assert warned == ["MOONLET_LANE is not a moonlet setting and is ignored; did you mean MOONLET_LANES?"]
    assert "UNRELATED" not in caplog.text


class _Impostor:
    """A plain TCP listener that is not moonlet: it answers each connection with ``reply`` (none: it never
    accepts, so the kernel completes the handshake and nothing ever answers) and holds it open."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.name = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        if reply is not None:
            threading.Thread(target=self._serve, args=(reply,), daemon=True).start()

    def _serve(self, reply: bytes) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            self._held.append(conn)
            conn.sendall(reply)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


@pytest.mark.parametrize("reply", [b"+OK\r\n", None], ids=["junk", "silent"])
def test_p2p_name_of_a_port_that_is_not_moonlet(reply: bytes | None) -> None:
    impostor = _Impostor(reply)
    try:
        with initiator(metadata_timeout=1.0, connect_timeout=1.0) as eng:
            t0 = time.monotonic()
            with pytest.raises(MoonletError) as err:
                eng.open_segment(impostor.name)
            took = time.monotonic() - t0
    finally:
        impostor.close()
    msg = str(err.value)
    assert impostor.name in msg
    if reply is None:
        assert "did not answer within 1 s" in msg
        assert 0.9 < took < 2.0
    else:
        assert "does not speak moonlet's protocol (bad magic" in msg and "b'+O'" in msg
        assert took < 0.9  # at once, not after the timeout


def test_two_engines_of_one_process_use_the_same_process_path() -> None:
    """No socket between engines of one process: a checked memmove, with the owner's rights enforced."""
    with TransferEngine() as target, TransferEngine() as eng:
        remote = bytearray(os.urandom(1 << 20))
        rbuf = target.register(remote)
        ro = bytearray(os.urandom(4096))
        robuf = target.register(ro, remote_write=False)
        local = bytearray(os.urandom(1 << 20))
        lbuf = eng.register(local)
        seg = eng.open_segment(target.name)
        status = eng.write(lbuf.addr, seg, rbuf.addr + 100, 65536)
        assert status.transport == "local"
        assert sha(remote[100:100 + 65536]) == sha(local[:65536])
        statuses = eng.submit_many(Op.READ, seg, [lbuf.addr + i * 8192 for i in range(32)],
                                   [rbuf.addr + i * 4096 for i in range(32)], [4096] * 32).check()
        assert {s.transport for s in statuses} == {"local"}
        for i in range(32):
            assert local[i * 8192:i * 8192 + 4096] == remote[i * 4096:(i + 1) * 4096]
        before = bytes(ro)
        refused = eng.submit([Request(Op.WRITE, lbuf.addr, seg, robuf.addr, 4096)]).wait()[0]
        assert refused.state is State.FAILED and "does not allow this access" in refused.reason
        assert bytes(ro) == before  # the owner's rights hold on this path too
        target.close()
        gone = eng.submit([Request(Op.WRITE, lbuf.addr, seg, rbuf.addr, 4096)]).wait()[0]
        assert gone.state is State.FAILED, gone


def test_engines_of_one_process_with_different_secrets_do_not_take_the_short_path() -> None:
    """The same-process path admits whom the wire would: the same secret, or none on either side."""
    secret = "s" * 32
    with TransferEngine(secret=secret) as target, TransferEngine(secret=secret) as same, \
            TransferEngine(secret="t" * 32) as other:
        remote = bytearray(os.urandom(4096))
        rbuf = target.register(remote)
        for eng in (same, other):
            local = bytearray(os.urandom(4096))
            lbuf = eng.register(local)
            before = bytes(remote)
            if eng is same:
                status = eng.submit([Request(Op.WRITE, lbuf.addr, target.name, rbuf.addr, 4096)]).wait()[0]
                assert status.ok and status.transport == "local" and remote == local
            else:  # neither the memmove nor the wire: the handshake refuses the other secret
                with pytest.raises(MetadataError, match="failed to prove it holds the cluster secret"):
                    eng.submit([Request(Op.WRITE, lbuf.addr, target.name, rbuf.addr, 4096)])
                assert bytes(remote) == before
