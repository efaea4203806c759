"""moonlet TCP vs. a plain socket stream and Mooncake's TCP transport, in one run, on loopback.

    python benchmarks/tcp_vs_baselines.py [--runs 3] [--duration 2] [--mooncake-python PATH]

Every engine runs as two processes (target and initiator).  The run is made of
``--runs`` rounds, each running every row of every engine and the socket
streams once, so that a shared machine's drift over the minutes of a run
touches both sides of a ratio alike.  The median over the rounds is reported,
with the ratio to the baseline named in the issue (the plain socket stream for
1 MiB rows, Mooncake for the others) and the ratio within each round.  Mooncake
runs from its own virtualenv (``.bench/mooncake``, created on first use with
``mooncake-transfer-engine-non-cuda``; it needs Debian's ``libibverbs1`` even
for TCP; see ``_peers.py``).  A peer that cannot run gets a row saying why.
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


def moonlet_rows(rows, duration: float, threads: int) -> dict:
    """One moonlet result per row (target in a subprocess)."""
    target = subprocess.Popen([sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target",
                               "--buffer-size", str(BUFFER), "--protocol", "tcp"], stdout=subprocess.PIPE, text=True)
    try:
        line = target.stdout.readline()
        assert line.startswith(READY), line
        name = line.split()[1]
        import mmap

        with TransferEngine(transports=("tcp",)) as eng:  # same host: force TCP, the transport measured here
            mem = mmap.mmap(-1, BUFFER)
            local: Buffer = eng.register(mem)
            seg = eng.open_segment(name)
            remote = seg.buffers[0]
            return {(op, block, batch): run_row(eng, seg, local, remote, op, block, batch, threads, duration, False)
                    for op, block, batch in rows}
    finally:
        target.terminate()
        target.wait(10)


def mooncake_rows(py: str, rows, duration: float, threads_options: list[int]) -> tuple[dict, str]:
    """One Mooncake result per row and thread count: ({(op, block, batch, threads): result}, error or "")."""
    spec = [[op, block, batch, t, duration] for op, block, batch in rows for t in threads_options]
    results, err = peer_rows("mooncake", py, spec, BUFFER)
    return {(x["op"], x["block"], x["batch"], x["threads"]): x for x in results if not x["error"]}, err


def median_of(results: list, key) -> object:
    """The result with the median ``key`` (the upper one of an even count)."""
    return sorted(results, key=key)[len(results) // 2]


def paired(key: tuple, ml_runs: list, mc_runs: list, streams: list) -> list[float]:
    """Per round, moonlet's ratio to the row's baseline of the same round: the socket stream for
    1 MiB rows (GB/s), Mooncake's better thread count for the others (requests/s)."""
    if key[1] >= MiB:
        return [run[key].gbps / s for run, s in zip(ml_runs, streams)]
    out = []
    for run, mc in zip(ml_runs, mc_runs):
        best = max((mc[key + (t,)]["req_per_s"] for t in (1, 2) if key + (t,) in mc), default=0)
        if best:
            out.append(run[key].req_per_s / best)
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

    # Rounds: every engine and baseline runs once per round, so drift of a shared machine over the
    # minutes of a run touches both sides of each ratio alike; medians are taken over the rounds.
    streams, wides, ml_runs, mc_runs, mc_err = [], [], [], [], ""
    py, why = (None, "skipped (--no-mooncake)") if args.no_mooncake else peer_python("mooncake", args.mooncake_python)
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs}", file=sys.stderr, flush=True)
        streams.append(socket_stream(args.duration))
        # The 1 MiB x 32 rows touch 64 MiB per side (scattered blocks, stride 2 MiB).
        wides.append(socket_stream(args.duration, span=64 * MiB))
        ml_runs.append(moonlet_rows(ROWS, args.duration, args.threads))
        if py:
            got, err = mooncake_rows(py, ROWS, args.duration, [1, 2])
            mc_runs.append(got)
            mc_err = mc_err or err
    stream, wide = statistics.median(streams), statistics.median(wides)
    ml = {key: median_of([run[key] for run in ml_runs], lambda x: x.req_per_s) for key in ROWS}
    mc = {}
    for op, block, batch in ROWS:  # Mooncake's best thread count, by its median over the rounds
        meds = [median_of(runs, lambda x: x["req_per_s"]) for t in (1, 2)
                if (runs := [run[(op, block, batch, t)] for run in mc_runs if (op, block, batch, t) in run])]
        if meds:
            mc[(op, block, batch)] = max(meds, key=lambda x: x["req_per_s"])
    why = why or mc_err

    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, median of {args.runs} x {args.duration:g} s")
    print(f"plain socket stream (sendall/recv_into 1 MiB, two processes): {stream:.3f} GB/s "
          f"(runs: {', '.join(f'{s:.2f}' for s in streams)}); walking 64 MiB like the engine rows: {wide:.3f} GB/s "
          f"(runs: {', '.join(f'{s:.2f}' for s in wides)})")
    if why:
        print(f"Mooncake: {why}")
    print()
    print("| op | block x batch | moonlet GB/s | moonlet req/s | p50 us | Mooncake GB/s | Mooncake req/s "
          "| moonlet / Mooncake | moonlet / socket stream | ratio to the baseline, round by round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dump = {"socket_stream_gbps": streams, "socket_stream_64mib_gbps": wides, "rows": []}
    for key in ROWS:
        op, block, batch = key
        m = ml[key]
        c = mc.get(key)
        ratio_mc = f"{m.req_per_s / c['req_per_s']:.2f}x" if c else "n/a"
        ratio_ss = f"{m.gbps / stream:.2f}x"
        rounds = ", ".join(f"{x:.2f}" for x in paired(key, ml_runs, mc_runs, streams))
        print(f"| {op} | {human(block)} x {batch} | {m.gbps:.3f} | {m.req_per_s:,.0f} | {m.p50_us:.0f} | "
              f"{c['gbps']:.3f} | {c['req_per_s']:,.0f} | {ratio_mc} | {ratio_ss} | {rounds} |" if c else
              f"| {op} | {human(block)} x {batch} | {m.gbps:.3f} | {m.req_per_s:,.0f} | {m.p50_us:.0f} | n/a | n/a "
              f"| n/a | {ratio_ss} | {rounds} |")
        dump["rows"].append({"op": op, "block": block, "batch": batch, "moonlet": m.__dict__, "mooncake": c,
                             "moonlet_runs": [run[key].__dict__ for run in ml_runs],
                             "mooncake_runs": [run.get(key + (t,)) for run in mc_runs for t in (1, 2)]})
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
