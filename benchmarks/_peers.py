"""The peer engines (Mooncake, NIXL) for the benchmarks: each in its own virtualenv, driven by a worker script.

A peer that cannot be installed or run yields the reason, which the
benchmarks print in its rows instead of leaving a silent gap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE.parent / ".bench"

PEERS = {
    # name: (pip package, module that must import, worker script)
    "mooncake": ("mooncake-transfer-engine-non-cuda", "mooncake.engine", "_mooncake_worker.py"),
    "nixl": ("nixl-cu12", "nixl_cu12._api", "_nixl_worker.py"),
}


def peer_python(name: str, explicit: str | None = None) -> tuple[str | None, str]:
    """A Python that imports peer ``name`` (installing it into .bench/NAME if needed), or None and why not."""
    package, module, _ = PEERS[name]
    venv = VENVS / name
    candidates = [explicit] if explicit else [str(venv / "bin" / "python")]
    for py in candidates:
        if Path(py).exists() and subprocess.run([py, "-c", f"import {module}"], capture_output=True).returncode == 0:
            return py, ""
    if explicit:
        return None, f"{explicit} cannot import {module}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", package], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"pip install {package} failed: " + (r.stderr.strip()[-300:] or "no output")
    r = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"{module} does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return py, ""


def peer_rows(name: str, py: str, spec: list, buffer: int, env: dict | None = None) -> tuple[list[dict], str]:
    """Run ``spec`` ([op, block, batch, threads, seconds] each) on peer ``name``: (results, error or "")."""
    worker = str(HERE / PEERS[name][2])
    full_env = {**os.environ, **(env or {})}
    target = subprocess.Popen([py, worker, "target", str(buffer)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=full_env)
    try:
        line = target.stdout.readline()
        while line and not line.startswith("READY"):  # peers log to stdout too
            line = target.stdout.readline()
        if not line:
            target.kill()
            return [], f"{name} target did not start: " + (target.stderr.read().strip().splitlines() or ["?"])[-1]
        fields = line.split()[1:]
        budget = 60 + sum(s[4] + 3 for s in spec)
        r = subprocess.run([py, worker, "initiator", str(buffer), *fields, json.dumps(spec)], capture_output=True,
                           text=True, timeout=budget, env=full_env)
        results = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        if len(results) < len(spec):
            tail = (r.stderr.strip().splitlines() or ["no error output"])[-1]
            return results, f"{name} initiator stopped after {len(results)} of {len(spec)} rows: {tail}"
        return results, ""
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        done = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        return done, f"{name} initiator did not finish within {budget:.0f} s (stopped after {len(done)} rows)"
    finally:
        target.stdin.close()
        try:
            target.wait(10)
        except subprocess.TimeoutExpired:
            target.kill()


def stop(proc: subprocess.Popen) -> None:
    """End a benchmark's helper process: SIGTERM, then SIGKILL if it is still there 10 s later."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
