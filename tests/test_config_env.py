"""EngineConfig from the environment: MOONLET_<FIELD> for every field, explicit arguments first."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from moonlet import EngineConfig, TransferEngine
from moonlet.config import ARGUMENT, DEFAULT, ENVIRONMENT, env_name, resolve
from moonlet.errors import ConfigError
from moonlet.security import Secret, load_secret

#: A valid value other than the default for every field, and how it is written in a variable.
NON_DEFAULT = {
    "listen_host": ("0.0.0.0", "0.0.0.0"),
    "advertise_host": ("10.1.2.3", "10.1.2.3"),
    "port": (5555, "5555"),
    "lanes": (3, "3"),
    "slice_size": (8 << 20, "8388608"),
    "frame_bytes": (65536, " 65536 "),
    "frame_entries": (64, "64"),
    "request_timeout": (2.5, "2.5"),
    "connect_timeout": (1.0, "1"),
    "metadata_timeout": (0.5, "0.5"),
    "metadata_ttl": (30.0, "30"),
    "socket_buffer": (None, ""),
    "spin_us": (0, "0"),
    "reactors": (3, "3"),
    "gpu_kernel_max_block": (0, "0"),
    "rdma": ("off", "off"),
    "rdma_devices": (("mlx5_0", "mlx5_1"), "mlx5_0, mlx5_1"),
    "rdma_gid_index": (3, "3"),
    "rdma_nic_matrix": ('{"cpu:0": ["mlx5_0"]}', '{"cpu:0": ["mlx5_0"]}'),
    "rdma_qps": (4, "4"),
    "rdma_queue_depth": (1024, "1024"),
    "rdma_mr_chunk": (1 << 20, "1048576"),
    "rdma_register_threads": (2, "2"),
    "rdma_gpu": ("off", "off"),
    "secret_file": ("/etc/moonlet/secret", "/etc/moonlet/secret"),
    "max_connections": (16, "16"),
    "max_unauthenticated": (4, "4"),
    "idle_timeout": (7.5, "7.5"),
    "tls_cert_file": ("c.pem", "c.pem"),
    "tls_key_file": ("k.pem", "k.pem"),
    "tls_ca_file": ("ca.pem", "ca.pem"),
    "transports": (("shm", "tcp"), "shm,tcp"),
    "mooncake_wire": (True, "yes"),
    "metrics_port": (9464, "9464"),
}


def test_every_field_but_the_secret_has_a_variable():
    names = {f.name for f in fields(EngineConfig)}
    assert names - set(NON_DEFAULT) == {"secret"}  # a new field needs a line above
    tls = {env_name(n): t for n, (_, t) in NON_DEFAULT.items() if n.startswith("tls_")}  # all three or none
    for name, (value, text) in NON_DEFAULT.items():
        cfg = EngineConfig.from_env({**(tls if name.startswith("tls_") else {}), env_name(name): text})
        assert getattr(cfg, name) == value != getattr(EngineConfig(), name), name
    # All at once, less mooncake_wire (it cannot be combined with TLS or a secret file).
    env = {env_name(n): t for n, (_, t) in NON_DEFAULT.items() if n != "mooncake_wire"}
    cfg, sources = resolve(environ=env)
    assert all(getattr(cfg, n) == v for n, (v, _) in NON_DEFAULT.items() if n != "mooncake_wire")
    assert {n for n, s in sources.items() if s == ENVIRONMENT} == set(NON_DEFAULT) - {"mooncake_wire"}
    assert sources["secret"] == sources["mooncake_wire"] == DEFAULT


def test_lanes_from_the_environment_and_explicit_arguments_first(monkeypatch):
    monkeypatch.setenv("MOONLET_LANES", "3")
    monkeypatch.setenv("MOONLET_SPIN_US", "0")
    assert EngineConfig.from_env().lanes == 3
    cfg, sources = resolve({"lanes": 5})
    assert (cfg.lanes, cfg.spin_us, sources["lanes"], sources["spin_us"]) == (5, 0, ARGUMENT, ENVIRONMENT)
    assert EngineConfig.from_env(lanes=2).lanes == 2  # explicit, even when it equals the default
    assert EngineConfig().lanes == 2  # the constructor is what the code says: no environment
    with TransferEngine() as eng:  # no config object: the environment applies
        assert (eng.config.lanes, eng.config.spin_us) == (3, 0)
    with TransferEngine(lanes=4) as eng:
        assert (eng.config.lanes, eng.config.spin_us) == (4, 0)
    with TransferEngine(config=EngineConfig(frame_entries=8)) as eng:  # a config object is taken as it is
        assert (eng.config.lanes, eng.config.spin_us, eng.config.frame_entries) == (2, 1000, 8)


@pytest.mark.parametrize("var,text,match", [
    ("MOONLET_LANES", "three", r"MOONLET_LANES='three': not an integer"),
    ("MOONLET_LANES", "65", r"MOONLET_LANES='65': lanes must be in 1\.\.64, got 65"),
    ("MOONLET_LANES", "2.0", r"MOONLET_LANES='2.0': not an integer"),
    ("MOONLET_PORT", "70000", r"MOONLET_PORT='70000': port must be in 0\.\.65535"),
    ("MOONLET_REQUEST_TIMEOUT", "inf", r"MOONLET_REQUEST_TIMEOUT='inf': request_timeout must be a finite number"),
    ("MOONLET_CONNECT_TIMEOUT", "soon", r"MOONLET_CONNECT_TIMEOUT='soon': not a number"),
    ("MOONLET_MOONCAKE_WIRE", "maybe", r"MOONLET_MOONCAKE_WIRE='maybe': not a boolean"),
    ("MOONLET_RDMA_GPU", "always", r"MOONLET_RDMA_GPU='always': rdma_gpu must be"),
    ("MOONLET_TLS_CERT_FILE", "c.pem", r"MOONLET_TLS_CERT_FILE='c.pem': TLS needs tls_cert_file, tls_key_file"),
    ("MOONLET_LANES", "", r"MOONLET_LANES='': not an integer"),  # empty is None only where None is allowed
])
def test_a_bad_variable_is_named_with_its_value(monkeypatch, var, text, match):
    monkeypatch.setenv(var, text)
    with pytest.raises(ConfigError, match=match):
        EngineConfig.from_env()
    with pytest.raises(ConfigError, match=match):
        TransferEngine()


def test_bools_tuples_and_none():
    for text, value in (("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)):
        assert EngineConfig.from_env({"MOONLET_MOONCAKE_WIRE": text}).mooncake_wire is value
    assert EngineConfig.from_env({"MOONLET_TRANSPORTS": " tcp , shm,"}).transports == ("tcp", "shm")
    assert EngineConfig.from_env({"MOONLET_TRANSPORTS": ""}).transports == ()
    assert EngineConfig.from_env({"MOONLET_RDMA_DEVICES": "mlx5_2"}).rdma_devices == ("mlx5_2",)
    assert EngineConfig.from_env({"MOONLET_SOCKET_BUFFER": ""}).socket_buffer is None
    assert EngineConfig.from_env({"MOONLET_SOCKET_BUFFER": "131072"}).socket_buffer == 131072
    assert EngineConfig.from_env({"MOONLET_RDMA_GID_INDEX": "0"}).rdma_gid_index == 0
    with pytest.raises(ConfigError, match="MOONLET_MOONCAKE_WIRE='1': mooncake_wire cannot be combined"):
        EngineConfig.from_env({"MOONLET_MOONCAKE_WIRE": "1", "MOONLET_SECRET_FILE": "/s"})


def test_the_secret_keeps_its_meaning(tmp_path, monkeypatch):
    """$MOONLET_SECRET is not copied into ``secret`` (which would put it before secret_file): the engine reads
    it last, as before."""
    monkeypatch.setenv("MOONLET_SECRET", "e" * 20)
    monkeypatch.setenv("MOONLET_SECRET_FILE", str(tmp_path / "s"))
    (tmp_path / "s").write_text("f" * 20)
    cfg, sources = resolve()
    assert cfg.secret is None and sources["secret"] == DEFAULT and cfg.secret_file == str(tmp_path / "s")
    loaded = load_secret(cfg.secret, cfg.secret_file)
    assert loaded is not None and loaded.mac(b"t") == Secret(b"f" * 20).mac(b"t")  # the file wins, as before
    monkeypatch.delenv("MOONLET_SECRET_FILE")
    cfg = EngineConfig.from_env()
    loaded = load_secret(cfg.secret, cfg.secret_file)
    assert cfg.secret is None and loaded is not None and loaded.mac(b"t") == Secret(b"e" * 20).mac(b"t")


def _info(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MOONLET_")}
    return subprocess.run([sys.executable, "-m", "moonlet.cli.main", "info"], capture_output=True, text=True,
                          timeout=60, env={**clean, **env})


def test_info_shows_the_effective_configuration_and_its_sources():
    r = _info({"MOONLET_LANES": "3", "MOONLET_TRANSPORTS": "tcp,shm", "MOONLET_SECRET": "s" * 20})
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("  ")}
    assert lines["lanes"].split()[1] == "3" and lines["lanes"].endswith("(environment MOONLET_LANES)")
    assert lines["transports"].split()[1] == "tcp,shm" and "(environment MOONLET_TRANSPORTS)" in lines["transports"]
    assert lines["frame_entries"].split()[1:] == ["256"]  # a default says no source
    assert "(environment MOONLET_SECRET)" in lines["secret"] and "s" * 20 not in r.stdout
    r = _info({"MOONLET_LANES": "x"})
    assert r.returncode == 2 and r.stderr.strip() == "moonlet: error: MOONLET_LANES='x': not an integer"
