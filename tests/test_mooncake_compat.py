"""`moonlet.mooncake`: Mooncake's Python API on moonlet, checked against the same scenarios run on Mooncake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import compat_scenarios
from mooncake_peer import NO_MOONCAKE, mooncake_python
from moonlet.mooncake import TransferEngine, TransferNotify, TransferOpcode, parse_metadata

HERE = Path(__file__).parent
#: what every scenario gives when the API behaves as Mooncake's does (Mooncake's own output, see below)
EXPECTED = {"initialize": [0, 0], "register": [0, 0], "first_buffer": True, "sync_write": [0, True],
            "sync_read": [0, True], "transfer_sync": [0, True], "batch_sync_write": [0, True],
            "batch_async_read": ["id", 0, True], "submit_write": ["id", 1, True],
            "notify": [0, [["kv-17", "ready"]], True],
            "bytes_helpers": [0, True],
            "managed": [True, 0], "write_outside_registered": True, "batch_length_mismatch": True,
            "unknown_segment": True, "unregister": [0, 0]}


def test_scenarios_on_moonlet():
    assert compat_scenarios.run("moonlet") == EXPECTED


@pytest.mark.skipif(mooncake_python() is None, reason=NO_MOONCAKE)
def test_same_results_as_mooncake():
    """The scenario script, run by Mooncake's own engine in its own virtualenv, gives the same outcomes."""
    done = subprocess.run([mooncake_python(), str(HERE / "compat_scenarios.py"), "mooncake"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs == EXPECTED == compat_scenarios.run("moonlet")


def test_metadata_strings_parse_as_mooncake_means_them():
    assert parse_metadata("P2PHANDSHAKE") == "p2p"
    assert parse_metadata("http://10.0.0.1:8080/metadata") == "http://10.0.0.1:8080/metadata"
    assert parse_metadata("etcd://10.0.0.1:2379") == "etcd://10.0.0.1:2379"
    assert parse_metadata("redis://10.0.0.1:6379") == "redis://10.0.0.1:6379"
    assert parse_metadata("10.0.0.1:2379") == "etcd://10.0.0.1:2379"  # Mooncake's bare host:port is etcd
    assert parse_metadata("10.0.0.1:6379", "redis") == "redis://10.0.0.1:6379"
    assert parse_metadata("anything", "p2p") == "p2p"


def test_failures_return_codes_and_keep_the_reason(caplog):
    eng = TransferEngine()
    assert eng.initialize("127.0.0.1", "P2PHANDSHAKE", "carrier-pigeon", "") == -1
    assert "protocol" in eng.last_error
    assert eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1  # twice
    assert eng.register_memory(0, 4096) == -1 and eng.last_error
    assert eng.unregister_memory(12345) == -1
    assert eng.get_batch_transfer_status([999]) == -1 and "unknown batch id" in eng.last_error
    assert eng.transfer_check_status(999) == -1
    assert eng.batch_transfer_async_write("127.0.0.1:1", [1], [1], [1]) == 0  # 0: not started
    assert eng.transfer_submit_write("127.0.0.1:1", 1, 1, 1) == -1
    assert eng.free_managed_buffer(4096, 4096) == -1
    assert eng.get_notifies() == []
    assert eng.transfer_sync("127.0.0.1:1", 1, 1, 1, TransferOpcode.Write, notify=TransferNotify("n", "m")) == -1


def test_batch_register_is_all_or_nothing():
    import ctypes

    eng = TransferEngine()
    assert eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    a, b = ctypes.create_string_buffer(8192), ctypes.create_string_buffer(8192)
    pa, pb = ctypes.addressof(a), ctypes.addressof(b)
    assert eng.batch_register_memory([pa, pb, pa], [8192, 8192, 8192]) == -1  # the third overlaps the first
    assert eng.engine.buffers() == []
    assert eng.batch_register_memory([pa, pb], [8192, 8192]) == 0
    assert eng.batch_unregister_memory([pa, pb]) == 0


def test_script_runs_standalone():
    done = subprocess.run([sys.executable, str(HERE / "compat_scenarios.py"), "moonlet"], capture_output=True,
                          text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == EXPECTED
