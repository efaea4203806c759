"""Optional TLS on every connection: bytes still arrive intact, strangers and plain peers are refused."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from helpers.memory import register_random, sha
from moonlet import EngineConfig, TransferEngine
from moonlet.batch import Op, Request
from moonlet.errors import ConfigError, MetadataError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed (makes test certs)")


def make_ca(d, name: str) -> tuple[str, str, str]:
    """A CA and one certificate it signed: (cert, key, ca) paths under ``d``."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}-ca",
        "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}-engine", "-keyout",
        f"{name}.key", "-out", f"{name}.csr")
    run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem", "-CAkey", f"{name}-ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem")
    return str(d / f"{name}.pem"), str(d / f"{name}.key"), str(d / f"{name}-ca.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return {"cluster": make_ca(d, "cluster"), "rogue": make_ca(d, "rogue")}


def tls(files) -> dict:
    cert, key, ca = files
    return {"tls_cert_file": cert, "tls_key_file": key, "tls_ca_file": ca}


@pytest.fixture
def tls_target(peer_factory, pki):
    return peer_factory("--config", json.dumps({**tls(pki["cluster"]), "secret": "tls and secret together"}))


def test_bytes_cross_tls_intact(tls_target, pki):
    cfg = EngineConfig(transports=("tcp",), secret="tls and secret together", **tls(pki["cluster"]))
    with TransferEngine(config=cfg) as eng:
        buf, m = register_random(eng, 24 << 20)
        seg = eng.open_segment(tls_target.name)
        eng.write(buf.addr + 123, seg, tls_target.addr + 4567, (20 << 20) + 89)  # sliced over both lanes
        assert tls_target.digest(tls_target.addr + 4567, (20 << 20) + 89) == sha(m[123:123 + (20 << 20) + 89])
        reqs = [Request(Op.READ, buf.addr + i * 8192, seg, tls_target.addr + i * 4096, 4096) for i in range(64)]
        assert all(s.ok for s in eng.submit(reqs).wait())
        for i in (0, 17, 63):
            assert sha(m[i * 8192:i * 8192 + 4096]) == tls_target.digest(tls_target.addr + i * 4096, 4096)


def test_a_same_host_peer_over_tls_is_served_over_tcp(tls_target, pki):
    """Every transport in order, as deployments leave it: the same-host path cannot prove who holds a TLS
    connection (the target sees the local end of its relay), so the target refuses to attach and the bytes
    go over TLS; its HELLO used to fail instead (a TypeError on the relay's socket)."""
    cfg = EngineConfig(secret="tls and secret together", **tls(pki["cluster"]))
    with TransferEngine(config=cfg) as eng:
        buf, m = register_random(eng, 1 << 20)
        seg = eng.open_segment(tls_target.name)
        status = eng.write(buf.addr, seg, tls_target.addr, 1 << 20)
        assert status.ok and status.transport == "tcp", status
        assert tls_target.digest(tls_target.addr, 1 << 20) == sha(m)


def test_certificate_from_another_ca_is_refused(tls_target, pki):
    cfg = EngineConfig(transports=("tcp",), secret="tls and secret together", **tls(pki["rogue"]))
    with TransferEngine(config=cfg) as eng:
        with pytest.raises(MetadataError, match="TLS handshake .* failed"):
            eng.open_segment(tls_target.name)


def test_plain_peer_cannot_talk_to_a_tls_engine(tls_target):
    before = tls_target.digest(tls_target.addr, 4096)
    with TransferEngine(config=EngineConfig(transports=("tcp",), secret="tls and secret together",
                                            connect_timeout=2.0)) as eng:
        with pytest.raises(MetadataError):
            eng.open_segment(tls_target.name)
    assert tls_target.digest(tls_target.addr, 4096) == before


def test_tls_config_needs_all_three_files(pki):
    cert, key, ca = pki["cluster"]
    with pytest.raises(ConfigError, match="together"):
        EngineConfig(tls_cert_file=cert, tls_key_file=key)
    with pytest.raises(ConfigError, match="TLS setup failed"):
        TransferEngine(config=EngineConfig(tls_cert_file=cert, tls_key_file=ca, tls_ca_file=ca))
