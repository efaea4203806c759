"""Where the time of one small-block GPU batch goes (64 KiB x 128, GPU0 -> GPU1, two processes).

    python benchmarks/gpu_profile.py [--seconds 2]

Prints microseconds per batch for: the whole engine path (``submit_many`` +
``wait``), the stream alone (copy + event, no engine), the gather kernel alone
on the GPU (timed with CUDA events), and a cProfile of the engine path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

from gpu import vram_target
from moonlet import Op, gpu

KiB, MiB = 1 << 10, 1 << 20


def per_batch(fn, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--block", type=int, default=64 * KiB)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    with vram_target(64 * MiB) as (eng, seg, remote):
        local = eng.register(gpu.alloc(0, 64 * MiB), 64 * MiB)
        stride = 2 * args.block
        las = [local.addr + i * stride for i in range(args.batch)]
        ras = [remote.addr + i * stride for i in range(args.batch)]
        lens = [args.block] * args.batch
        nbytes = args.block * args.batch

        def engine_path() -> None:
            eng.submit_many(Op.WRITE, seg, las, ras, lens).wait()

        us = per_batch(engine_path, args.seconds)
        print(f"engine submit_many+wait: {us:.1f} us/batch = {nbytes / us / 1e3:.1f} GB/s")
        ipc = next(t for t in eng._transports if t.name == "cuda_ipc")
        off = ipc._open(seg.descriptor, remote, 0) - remote.ipc_base
        copies = [(r + off, la, n) for la, r, n in zip(las, ras, lens)]
        stream = ipc._stream(0)

        def stream_path() -> None:
            stream.copy(copies, True)
            gpu.event_done(stream.record(), True)

        us = per_batch(stream_path, args.seconds)
        print(f"stream copy+record+event sync (no engine): {us:.1f} us/batch = {nbytes / us / 1e3:.1f} GB/s")

        def launch_only() -> None:
            stream.copy(copies, True)

        d = gpu.driver()
        gpu.use_device(0)
        start = gpu.check(d.cuEventCreate(0), "cuEventCreate")
        end = gpu.check(d.cuEventCreate(0), "cuEventCreate")
        reps = 200
        chosen = stream.kernel_chunk
        for chunk in sorted({4 << 10, 8 << 10, 16 << 10, 32 << 10, chosen}):
            stream.kernel_chunk = chunk
            gpu.check(d.cuEventRecord(start, stream.handle), "cuEventRecord")
            t0 = time.perf_counter()
            for _ in range(reps):
                launch_only()
            t1 = time.perf_counter()
            gpu.check(d.cuEventRecord(end, stream.handle), "cuEventRecord")
            gpu.check(d.cuEventSynchronize(end), "cuEventSynchronize")
            ms = gpu.check(d.cuEventElapsedTime(start, end), "cuEventElapsedTime")
            print(f"gather kernel, {chunk >> 10} KiB per thread block{' (default)' if chunk == chosen else ''}: "
                  f"launch (CPU side, queue may be full) {(t1 - t0) / reps * 1e6:.1f} us; GPU time per batch "
                  f"(back to back) {ms * 1e3 / reps:.1f} us = {nbytes * reps / (ms * 1e-3) / 1e9:.1f} GB/s")
        stream.kernel_chunk = chosen
        prof = cProfile.Profile()
        prof.enable()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            engine_path()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
