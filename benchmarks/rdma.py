"""moonlet's RDMA transport beside perftest (ib_write_bw / ib_read_bw) on the same verbs device, same run.

    python benchmarks/rdma.py [--runs 3] [--duration 4] [--out docs/results/rdma-DATE.md]

Without an RDMA device here the script re-runs itself inside tests/lab.sh's
soft-RoCE guest.  Emulated RDMA is not RDMA speed: only the ratio to perftest
on the same device counts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _moonlet_bench import bench_row  # noqa: E402
from moonlet.transport.rdma import nic, verbs  # noqa: E402

BLOCKS = (64 << 10, 1 << 20)


def perftest(op: str, block: int, duration: float, dev: str, gid: int) -> float:
    """The better of ib_<op>_bw's default queue depth and depth 16 (deep queues of large messages make
    soft-RoCE drop and retransmit), in MB/s (10^6 bytes/s)."""
    return max(perftest_at(op, block, duration, dev, gid, depth) for depth in (None, 16))


def perftest_at(op: str, block: int, duration: float, dev: str, gid: int, depth: int | None) -> float:
    """MB/s reported by ib_<op>_bw as its average, server and client on ``dev``."""
    tool = f"ib_{op}_bw"
    common = [tool, "-d", dev, "-x", str(gid), "-s", str(block), "-D", str(int(duration)), "-F", "-p", "18515"]
    if depth:
        common += ["-t", str(depth)] if op == "write" else ["-o", str(depth), "-t", str(depth)]
    server = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    client = subprocess.run(common + ["127.0.0.1"], capture_output=True, text=True, timeout=duration + 60)
    server.wait(timeout=30)
    for line in client.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0] == str(block):
            return float(fields[3])
    raise RuntimeError(f"{tool} gave no result:\n{client.stdout}\n{client.stderr}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / f"rdma-{datetime.date.today()}.md"))
    args = ap.parse_args()
    if verbs.unavailable_reason():
        lab = ROOT / "tests" / "lab.sh"
        inner = " ".join([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
        return subprocess.call([str(lab), inner], cwd=ROOT)
    nics, why = nic.discover()
    if not nics:
        print(f"no usable RDMA NIC: {why}")
        return 1
    dev = nics[0]
    rows = []
    for op in ("write", "read"):
        for block in BLOCKS:
            ref, ours, reqs = [], [], []
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                ref.append(perftest(op, block, args.duration, dev.name, dev.gid_index))
                r = bench_row("rdma", op, block, args.batch, args.duration)
                ours.append(r["req_per_s"] * block / 1e6)
                reqs.append(r["req_per_s"])
            p, m = statistics.median(ref), statistics.median(ours)
            rows.append((op, block, p, m, m / p, ref, ours))
            print(f"{op:5} {block >> 10:5} KiB  perftest {p:8.1f} MB/s  moonlet {m:8.1f} MB/s  ratio {m / p:.2f}",
                  flush=True)
    lines = [f"# RDMA: moonlet vs perftest on {dev.name} ({datetime.date.today()})", "",
             f"Command: `python benchmarks/rdma.py --runs {args.runs} --duration {args.duration} "
             f"--batch {args.batch}`; perftest: the better of its default queue depth and depth 16, per run; "
             f"device {dev.name} (active MTU {verbs.MTU_BYTES.get(dev.mtu)} B); "
             f"`uname -r`: {os.uname().release}; moonlet batch {args.batch}, 1 thread.", "",
             "| op | block | perftest MB/s (median) | moonlet MB/s (median) | moonlet / perftest "
             "| runs perftest | runs moonlet |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for op, block, p, m, ratio, ref, ours in rows:
        lines.append(f"| {op} | {block >> 10} KiB | {p:.1f} | {m:.1f} | {ratio:.2f} | "
                     f"{', '.join(f'{x:.1f}' for x in ref)} | {', '.join(f'{x:.1f}' for x in ours)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
