"""Cost of finding a request's buffer among few or many: the target's check and pin, the initiator's lookup.

    python benchmarks/registry_lookup.py [--counts 10,10000] [--rounds 20000]

For each count, registers that many 4 KiB buffers (one mapping, consecutive) and times, per batch of 32
requests landing in random buffers (a different buffer each request, the lookup's worst case):
``MemoryRegistry.acquire`` + ``release`` (what the target does for every frame) and ``Segment.find`` per
request (the initiator's check against the peer's descriptor). Medians of 5 runs, microseconds per batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from moonlet.memory import Buffer, MemoryRegistry  # noqa: E402
from moonlet.segment import DESCRIPTOR_VERSION, Segment, SegmentDescriptor  # noqa: E402

SIZE = 4096
BATCH = 32


def measure(count: int, rounds: int) -> tuple[float, float]:
    base = 1 << 40
    reg = MemoryRegistry()
    for i in range(count):
        reg.add(Buffer(base + i * 2 * SIZE, SIZE, "cpu:0"))
    desc = SegmentDescriptor.from_json({"version": DESCRIPTOR_VERSION, "name": "bench", "instance": "x",
                                        "host": "h", "pid": 1, "endpoints": {"tcp": "127.0.0.1:1"},
                                        "buffers": [{"addr": base + i * 2 * SIZE, "length": SIZE,
                                                     "location": "cpu:0"} for i in range(count)]})
    seg = Segment("bench", desc)
    rng = random.Random(1)
    batches = [[(base + rng.randrange(count) * 2 * SIZE + 64, 512) for _ in range(BATCH)] for _ in range(256)]
    target, initiator = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for k in range(rounds):
            _, pinned = reg.acquire(batches[k & 255], True)
            reg.release(pinned)
        target.append((time.perf_counter() - t0) / rounds * 1e6)
        t0 = time.perf_counter()
        for k in range(rounds):
            for addr, length in batches[k & 255]:
                seg.find(addr, length)
        initiator.append((time.perf_counter() - t0) / rounds * 1e6)
    return statistics.median(target), statistics.median(initiator)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,10000")
    ap.add_argument("--rounds", type=int, default=20000)
    args = ap.parse_args()
    print("| buffers | target acquire+release, us per 32 | initiator find, us per 32 |")
    print("|---|---|---|")
    for count in (int(c) for c in args.counts.split(",")):
        t, i = measure(count, args.rounds)
        print(f"| {count} | {t:.2f} | {i:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
