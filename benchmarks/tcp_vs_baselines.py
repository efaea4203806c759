"""moonlet TCP vs. a plain socket stream and Mooncake's TCP transport, in one run, on loopback.

    python benchmarks/tcp_vs_baselines.py [--runs 3] [--duration 2] [--mooncake-python PATH]

Every engine runs as two processes (target and initiator).  Each row is run
``--runs`` times and the median is reported, with the ratio to the baseline
named in the issue: the plain socket stream for 1 MiB rows, Mooncake for the
others.  Mooncake runs from its own virtualenv (``.bench/mooncake``, created on
first use with ``mooncake-transfer-engine-non-cuda``; it needs Debian's
``libibverbs1`` even for TCP; see ``_peers.py``).  A peer that cannot run gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _peers import peer_python, peer_rows
from moonlet.cli.bench import READY, human, run_row
from moonlet.engine import TransferEngine
from moonlet.memory import Buffer

HERE = Path(__file__).resolve().parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ROWS = [("write", 4 * KiB, 32), ("read", 4 * KiB, 32), ("write", 64 * KiB, 1), ("read", 64 * KiB, 1),
        ("write", 1 * MiB, 32), ("read", 1 * MiB, 32)]
BUFFER = 1 * GiB


def socket_stream(seconds: float, span: int = 1 * MiB, chunk: int = 1 * MiB) -> float:
    """GB/s of one sendall/recv_into stream of ``chunk``-byte pieces between two processes.

    Both ends walk ``span`` bytes of pre-touched memory: ``span == chunk`` reuses one
    cache-hot buffer (the textbook stream); a larger span touches as much memory as
    an engine row does.
    """
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    code = (
        "import socket,sys,time,mmap\n"
        f"s=socket.create_connection(('127.0.0.1',{port}));m=mmap.mmap(-1,{span});m.write(b'x'*{span})\n"
        "v=memoryview(m);off=0\n"
        "end=time.perf_counter()+float(sys.argv[1])\n"
        f"while time.perf_counter()<end:\n s.sendall(v[off:off+{chunk}]);off=(off+{chunk})%{span}\n"
        "s.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(seconds)])
    conn, _ = ls.accept()
    import mmap

    mem = mmap.mmap(-1, span)
    mem.write(b"y" * span)
    view = memoryview(mem)
    total = off = 0
    t0 = None
    while True:
        n = conn.recv_into(view[off:off + chunk])
        if n == 0:
            break
        if t0 is None:
            t0 = time.perf_counter()
        total += n
        off = (off + n) % span
        if span - off < chunk:
            off = 0
    elapsed = time.perf_counter() - t0
    proc.wait()
    conn.close()
    ls.close()
    return total / elapsed / 1e9


def moonlet_rows(rows, runs: int, duration: float, threads: int) -> dict:
    """Median moonlet result per row (target in a subprocess)."""
    target = subprocess.Popen([sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target",
                               "--buffer-size", str(BUFFER), "--protocol", "tcp"], stdout=subprocess.PIPE, text=True)
    try:
        line = target.stdout.readline()
        assert line.startswith(READY), line
        name = line.split()[1]
        import mmap

        out = {}
        with TransferEngine(transports=("tcp",)) as eng:  # same host: force TCP, the transport measured here
            mem = mmap.mmap(-1, BUFFER)
            local: Buffer = eng.register(mem)
            seg = eng.open_segment(name)
            remote = seg.buffers[0]
            for op, block, batch in rows:
                res = [run_row(eng, seg, local, remote, op, block, batch, threads, duration, False) for _ in range(runs)]
                out[(op, block, batch)] = sorted(res, key=lambda r: r.req_per_s)[len(res) // 2]
        return out
    finally:
        target.terminate()
        target.wait(10)


def mooncake_rows(py: str, rows, runs: int, duration: float, threads_options: list[int]) -> dict:
    """Best-of-thread-counts, median-of-runs Mooncake result per row."""
    spec = [[op, block, batch, t, duration] for op, block, batch in rows for t in threads_options for _ in range(runs)]
    results, _ = peer_rows("mooncake", py, spec, BUFFER)
    out = {}
    for op, block, batch in rows:
        best = None
        for t in threads_options:
            mine = [x for x in results if (x["op"], x["block"], x["batch"], x["threads"]) == (op, block, batch, t)]
            if not mine or any(x["error"] for x in mine):
                continue
            med = sorted(mine, key=lambda x: x["req_per_s"])[len(mine) // 2]
            if best is None or med["req_per_s"] > best["req_per_s"]:
                best = med
        out[(op, block, batch)] = best
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="moonlet initiator threads")
    ap.add_argument("--mooncake-python", help="a Python that imports mooncake.engine")
    ap.add_argument("--no-mooncake", action="store_true")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()

    streams = [socket_stream(args.duration) for _ in range(args.runs)]
    stream = statistics.median(streams)
    # The 1 MiB x 32 rows touch 64 MiB per side (scattered blocks, stride 2 MiB).
    wide = statistics.median([socket_stream(args.duration, span=64 * MiB) for _ in range(args.runs)])
    ml = moonlet_rows(ROWS, args.runs, args.duration, args.threads)
    mc, why = ({}, "skipped (--no-mooncake)") if args.no_mooncake else (None, "")
    if mc is None:
        py, why = peer_python("mooncake", args.mooncake_python)
        mc = mooncake_rows(py, ROWS, args.runs, args.duration, [1, 2]) if py else {}

    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, median of {args.runs} x {args.duration:g} s")
    print(f"plain socket stream (sendall/recv_into 1 MiB, two processes): {stream:.3f} GB/s "
          f"(runs: {', '.join(f'{s:.2f}' for s in streams)}); walking 64 MiB like the engine rows: {wide:.3f} GB/s")
    if why:
        print(f"Mooncake: {why}")
    print()
    print("| op | block x batch | moonlet GB/s | moonlet req/s | p50 us | Mooncake GB/s | Mooncake req/s "
          "| moonlet / Mooncake | moonlet / socket stream |")
    print("|---|---|---|---|---|---|---|---|---|")
    dump = {"socket_stream_gbps": streams, "socket_stream_64mib_gbps": wide, "rows": []}
    for key in ROWS:
        op, block, batch = key
        m = ml[key]
        c = mc.get(key)
        ratio_mc = f"{m.req_per_s / c['req_per_s']:.2f}x" if c else "n/a"
        ratio_ss = f"{m.gbps / stream:.2f}x"
        print(f"| {op} | {human(block)} x {batch} | {m.gbps:.3f} | {m.req_per_s:,.0f} | {m.p50_us:.0f} | "
              f"{c['gbps']:.3f} | {c['req_per_s']:,.0f} | {ratio_mc} | {ratio_ss} |" if c else
              f"| {op} | {human(block)} x {batch} | {m.gbps:.3f} | {m.req_per_s:,.0f} | {m.p50_us:.0f} | n/a | n/a "
              f"| n/a | {ratio_ss} |")
        dump["rows"].append({"op": op, "block": block, "batch": batch, "moonlet": m.__dict__, "mooncake": c})
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
