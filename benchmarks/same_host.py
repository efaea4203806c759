"""Same-host transfers vs. a single-thread memcpy, in one run.

    python benchmarks/same_host.py [--runs 3] [--duration 2]

Baseline: numpy ``copyto`` of the same scattered blocks (stride 2 x block) in
one process and one thread.  moonlet: two processes, ``--protocol shm``, with
the target's memory either plain registered memory (the target copies with
one ``process_vm_readv``/``writev`` per frame: "attach") or from
``engine.allocate()`` (the initiator memcpys into a shared mapping: "mapped").
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moonlet import EngineConfig, TransferEngine
from moonlet.cli.bench import READY, human, run_row

KiB, MiB = 1 << 10, 1 << 20
ROWS = [("write", 4 * KiB, 32), ("read", 4 * KiB, 32), ("write", 1 * MiB, 32), ("read", 1 * MiB, 32),
        ("write", 16 * MiB, 4), ("read", 16 * MiB, 4)]
BUFFER = 512 * MiB


def memcpy_row(block: int, batch: int, seconds: float) -> tuple[float, float]:
    """(GB/s, blocks/s) of numpy copies of ``batch`` scattered blocks, repeated for ``seconds``."""
    span = 2 * block * batch
    a = np.frombuffer(mmap.mmap(-1, span), dtype=np.uint8)
    b = np.frombuffer(mmap.mmap(-1, span), dtype=np.uint8)
    a[:] = 1
    b[:] = 2
    pairs = [(b[o:o + block], a[o:o + block]) for o in range(0, span, 2 * block)]
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for dst, src in pairs:
            np.copyto(dst, src)
        n += batch
    el = time.perf_counter() - t0
    return n * block / el / 1e9, n / el


def moonlet_rows(shared: bool, runs: int, seconds: float) -> dict:
    cmd = [sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target", "--buffer-size", str(BUFFER),
           "--protocol", "shm"] + (["--shared"] if shared else [])
    target = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = target.stdout.readline()
        assert line.startswith(READY), line
        out = {}
        with TransferEngine(config=EngineConfig(transports=("shm",))) as eng:
            local = eng.register(mmap.mmap(-1, BUFFER))
            seg = eng.open_segment(line.split()[1])
            for op, block, batch in ROWS:
                res = [run_row(eng, seg, local, seg.buffers[0], op, block, batch, 1, seconds, False)
                       for _ in range(runs)]
                out[(op, block, batch)] = sorted(res, key=lambda r: r.gbps)[len(res) // 2]
        return out
    finally:
        target.terminate()
        target.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    base = {}
    for _, block, batch in ROWS:
        if (block, batch) not in base:
            res = [memcpy_row(block, batch, args.duration) for _ in range(args.runs)]
            base[(block, batch)] = (statistics.median(r[0] for r in res), statistics.median(r[1] for r in res))
    attach = moonlet_rows(False, args.runs, args.duration)
    mapped = moonlet_rows(True, args.runs, args.duration)
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, median of {args.runs} x {args.duration:g} s")
    print("| op | block x batch | memcpy GB/s | attach GB/s | attach req/s | attach / memcpy | mapped GB/s "
          "| mapped req/s | mapped / memcpy |")
    print("|---|---|---|---|---|---|---|---|---|")
    dump = []
    for key in ROWS:
        op, block, batch = key
        mc = base[(block, batch)][0]
        a, m = attach[key], mapped[key]
        print(f"| {op} | {human(block)} x {batch} | {mc:.2f} | {a.gbps:.2f} | {a.req_per_s:,.0f} | {a.gbps / mc:.2f}x "
              f"| {m.gbps:.2f} | {m.req_per_s:,.0f} | {m.gbps / mc:.2f}x |")
        dump.append({"op": op, "block": block, "batch": batch, "memcpy_gbps": mc, "attach": a.__dict__,
                     "mapped": m.__dict__})
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
