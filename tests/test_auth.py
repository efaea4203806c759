"""The cluster secret: who may connect, what a peer without it gets, and what it never learns."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from helpers.engines import initiator
from helpers.memory import register_random, sha
from helpers.net import connect
from moonlet import EngineConfig, MetadataServer, TransferEngine
from moonlet import engine as engine_module
from moonlet.batch import Op, Request, State
from moonlet.errors import ConfigError, MetadataError
from moonlet.security import Secret, load_secret
from moonlet.security.auth import InitiatorAuth, TargetAuth
from moonlet.transport.tcp import protocol as P
from moonlet.transport.tcp.dial import read_control as _read_control

SECRET = "correct horse battery staple"
OTHER = "incorrect horse battery staple"


@pytest.fixture
def guarded(peer_factory):
    """A target engine in another process that holds SECRET."""
    return peer_factory("--config", json.dumps({"secret": SECRET}))


def test_same_secret_moves_bytes(guarded):
    with initiator(secret=SECRET) as eng:
        buf, m = register_random(eng, 1 << 20)
        seg = eng.open_segment(guarded.name)
        eng.write(buf.addr, seg, guarded.addr, 1 << 20)
        assert guarded.digest(guarded.addr, 1 << 20) == sha(m[:])
        eng.read(buf.addr, seg, guarded.addr + (4 << 20), 65536)
        assert sha(m[:65536]) == guarded.digest(guarded.addr + (4 << 20), 65536)


def test_no_secret_gets_nothing(guarded):
    with initiator() as eng:
        with pytest.raises(MetadataError, match="authentication required"):
            eng.open_segment(guarded.name)  # p2p: not even the descriptor


def test_no_secret_through_a_metadata_server_is_refused_on_the_data_path(peer_factory):
    with MetadataServer() as server:
        target = peer_factory("--metadata", server.url, "--name", "t1", "--config", json.dumps({"secret": SECRET}))
        before = target.digest(target.addr, 1 << 20)
        with TransferEngine("i1", server.url, config=EngineConfig(transports=("tcp",))) as eng:
            buf, _ = register_random(eng, 1 << 20)
            seg = eng.open_segment("t1")  # the descriptor is public here; the memory is not
            st = eng.submit([Request(Op.WRITE, buf.addr, seg, target.addr, 4096)]).wait()[0]
            assert st.state is State.FAILED and "authentication required" in st.reason
        assert target.digest(target.addr, 1 << 20) == before


def test_wrong_secret_is_refused_and_writes_nothing(guarded):
    before = guarded.digest(guarded.addr, 1 << 20)
    with initiator(secret=OTHER) as eng:
        with pytest.raises(MetadataError, match="failed to prove it holds the cluster secret"):
            eng.open_segment(guarded.name)
    assert guarded.digest(guarded.addr, 1 << 20) == before


def test_initiator_with_a_secret_refuses_a_target_without_one(peer):
    with initiator(secret=SECRET) as eng:
        with pytest.raises(MetadataError, match="has no cluster secret"):
            eng.open_segment(peer.name)


def test_a_recorded_proof_cannot_be_replayed():
    with initiator(secret=SECRET) as target:
        buf, m = register_random(target, 1 << 20)
        secret = Secret(SECRET.encode())
        with connect(target.name) as s:  # an honest session, recorded
            auth = InitiatorAuth(secret, target.name)
            opening = P.encode_control(P.AUTH, auth.start())
            s.sendall(opening)
            proof = P.encode_control(P.AUTH, auth.finish(_read_control(s, P.AUTH, "auth")))
            s.sendall(proof)
            s.sendall(P.encode_get_desc())
            assert json.loads(_read_control(s, P.DESC, "GET_DESC"))["name"] == target.name
        with connect(target.name) as s:  # the attacker replays both messages
            s.sendall(opening)
            _read_control(s, P.AUTH, "auth")  # a fresh challenge, so the old proof no longer fits
            s.sendall(proof)
            s.sendall(P.encode_request(P.WRITE, 1, [(buf.addr, 16)]) + b"A" * 16)
            with pytest.raises(Exception, match="authentication failed"):
                _read_control(s, P.RESP, "WRITE")
        assert bytes(m[:16]) != b"A" * 16


def test_frames_before_authentication_are_refused(guarded):
    before = guarded.digest(guarded.addr, 4096)
    with connect(guarded.name) as s:
        s.sendall(P.encode_request(P.WRITE, 1, [(guarded.addr, 4096)]) + os.urandom(4096))
        with pytest.raises(Exception, match="authentication required"):
            _read_control(s, P.RESP, "WRITE")
    assert guarded.digest(guarded.addr, 4096) == before


def test_silent_connections_are_dropped_after_the_auth_deadline():
    with initiator(secret=SECRET, connect_timeout=1.0) as target:
        with connect(target.name) as s:
            time.sleep(2.5)
            assert s.recv(1) == b""  # closed by the target


def test_connection_limit():
    with initiator(secret=SECRET, max_connections=3) as target:
        held = [connect(target.name) for _ in range(3)]
        for s in held:  # authenticated: a newcomer displaces only connections that are not
            auth = InitiatorAuth(Secret(SECRET.encode()), target.name)
            s.sendall(P.encode_control(P.AUTH, auth.start()))
            s.sendall(P.encode_control(P.AUTH, auth.finish(_read_control(s, P.AUTH, "auth"))))
        time.sleep(0.2)
        with connect(target.name) as extra:
            with pytest.raises(Exception, match="too many connections"):
                _read_control(extra, P.HELLO, "HELLO")
        for s in held:
            s.close()


def test_the_secret_never_shows(caplog, guarded):
    cfg = EngineConfig(secret=SECRET)
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert SECRET not in repr(load_secret(SECRET, None))
    caplog.set_level(logging.DEBUG, logger="moonlet")
    with initiator(secret=OTHER) as eng:
        with pytest.raises(MetadataError) as err:
            eng.open_segment(guarded.name)
    assert OTHER not in str(err.value) and OTHER not in caplog.text and SECRET not in caplog.text


def test_secret_sources(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    monkeypatch.setenv("MOONLET_SECRET", OTHER)
    me = {"endpoint": "10.0.0.1:7000", "name": "t"}
    a, b = TargetAuth(load_secret(None, str(f)), me), InitiatorAuth(Secret(SECRET.encode()), me["endpoint"])
    a.verify(b.finish(a.challenge(b.start())))
    env = TargetAuth(load_secret(None, None), me)  # from $MOONLET_SECRET: OTHER
    with pytest.raises(Exception, match="failed to prove"):
        b2 = InitiatorAuth(Secret(SECRET.encode()), me["endpoint"])
        b2.finish(env.challenge(b2.start()))
    with pytest.raises(ConfigError, match="cannot read the cluster secret file"):
        load_secret(None, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        EngineConfig(secret="short")


def test_without_a_secret_the_engine_says_so(caplog, monkeypatch):
    monkeypatch.delenv("MOONLET_SECRET", raising=False)
    monkeypatch.setattr(engine_module, "_no_secret_warned", threading.Lock())  # said once per process: not yet
    caplog.set_level(logging.WARNING, logger="moonlet")
    with initiator():
        pass
    assert "NO cluster secret" in caplog.text
