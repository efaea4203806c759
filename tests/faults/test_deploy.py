"""docs/deploy.md's own commands, run as written, each block on the host its first line names (host A and
host B of the lab bed: 10.99.0.2 and 10.99.0.3), in one working directory both hosts see."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from netbed import NetBed, why_not

from moonlet.metadata.http import HttpMetadata

WHY = why_not()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"no fault bed here: {WHY}")
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
HOSTS = {"A": 1, "B": 2}
META = "http://10.99.0.2:8080/metadata"


def _blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the document, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), re.S)


def _until(what: str, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _published(name: str) -> bool:
    try:
        return HttpMetadata(META, 2.0).fetch(name) is not None
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_the_two_host_walkthrough_runs_as_written(tmp_path: pathlib.Path) -> None:
    blocks = _blocks()
    shell = [body for lang, body in blocks if lang == "sh"]
    (script,) = [body for lang, body in blocks if lang == "python"]
    assert script.startswith("# kv_handoff.py\n")
    (tmp_path / "kv_handoff.py").write_text(script)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    env.pop("MOONLET_SECRET", None)
    bed = NetBed(2)
    started: list[subprocess.Popen] = []
    outputs: list[pathlib.Path] = []
    try:
        for n, block in enumerate(shell):
            host = re.match(r"# on host ([AB])\b", block).group(1)  # type: ignore[union-attr]
            if "moonlet bench --mode initiator" in block:  # what the document says to wait for
                _until("the metadata server and decode-0", lambda: _listening("10.99.0.2", 8080)
                       and _listening("10.99.0.2", 7100) and _published("decode-0"))
            if "kv_handoff.py prefill" in block:
                _until("the decode side's descriptor", lambda: _published("kv-decode"))
            out = tmp_path / f"block-{n}.log"
            outputs.append(out)
            with open(out, "w") as f:
                proc = subprocess.Popen([*bed.prefix(HOSTS[host]), "bash", "-ec", block], cwd=tmp_path, env=env,
                                        stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            started.append(proc)
            assert proc.wait(240) == 0, f"block {n} on host {host} failed:\n{block}\n{out.read_text()}"
        bench = next(out for out, block in zip(outputs, shell) if "--mode initiator" in block).read_text()
        assert re.search(r"write .*64 KiB", bench) and "verified" in bench.lower(), bench
        prefill = next(out for out, block in zip(outputs, shell) if "kv_handoff.py prefill" in block).read_text()
        assert "prefill: 6 pages written, decode told" in prefill, prefill
        decode = next(out for out, block in zip(outputs, shell) if "kv_handoff.py decode" in block)
        _until("the decode side's check", lambda: "arrived intact" in decode.read_text())
        assert "decode: 6 pages of request-17 arrived intact" in decode.read_text()
    finally:
        for proc in started:  # each block's session: the servers it left running in the background
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        for proc in started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        bed.close()
