"""Speed across the Mooncake wire: Mooncake's transfer_engine_bench and `moonlet bench`, each against both targets.

    python benchmarks/mooncake_wire.py [--runs 3] [--duration 3]

Four ways to move the same blocks over TCP loopback, interleaved per run:

* ``mc->mc``: transfer_engine_bench initiator -> transfer_engine_bench target (Mooncake alone, the baseline)
* ``mc->ml``: transfer_engine_bench initiator -> ``moonlet bench --mode target --mooncake-wire``
* ``ml->mc``: ``moonlet bench --mode initiator --mooncake-wire`` -> transfer_engine_bench target
* ``ml->ml``: ``moonlet bench`` both sides, moonlet's own TCP protocol

Medians of ``--runs`` runs are reported in GB/s with the ratio to ``mc->mc``.
Mooncake comes from its own virtualenv (``.bench/mooncake``, created on demand).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from _moonlet_bench import ROOT, bench_row
from _peers import peer_python, stop

ROWS = (("write", 65536, 32), ("read", 65536, 32), ("write", 1 << 20, 32), ("read", 1 << 20, 32))
BUFFER = 256 << 20
THREADS = 2


def _bench_binary(py: str) -> str:
    out = subprocess.run([py, "-c", "import mooncake, os; print(os.path.dirname(mooncake.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return os.path.join(out, "transfer_engine_bench")


def _start(cmd: list[str], pattern: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a target and return it with the first match of ``pattern`` in its output (its segment name)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    found: list[str] = []

    def scan() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            m = re.search(pattern, line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=scan, daemon=True).start()
    for _ in range(300):
        if found or proc.poll() is not None:
            break
        threading.Event().wait(0.1)
    if not found:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} target did not start")
    return proc, found[0]


def mooncake_target(binary: str) -> tuple[subprocess.Popen, str]:
    return _start([binary, "--mode=target", "--metadata_server=P2PHANDSHAKE", "--local_server_name=127.0.0.1",
                   "--protocol=tcp", f"--buffer_size={BUFFER}"], r"listening on (\S+:\d+)")


def moonlet_target() -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return _start([sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target", "--mooncake-wire",
                   "--buffer-size", str(BUFFER)], r"MOONLET-TARGET-READY (\S+)", env)


def mooncake_initiator(binary: str, target: str, op: str, block: int, batch: int, duration: float) -> float:
    done = subprocess.run([binary, "--mode=initiator", "--metadata_server=P2PHANDSHAKE",
                           "--local_server_name=127.0.0.1", f"--segment_id={target}", "--protocol=tcp",
                           f"--operation={op}", f"--block_size={block}", f"--batch_size={batch}",
                           f"--threads={THREADS}", f"--duration={int(duration)}", f"--buffer_size={BUFFER}"],
                          capture_output=True, text=True, timeout=duration + 120)
    m = re.search(r"throughput ([\d.]+) GB/s", done.stderr)
    if done.returncode or not m:
        raise RuntimeError(f"transfer_engine_bench failed ({done.returncode}): {done.stderr[-1500:]}")
    return float(m.group(1))


def one_run(binary: str, duration: float) -> dict[tuple, dict[str, float]]:
    out: dict[tuple, dict[str, float]] = {row: {} for row in ROWS}
    mc, mc_name = mooncake_target(binary)
    ml, ml_name = moonlet_target()
    try:
        for op, block, batch in ROWS:
            r = out[(op, block, batch)]
            r["mc->mc"] = mooncake_initiator(binary, mc_name, op, block, batch, duration)
            r["mc->ml"] = mooncake_initiator(binary, ml_name, op, block, batch, duration)
            r["ml->mc"] = bench_row("tcp", op, block, batch, duration, "--mode", "initiator", "--target", mc_name,
                                    "--mooncake-wire", "--threads", str(THREADS))["gbps"]
            r["ml->ml"] = bench_row("tcp", op, block, batch, duration, "--threads", str(THREADS))["gbps"]
    finally:
        stop(mc)
        stop(ml)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--out", help="also write the Markdown table to this file")
    args = ap.parse_args()
    py, why = peer_python("mooncake")
    if py is None:
        print(f"Mooncake unavailable: {why}", file=sys.stderr)
        return 1
    binary = _bench_binary(py)
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
        runs.append(one_run(binary, args.duration))
    ways = ("mc->mc", "mc->ml", "ml->mc", "ml->ml")
    lines = [f"`python benchmarks/mooncake_wire.py --runs {args.runs} --duration {args.duration:g}`, "
             f"{datetime.date.today()}, {os.cpu_count()} CPUs, {THREADS} initiator threads; GB/s, median of "
             f"{args.runs} (ratio to mc->mc)", "",
             "| op | block x batch | " + " | ".join(ways) + " |", "|" + " --- |" * (2 + len(ways))]
    for op, block, batch in ROWS:
        med = {w: statistics.median(r[(op, block, batch)][w] for r in runs) for w in ways}
        base = med["mc->mc"]
        cells = [f"{med[w]:.2f} ({med[w] / base:.2f}x)" if base else f"{med[w]:.2f}" for w in ways]
        lines.append(f"| {op} | {block // 1024} KiB x {batch} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
