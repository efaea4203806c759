"""The command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

MOONLET = [sys.executable, "-m", "moonlet.cli.main"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MOONLET, *args], capture_output=True, text=True, timeout=timeout)


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
