"""GPU transfers between two processes vs. the copy engines' own peer and pinned copies, in one run.

    python benchmarks/gpu.py [--runs 3] [--duration 2] [--markdown FILE]

Baselines (one process, torch): a peer copy GPU0 -> GPU1 of 128 MiB, the same
as 32 copies of 4 MiB and as 128 copies of 64 KiB, and pinned host <-> GPU copies
of 128 MiB.  moonlet: a target process registering GPU memory on the last GPU,
the initiator on GPU 0 (GPU memory, or pinned host memory for the GPU<->host
rows), transport chosen automatically (CUDA IPC).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from moonlet import TransferEngine, gpu
from moonlet.cli.bench import READY, human, run_row

KiB, MiB = 1 << 10, 1 << 20
BUFFER = 512 * MiB


def timed(fn, nbytes: int, seconds: float) -> float:
    """GB/s of ``fn`` (which moves ``nbytes``), synchronised, repeated for ``seconds``."""
    fn()
    torch.cuda.synchronize()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return n * nbytes / (time.perf_counter() - t0) / 1e9


def baselines(seconds: float, runs: int) -> dict:
    last = torch.cuda.device_count() - 1
    a = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda:0").random_(0, 255)
    b = torch.empty(256 * MiB, dtype=torch.uint8, device=f"cuda:{last}")
    host = torch.empty(128 * MiB, dtype=torch.uint8).pin_memory()
    out = {}

    def blocks(block: int, count: int):
        pairs = [(b[i * 2 * block:i * 2 * block + block], a[i * 2 * block:i * 2 * block + block])
                 for i in range(count)]
        return lambda: [d.copy_(s, non_blocking=True) for d, s in pairs]

    cases = {
        "peer copy 128 MiB (one copy)": (lambda: b[:128 * MiB].copy_(a[:128 * MiB], non_blocking=True), 128 * MiB),
        "peer copy 4 MiB x 32 (copy_ each)": (blocks(4 * MiB, 32), 128 * MiB),
        "peer copy 64 KiB x 128 (copy_ each)": (blocks(64 * KiB, 128), 8 * MiB),
        "pinned H2D 128 MiB": (lambda: a[:128 * MiB].copy_(host, non_blocking=True), 128 * MiB),
        "pinned D2H 128 MiB": (lambda: host.copy_(a[:128 * MiB], non_blocking=True), 128 * MiB),
    }
    for name, (fn, nbytes) in cases.items():
        out[name] = statistics.median(timed(fn, nbytes, seconds) for _ in range(runs))
    return out


@contextlib.contextmanager
def vram_target(size: int) -> Iterator[tuple[TransferEngine, Any, dict]]:
    """A target process registering ``size`` bytes of GPU memory on the last GPU, and an engine here:
    yields ``(engine, the target's segment, its buffer)``."""
    target = subprocess.Popen([sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target", "--use-vram",
                               "--gpu", str(gpu.device_count() - 1), "--buffer-size", str(size)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = target.stdout.readline()
        assert line.startswith(READY), line
        with TransferEngine() as eng:
            seg = eng.open_segment(line.split()[1])
            yield eng, seg, seg.buffers[0]
    finally:
        target.terminate()
        target.wait(10)


def moonlet_rows(seconds: float, runs: int, threads: int) -> list:
    last = torch.cuda.device_count() - 1
    rows = []
    with vram_target(BUFFER) as (eng, seg, remote):
        vram = eng.register(gpu.alloc(0, BUFFER), BUFFER)
        host = eng.register(mmap.mmap(-1, BUFFER))
        for local, where in ((vram, "GPU0"), (host, "host")):
            cases = [("write", 4 * MiB, 32), ("read", 4 * MiB, 32)]
            if where == "GPU0":
                cases += [("write", 64 * KiB, 128), ("read", 64 * KiB, 128)]
            for op, block, batch in cases:
                res = [run_row(eng, seg, local, remote, op, block, batch, threads, seconds, False)
                       for _ in range(runs)]
                med = sorted(res, key=lambda r: r.gbps)[len(res) // 2]
                rows.append((where, f"GPU{last}", med))
    return rows


def tcp_rows(seconds: float, runs: int) -> list:
    """GPU memory over TCP loopback (staged through pinned host memory) beside host memory over TCP."""
    last = torch.cuda.device_count() - 1
    rows = []
    for vram in (False, True):
        extra = ["--use-vram", "--gpu", str(last)] if vram else []
        target = subprocess.Popen([sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target",
                                   "--protocol", "tcp", "--buffer-size", str(BUFFER), *extra],
                                  stdout=subprocess.PIPE, text=True)
        try:
            line = target.stdout.readline()
            with TransferEngine(transports=("tcp",)) as eng:
                seg = eng.open_segment(line.split()[1])
                local = eng.register(gpu.alloc(0, BUFFER), BUFFER) if vram else eng.register(mmap.mmap(-1, BUFFER))
                for op in ("write", "read"):
                    res = [run_row(eng, seg, local, seg.buffers[0], op, MiB, 32, 1, seconds, False)
                           for _ in range(runs)]
                    rows.append((f"GPU0 -> GPU{last}" if vram else "host -> host",
                                 sorted(res, key=lambda r: r.gbps)[len(res) // 2]))
        finally:
            target.terminate()
            target.wait(10)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--markdown", help="also write the tables here")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="initiator threads (one table each)")
    ap.add_argument("--json")
    args = ap.parse_args()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    base = baselines(args.duration, args.runs)
    rows = [(t, row) for t in args.threads for row in moonlet_rows(args.duration, args.runs, t)]
    lines = [f"# GPU benchmark, {time.strftime('%Y-%m-%d %H:%M')}",
             "", f"Machine: {platform.node()}, {os.cpu_count()} CPUs, GPUs: {', '.join(names)}; "
             f"median of {args.runs} x {args.duration:g} s. Command: `python benchmarks/gpu.py --runs {args.runs}`.",
             "", "| baseline (torch, one process) | GB/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in base.items()]
    peer = base["peer copy 128 MiB (one copy)"]
    lines += ["",
              "| moonlet (two processes) | threads | op | block x batch | GB/s | req/s | p50 us | transport | ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for threads, (where, there, r) in rows:
        if where == "host":
            ref = base["pinned H2D 128 MiB"] if r.op == "write" else base["pinned D2H 128 MiB"]
            rname = "pinned copy"
        else:
            ref, rname = peer, "peer copy"
        lines.append(f"| {where} -> {there} | {threads} | {r.op} | {human(r.block_size)} x {r.batch_size} "
                     f"| {r.gbps:.1f} | "
                     f"{r.req_per_s:,.0f} | {r.p50_us:.0f} | {r.transport} | {r.gbps / ref:.2f}x {rname} |")
    tcp = tcp_rows(args.duration, args.runs)
    lines += ["", "| over TCP loopback | op | block x batch | GB/s | p50 us | ratio to host memory over TCP |",
              "|---|---|---|---|---|---|"]
    host = {r.op: r.gbps for where, r in tcp if where == "host -> host"}
    for where, r in tcp:
        lines.append(f"| {where} | {r.op} | {human(r.block_size)} x {r.batch_size} | {r.gbps:.2f} | {r.p50_us:.0f} | "
                     f"{r.gbps / host[r.op]:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baselines": base, "rows": [(n, w, t, r.__dict__) for n, (w, t, r) in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
