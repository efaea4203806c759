"""Latency of lone TCP writes while another process wants the CPU.

    python benchmarks/latency_contention.py [--writes 2000] [--block 16K] [--spin-us 1000,0] [--out FILE.json]

A target process and this process (the initiator) exchange lone ``--block`` writes over loopback, one at a
time, ``--writes`` of them after 1.5 s of unmeasured ones, first with nothing else running and then with one
CPU-bound process beside them (a Python busy loop), for each ``--spin-us`` (both sides). Reports p50, p99
and the largest write latency, and p99 / p50. On a 2-CPU machine the bar is p99 <= 5 x p50 with the
default ``spin_us`` and the busy process running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOG = "while True: pass"
WARM_UP = 1.5  # seconds of unmeasured writes first: start-up (imports, connecting) is not the steady state


def measure(spin_us: int, block: int, writes: int, hog: bool) -> dict:
    from moonlet import EngineConfig, Op, TransferEngine

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MOONLET_SPIN_US": str(spin_us)}
    target = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "_scale_worker.py"), "target", "tcp",
                               str(1 << 20)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    busy = subprocess.Popen([sys.executable, "-c", HOG]) if hog else None
    try:
        line = target.stdout.readline().split()  # type: ignore[union-attr]
        name, addr = line[1], int(line[2])
        eng = TransferEngine(config=EngineConfig(transports=("tcp",), spin_us=spin_us))
        try:
            mem = bytearray(os.urandom(block))
            local = eng.register(mem)
            warm_until = time.perf_counter() + WARM_UP
            while time.perf_counter() < warm_until:
                eng.submit_many(Op.WRITE, name, [local.addr], [addr], [block]).check()
            times = []
            for _ in range(writes):
                t0 = time.perf_counter()
                eng.submit_many(Op.WRITE, name, [local.addr], [addr], [block]).check()
                times.append(time.perf_counter() - t0)
        finally:
            eng.close()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        target.stdin.close()  # type: ignore[union-attr]
        target.wait(10)
    times.sort()
    p50 = statistics.median(times)
    p99 = times[int(0.99 * len(times)) - 1]
    return {"spin_us": spin_us, "busy_process": hog, "writes": writes, "block": block,
            "p50_us": round(p50 * 1e6, 1), "p99_us": round(p99 * 1e6, 1), "max_us": round(times[-1] * 1e6, 1),
            "p99_over_p50": round(p99 / p50, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--block", default="16K")
    ap.add_argument("--spin-us", default="1000,0")
    ap.add_argument("--out", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    block = int(args.block[:-1]) << 10 if args.block.upper().endswith("K") else int(args.block)
    rows = []
    for spin in (int(x) for x in args.spin_us.split(",")):
        for hog in (False, True):
            r = measure(spin, block, args.writes, hog)
            rows.append(r)
            print(f"spin_us {spin:5}  busy process {'yes' if hog else 'no ':3}  p50 {r['p50_us']:8.1f} us  "
                  f"p99 {r['p99_us']:8.1f} us  max {r['max_us']:9.1f} us  p99/p50 {r['p99_over_p50']:.2f}",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "host": platform.node(), "date": datetime.date.today().isoformat()},
            "command": "python benchmarks/latency_contention.py " + " ".join(sys.argv[1:]), "rows": rows},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
