"""One row of a loopback ``moonlet bench`` (target and initiator processes), run from this checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_row(protocol: str, op: str, block: int | str, batch: int, duration: float, *extra: str) -> dict:
    """The JSON row ``moonlet bench`` reports (gbps, req_per_s, p50_us, ...); raises with its output on failure."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "moonlet.cli.main", "bench", "--protocol", protocol, "--op", op,
               "--block-size", str(block), "--batch-size", str(batch), "--duration", str(duration),
               "--buffer-size", "256M", "--json", out.name, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return json.loads(Path(out.name).read_text())[0]
