"""The command line as a user runs it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata

from moonlet.engine import available_transports

MOONLET = [sys.executable, "-m", "moonlet.cli.main"]
#: The environment of the commands: none of the caller's MOONLET_ variables (they would change the config).
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MOONLET_")}


def run(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MOONLET, *args], capture_output=True, text=True, timeout=timeout,
                          env={**CLEAN_ENV, **(env or {})})


def test_bench_loopback_verifies_bytes(tmp_path):
    out = tmp_path / "rows.json"
    r = run("bench", "--duration", "0.3", "--buffer-size", "64M", "--verify", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "GB/s" in r.stdout and "verified" in r.stdout and "BYTES DIFFER" not in r.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and all(row["verified"] and row["requests"] > 0 for row in rows)
    assert {(row["op"], row["block_size"], row["batch_size"]) for row in rows} >= {("write", 4096, 32),
                                                                                  ("read", 1 << 20, 32)}


def test_bench_single_row_and_bad_flags():
    r = run("bench", "--op", "read", "--block-size", "16K", "--batch-size", "8", "--duration", "0.2",
            "--buffer-size", "16M", "--verify")
    assert r.returncode == 0, r.stderr
    assert "16 KiB" in r.stdout and "verified" in r.stdout
    for protocol in ("tcp", "shm"):  # back-to-back blocks travel as one range; the bytes still check out
        r = run("bench", "--op", "write", "--block-size", "4K", "--batch-size", "32", "--duration", "0.2",
                "--buffer-size", "16M", "--adjacent", "--verify", "--protocol", protocol)
        assert r.returncode == 0, r.stderr
        assert "verified" in r.stdout and protocol in r.stdout
    r = run("bench", "--block-size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
    r = run("bench", "--mode", "initiator")
    assert r.returncode == 2 and "needs --target" in r.stderr


def test_info():
    r = run("info")
    assert r.returncode == 0
    assert "transports" in r.stdout and "RDMA NICs" in r.stdout
    assert "RDMA registration of GPU memory" in r.stdout
    assert "same-host    works" in r.stdout or "same-host    NOT available" in r.stdout


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout == f"moonlet {metadata.version('moonlet')}\n"


def test_protocol_and_metadata_choices_come_from_the_parser():
    r = run("bench", "--protocol", "foo")
    assert r.returncode == 2 and "usage: moonlet bench" in r.stderr
    assert "argument --protocol: invalid choice: 'foo'" in r.stderr
    r = run("bench", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # help is wrapped
    assert all(scheme in text for scheme in ("p2p", "http://", "etcd://", "redis://")), text
    assert "pre-touched" in text and "{auto,tcp,rdma,shm,cuda_ipc}" in text


def test_sweep_checks_the_buffer_before_the_first_row():
    t0 = time.monotonic()
    r = run("bench", "--sweep", "--duration", "0.1", "--buffer-size", "16M")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("moonlet: error: buffer too small for 20 of 56 row(s): write 16 MiB x 128 x 1 "
                                "thread(s) needs 4 GiB per side, the buffer is 16 MiB; raise --buffer-size to 4 GiB")
    assert time.monotonic() - t0 < 30  # no engine started, no row run


def test_sweep_prints_each_row_as_it_finishes(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.Popen([*MOONLET, "bench", "--sweep", "--op", "write", "--block-size", "4K", "--duration", "0.5",
                             "--buffer-size", "16M", "--json", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CLEAN_ENV)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("write"):  # the first row: three more of 0.5 s each are still to run
                assert proc.poll() is None
                assert len(json.loads(out.read_text())) == 1
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 0, err
    rows = [line.split() for line in lines + rest.splitlines() if line.startswith("write")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("4", "KiB", str(n)) for n in (1, 8, 32, 128)]
    assert [row["batch_size"] for row in json.loads(out.read_text())] == [1, 8, 32, 128]


def test_one_no_secret_warning_per_bench():
    r = run("bench", "--op", "write", "--block-size", "4K", "--batch-size", "1", "--duration", "0.1",
            "--buffer-size", "1M")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("NO cluster secret") == 1, r.stderr


def test_a_target_that_cannot_start_gives_one_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t0 = time.monotonic()
        r = run("bench", "--port", str(busy.getsockname()[1]), "--duration", "0.1", "--buffer-size", "64M")
    assert time.monotonic() - t0 < 25  # not after a 30 s wait
    assert r.returncode == 2 and r.stdout == ""
    assert re.fullmatch(r"moonlet: error: \[Errno 98\] Address already in use.*\n", r.stderr), r.stderr
    if "rdma" not in available_transports():  # the case the command was first seen failing in
        r = run("bench", "--protocol", "rdma", "--duration", "0.1", "--buffer-size", "64M")
        assert r.returncode == 2 and r.stderr.count("error") == 1, r.stderr
        assert r.stderr.startswith("moonlet: error: unknown or unavailable transport(s) ['rdma']")


def test_verbose_and_log_level():
    args = ("--op", "write", "--block-size", "4K", "--batch-size", "1", "--duration", "0.1", "--buffer-size", "1M")
    quiet = run("bench", *args)
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr and " DEBUG " not in quiet.stderr
    r = run("bench", "-v", *args, env={"MOONLET_SPIN_US": "0"})
    assert r.returncode == 0, r.stderr
    assert re.search(r"moonlet\.bench INFO pre-touched 1 MiB of host memory", r.stderr), r.stderr
    assert re.search(r"moonlet\.bench INFO engine \S+: transports auto, 2 lane", r.stderr)
    assert " DEBUG " not in r.stderr
    r = run("--log-level", "debug", "bench", *args, env={"MOONLET_SPIN_US": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("moonlet.bench DEBUG config spin_us=0 (MOONLET_SPIN_US)") == 2  # target and initiator


def test_metadata_server_command():
    proc = subprocess.Popen([*MOONLET, "metadata-server", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[-1]
        req = urllib.request.Request(url + "?key=a", data=b"{}", method="PUT")
        assert urllib.request.urlopen(req, timeout=5).status == 200
        assert urllib.request.urlopen(url + "?key=a", timeout=5).read() == b"{}"
    finally:
        proc.terminate()
        proc.wait(5)
