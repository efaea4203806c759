"""EngineConfig.rdma ("auto" / "required" / "off") and transport orders naming transports this host lacks.

These run where no RDMA device is usable (the lab guest's soft-RoCE runs test tests/rdma instead): "auto" falls
back with one warning naming why, "required" refuses to start, "off" is silent.
"""

from __future__ import annotations

import logging
import os

import pytest

from helpers.engines import initiator
from helpers.memory import register_random
from moonlet import ConfigError, EngineConfig, TransferEngine
from moonlet.engine import available_transports
from moonlet.mooncake import TransferEngine as MooncakeEngine
from moonlet.transport.rdma import verbs

pytestmark = pytest.mark.skipif("rdma" in available_transports(), reason="needs a host without a usable RDMA NIC")

NO_DEVICE = verbs.unavailable_reason()
SIZE = 256 << 10


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The engine's warnings about transports it left out."""
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "runs without transport" in r.getMessage()]


def _round_trip(eng: TransferEngine) -> str:
    """Write random bytes to a second (TCP) engine and read them back through ``eng``; the transport used."""
    with initiator() as target:
        dst, dst_view = register_random(target, SIZE)
        src, src_view = register_random(eng, SIZE)
        back, back_view = register_random(eng, SIZE)
        status = eng.write(src.addr, target.name, dst.addr, SIZE)
        assert bytes(dst_view) == bytes(src_view)
        eng.read(back.addr, target.name, dst.addr, SIZE)
        assert bytes(back_view) == bytes(src_view)
        return status.transport


def test_auto_warns_once_and_works_over_tcp(caplog):
    caplog.set_level(logging.WARNING, "moonlet")
    with TransferEngine(config=EngineConfig(rdma="auto", request_timeout=10.0)) as eng:
        assert _round_trip(eng) == "tcp"
    found = _warnings(caplog)
    assert len(found) == 1 and f"rdma: {NO_DEVICE}" in found[0], found


def test_required_refuses_to_start_naming_why():
    with pytest.raises(ConfigError, match=r"rdma='required' but RDMA cannot start: libibverbs"):
        TransferEngine(config=EngineConfig(rdma="required"))
    with pytest.raises(ConfigError, match=r"rdma must be 'auto', 'required' or 'off', got 'maybe'"):
        EngineConfig(rdma="maybe")


def test_off_is_silent(caplog):
    caplog.set_level(logging.DEBUG, "moonlet")
    with TransferEngine(config=EngineConfig(rdma="off", transports=("rdma", "tcp"), request_timeout=10.0)) as eng:
        assert _round_trip(eng) == "tcp"
    assert _warnings(caplog) == []


def test_order_naming_rdma_skips_it_with_the_warning(caplog):
    caplog.set_level(logging.WARNING, "moonlet")
    with initiator(transports=("rdma", "tcp"), request_timeout=10.0) as eng:
        assert _round_trip(eng) == "tcp"
    found = _warnings(caplog)
    assert len(found) == 1 and "rdma: " in found[0] and "using ['tcp']" in found[0], found
    # Only transports some hosts lack are skipped: an unknown name is still an error, and so is an order that
    # leaves nothing to fall back on.
    with pytest.raises(ConfigError, match=r"unknown or unavailable transport\(s\) \['foo'\]"):
        TransferEngine(config=EngineConfig(transports=("foo",)))
    with pytest.raises(ConfigError, match=r"unknown or unavailable transport\(s\) \['rdma'\] \(rdma: "):
        TransferEngine(config=EngineConfig(transports=("rdma",)))


def test_named_device_missing_is_named(caplog):
    caplog.set_level(logging.WARNING, "moonlet")
    with TransferEngine(config=EngineConfig(rdma_devices=("mlx5_0",), request_timeout=10.0)) as eng:
        assert _round_trip(eng) == "tcp"
    found = _warnings(caplog)
    assert len(found) == 1 and "RDMA device(s) ['mlx5_0'] not found" in found[0], found


def test_required_from_the_environment_refuses(monkeypatch):
    monkeypatch.setenv("MOONLET_RDMA", "required")
    with pytest.raises(ConfigError, match=r"rdma='required' but RDMA cannot start"):
        TransferEngine()
    assert EngineConfig.from_env(os.environ).rdma == "required"


def test_mooncake_initialize_rdma_logs_the_warning(caplog):
    caplog.set_level(logging.WARNING, "moonlet")
    eng = MooncakeEngine()
    try:
        assert eng.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "mlx5_0") == 0
    finally:
        eng.engine.close()
    found = _warnings(caplog)
    assert len(found) == 1 and "['mlx5_0'] not found" in found[0], found
