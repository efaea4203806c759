"""Instructions a side executes per batch, old source tree against new, counted by callgrind (deterministic,
unlike wall-clock on a shared machine).

    python scripts/icount.py OLD_SRC NEW_SRC [--batches N] [--metrics]

For each path (tcp: host memory to another process over TCP; attach: the same-host attached path, target copies
with process_vm_readv/writev) and op (write, read, 4 KiB x 32 with submit_many), each side (initiator, target)
runs under callgrind with N and 2N batches while the other side runs natively; (Ir(2N) - Ir(N)) / N is that
side's cost per batch, start-up excluded. Both engines run with spin_us=0, so no instructions are spent
waiting. With ``--metrics`` the new side's engines count for Prometheus (``moonlet.metrics.register``): pass the
same tree twice to measure what counting costs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

BLOCK, BATCH = 4096, 32
PEER = r'''
import mmap, os, sys
from moonlet import EngineConfig, Op, TransferEngine
role, path, op, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
transports = ("tcp",) if path == "tcp" else ("shm", "tcp")
eng = TransferEngine(config=EngineConfig(transports=transports, spin_us=0, request_timeout=30.0))
if os.environ.get("ICOUNT_METRICS"):  # counting on, into a registry nobody scrapes (no server thread)
    import prometheus_client
    from moonlet import metrics
    metrics.register(eng, prometheus_client.CollectorRegistry())
mem = mmap.mmap(-1, 1 << 20)
mem[:] = os.urandom(1 << 20)
buf = eng.register(mem)  # ordinary registered memory: no memfd, so the same-host path is the attached one
if role == "target":
    print(eng.name, buf.addr, flush=True)
    sys.stdin.read()
else:
    name, addr = sys.stdin.readline().split()
    seg = eng.open_segment(name)
    la = [buf.addr + 2 * i * 4096 for i in range(32)]
    ra = [int(addr) + 2 * i * 4096 for i in range(32)]
    ln = [4096] * 32
    kind = Op.WRITE if op == "write" else Op.READ
    for _ in range(batches):
        assert all(s.ok for s in eng.submit_many(kind, seg, la, ra, ln).wait())
    carried = {s.transport for s in eng.submit_many(kind, seg, la, ra, ln).wait()}
    assert carried == {"shm" if path == "attach" else "tcp"}, carried
eng.close()
'''


def run(src: str, counted: str, path: str, op: str, batches: int, tmp: str, metrics: bool = False) -> int:
    """Ir of the ``counted`` side ("initiator" or "target") over a run of ``batches`` batches."""
    env = dict(os.environ, PYTHONPATH=src, PYTHONHASHSEED="0", ICOUNT_METRICS="1" if metrics else "")
    out = os.path.join(tmp, "cg.out")
    grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    tgt = subprocess.Popen([*(grind if counted == "target" else []), sys.executable, "-c", PEER, "target", path, op,
                            "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True, env=env)
    assert tgt.stdout is not None and tgt.stdin is not None
    line = tgt.stdout.readline()
    ini = subprocess.run([*(grind if counted == "initiator" else []), sys.executable, "-c", PEER, "initiator", path,
                          op, str(batches)], input=line, text=True, env=env, capture_output=True, timeout=1200)
    tgt.stdin.close()
    tgt.wait(600)
    if ini.returncode:
        raise SystemExit(ini.stderr[-2000:])
    with open(out) as f:
        totals = [line for line in f if line.startswith(("summary:", "totals:"))]
    return int(re.findall(r"\d+", totals[-1])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--metrics", action="store_true", help="the new side counts for Prometheus")
    ap.add_argument("--paths", default="tcp,attach", help="comma-separated: tcp, attach")
    args = ap.parse_args()
    n = args.batches
    print("| path | op | side | old Ir/batch | new Ir/batch | new/old |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths.split(","):
            for op in ("write", "read"):
                for side in ("initiator", "target"):
                    per = {}
                    for name, src in (("old", args.old), ("new", args.new)):
                        on = args.metrics and name == "new"
                        twice, once = (run(src, side, path, op, k, tmp, on) for k in (2 * n, n))
                        per[name] = (twice - once) / n
                    print(f"| {path} | {op} {BLOCK // 1024} KiB x {BATCH} | {side} | {per['old']:,.0f} | "
                          f"{per['new']:,.0f} | {per['new'] / per['old']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
