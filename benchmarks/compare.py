"""moonlet beside the engines users would otherwise pick, on this machine, in one run, with a plot.

    python benchmarks/compare.py [--duration 0.5] [--out docs/results/compare-DATE]

Workload: block sizes 4 KiB ... 16 MiB, batch 1 and 32, READ and WRITE, two
processes, scattered blocks (stride 2 x block). Engines:

- moonlet over each transport that works here: tcp, shm (the target copies with
  process_vm_readv/writev), shm with target memory from engine.allocate(), and rdma
  (on a host without an RDMA device its rows say so)
  (the initiator memcpys into a shared mapping);
- Mooncake Transfer Engine (``mooncake-transfer-engine-non-cuda``, protocol tcp,
  P2PHANDSHAKE);
- NIXL with its UCX backend (``nixl-cu12``), forced to TCP (``UCX_TLS=tcp``) and
  with UCX's own choice on one host (shared memory / CMA);
- baselines: a single-thread numpy memcpy of the same blocks, a plain socket
  stream (sendall/recv_into of 1 MiB), iperf3 where installed.

Peers are installed into their own virtualenvs under .bench/ (they pin
conflicting packages). A peer that fails to install or run gets rows saying
why. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.

GPU version, on a machine with two GPUs and no package registry:

    scripts/gpu-peers.sh unpack /tmp/peers      # the peer wheels, packed beforehand by scripts/gpu-peers.sh pack
    python benchmarks/compare.py --use-vram --peers /tmp/peers

Both sides' memory is GPU memory (initiator GPU 0, target the last GPU, which is GPU 0 too
on a one-GPU machine). Engines:
moonlet over CUDA IPC and over TCP (staged through pinned host memory), Mooncake's
CUDA wheel (protocol nvlink_intra, then tcp), NIXL with UCX's own choice;
baselines: torch peer copies and pinned copies in one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _peers import peer_python, peer_rows
from moonlet import EngineConfig, TransferEngine
from moonlet.cli.bench import READY, human, run_row
from same_host import memcpy_row
from tcp_vs_baselines import socket_stream

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCKS = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
BATCHES = [1, 32]
OPS = ["write", "read"]
BUFFER = 1 * GiB  # 16 MiB x 32 blocks at a 32 MiB stride
CONFIGS = [(op, block, batch) for op in OPS for batch in BATCHES for block in BLOCKS]


def moonlet_engine(label: str, protocol: str, shared: bool, seconds: float, vram: int | None = None,
                   adjacent: bool = False) -> dict:
    """Rows of moonlet over ``protocol``; ``vram``: the target's GPU (the initiator uses GPU 0), None for host memory;
    ``adjacent``: the blocks of a batch back to back instead of scattered."""
    cmd = [sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target", "--protocol", protocol,
           "--buffer-size", str(BUFFER)] + (["--shared"] if shared else []) \
        + (["--use-vram", "--gpu", str(vram)] if vram is not None else [])
    target = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    try:
        line = target.stdout.readline()
        if not line.startswith(READY):
            why = (target.stderr.read().strip().splitlines() or ["no output"])[-1]
            return {c: {"error": f"target did not start: {why}"} for c in CONFIGS}
        with TransferEngine(config=EngineConfig(transports=(protocol,))) as eng:
            if vram is None:
                local = eng.register(mmap.mmap(-1, BUFFER))
            else:
                from moonlet import gpu

                local = eng.register(gpu.alloc(0, BUFFER), BUFFER)
            seg = eng.open_segment(line.split()[1])
            for op, block, batch in CONFIGS:
                print(f"  {label}: {op} {human(block)} x {batch}", file=sys.stderr, flush=True)
                try:
                    r = run_row(eng, seg, local, seg.buffers[0], op, block, batch, 1, seconds, False, adjacent)
                    out[(op, block, batch)] = {"gbps": r.gbps, "req_per_s": r.req_per_s, "p50_us": r.p50_us,
                                               "p99_us": r.p99_us}
                except Exception as e:  # noqa: BLE001 - reported in the row
                    out[(op, block, batch)] = {"error": str(e)}
    finally:
        target.terminate()
        target.wait(10)
    return out


def peer_engine(name: str, label: str, seconds: float, env: dict | None = None, python: str | None = None,
                adjacent: bool = False) -> dict:
    """Rows of a peer engine, from its virtualenv (installed on demand) or from ``python`` with ``env``."""
    print(f"  {label}: installing / checking", file=sys.stderr, flush=True)
    py, why = (python, "") if python else peer_python(name)
    if py is None:
        return {c: {"error": why} for c in CONFIGS}
    spec = [[op, block, batch, 1, seconds, adjacent] for op, block, batch in CONFIGS]
    print(f"  {label}: {len(spec)} rows", file=sys.stderr, flush=True)
    results, why = peer_rows(name, py, spec, BUFFER, env)
    out = {}
    for op, block, batch in CONFIGS:
        got = [x for x in results if (x["op"], x["block"], x["batch"]) == (op, block, batch)]
        if got and not got[0]["error"]:
            out[(op, block, batch)] = {k: got[0][k] for k in ("gbps", "req_per_s", "p50_us", "p99_us")}
        else:
            out[(op, block, batch)] = {"error": (got[0]["error"] if got else why) or "no result"}
    return out


def memcpy_rows(seconds: float) -> dict:
    out = {}
    for block in BLOCKS:
        for batch in BATCHES:
            gbps, per_s = memcpy_row(block, batch, seconds)
            for op in OPS:
                out[(op, block, batch)] = {"gbps": gbps, "req_per_s": per_s}
    return out


def iperf3(seconds: float) -> float | None:
    exe = shutil.which("iperf3")
    if exe is None:
        return None
    server = subprocess.Popen([exe, "-s", "-1", "-p", "5299"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = subprocess.run([exe, "-c", "127.0.0.1", "-p", "5299", "-t", str(max(1, int(seconds * 4))), "-J"],
                           capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 8e9
    except (subprocess.SubprocessError, ValueError, KeyError):
        return None
    finally:
        server.kill()
        server.wait()


def plot(results: dict, baselines: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
    for ax, (op, batch) in zip(axes.flat, [(op, b) for op in OPS for b in BATCHES]):
        for engine, rows in results.items():
            xs = [b for b in BLOCKS if "gbps" in rows.get((op, b, batch), {})]
            if xs:
                style = "-" if engine.startswith("moonlet") else "--"
                ax.plot(xs, [rows[(op, b, batch)]["gbps"] for b in xs], style, marker="o", label=engine)
        for name, value in baselines.items():
            if value:
                ax.axhline(value, color="gray", linestyle=":", linewidth=1)
                ax.text(BLOCKS[0], value, f" {name}", fontsize=7, color="gray", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(BLOCKS, [human(b).replace(" ", "") for b in BLOCKS])
        ax.set_title(f"{op.upper()}, batch {batch}")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Two processes on {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=0.5, help="seconds per row and engine")
    ap.add_argument("--out", help="output path without extension (default docs/results/compare[-gpu]-DATE)")
    ap.add_argument("--skip", nargs="*", default=[], help="engines to leave out: mooncake, nixl")
    ap.add_argument("--use-vram", action="store_true", help="GPU memory on both sides (two GPUs, see above)")
    ap.add_argument("--peers", help="with --use-vram: where scripts/gpu-peers.sh unpacked the peer wheels")
    ap.add_argument("--adjacent", action="store_true",
                    help="the blocks of a batch back to back on both sides, for every engine (the memcpy baseline "
                         "stays scattered)")
    args = ap.parse_args()
    if args.adjacent and args.use_vram:
        ap.error("--adjacent runs host memory only")
    if importlib.util.find_spec("matplotlib") is None:  # checked now, not after minutes of measuring
        print("compare.py draws its plot with matplotlib: pip install 'moonlet[bench]'", file=sys.stderr)
        return 2
    args.out = args.out or f"docs/results/compare{'-gpu' if args.use_vram else ''}-{time.strftime('%Y-%m-%d')}"
    if args.use_vram:
        return main_gpu(args)
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    print("baselines", file=sys.stderr, flush=True)
    results["memcpy (numpy, 1 thread)"] = memcpy_rows(args.duration)
    baselines = {"socket stream 1 MiB": socket_stream(max(args.duration, 1.0)), "iperf3": iperf3(args.duration)}
    print(f"  [{time.perf_counter() - t_start:.0f} s]", file=sys.stderr)
    adj = args.adjacent
    results["moonlet tcp"] = moonlet_engine("moonlet tcp", "tcp", False, args.duration, adjacent=adj)
    results["moonlet shm"] = moonlet_engine("moonlet shm", "shm", False, args.duration, adjacent=adj)
    results["moonlet shm (allocate)"] = moonlet_engine("moonlet shm (allocate)", "shm", True, args.duration,
                                                       adjacent=adj)
    results["moonlet rdma"] = moonlet_engine("moonlet rdma", "rdma", False, args.duration,
                                             adjacent=adj)  # a row saying why not, here
    print(f"  [{time.perf_counter() - t_start:.0f} s]", file=sys.stderr)
    if "mooncake" not in args.skip:
        results["Mooncake tcp"] = peer_engine("mooncake", "Mooncake tcp", args.duration, adjacent=adj)
    print(f"  [{time.perf_counter() - t_start:.0f} s]", file=sys.stderr)
    if "nixl" not in args.skip:
        results["NIXL UCX tcp"] = peer_engine("nixl", "NIXL UCX tcp", args.duration, {"UCX_TLS": "tcp"}, adjacent=adj)
        print(f"  [{time.perf_counter() - t_start:.0f} s]", file=sys.stderr)
        results["NIXL UCX (same host)"] = peer_engine("nixl", "NIXL UCX (same host)", args.duration, adjacent=adj)
    return report(args, results, baselines, time.perf_counter() - t_start,
                  "python benchmarks/compare.py" + (" --adjacent" if adj else ""))


def main_gpu(args: argparse.Namespace) -> int:
    """The comparison with GPU memory on both sides."""
    import torch

    from gpu import baselines as gpu_baselines

    t_start = time.perf_counter()
    last = torch.cuda.device_count() - 1  # with one GPU, both processes use it
    if last < 0:
        print("--use-vram needs a GPU", file=sys.stderr)
        return 2
    print("baselines", file=sys.stderr, flush=True)
    base = gpu_baselines(max(args.duration, 0.5), 1)
    baselines = {k: base[k] for k in ("peer copy 128 MiB (one copy)", "pinned H2D 128 MiB")}
    results: dict[str, dict] = {}
    results["moonlet cuda_ipc"] = moonlet_engine("moonlet cuda_ipc", "cuda_ipc", False, args.duration, last)
    results["moonlet tcp (GPU staged)"] = moonlet_engine("moonlet tcp (GPU staged)", "tcp", False, args.duration,
                                                         last)
    env = {"MOONLET_PEER_VRAM": f"0,{last}"}
    if args.peers:
        site = str(Path(args.peers) / "site")
        cuda_libs = [str(p) for p in Path(torch.__file__).parent.parent.glob("nvidia/*/lib")]
        env.update(PYTHONPATH=os.pathsep.join([site, str(Path(__file__).parent)]),
                   LD_LIBRARY_PATH=os.pathsep.join([str(Path(args.peers) / "lib"), *cuda_libs,
                                                    os.environ.get("LD_LIBRARY_PATH", "")]))
    python = sys.executable if args.peers else None
    if "mooncake" not in args.skip:
        for protocol in ("nvlink_intra", "tcp"):
            label = f"Mooncake {protocol}"
            results[label] = peer_engine("mooncake", label, args.duration, {**env, "MOONCAKE_PROTOCOL": protocol},
                                         python)
    if "nixl" not in args.skip:
        results["NIXL UCX (same host)"] = peer_engine("nixl", "NIXL UCX (same host)", args.duration, env, python)
    return report(args, results, baselines, time.perf_counter() - t_start,
                  "python benchmarks/compare.py --use-vram --peers DIR")


def report(args: argparse.Namespace, results: dict, baselines: dict, elapsed: float, command: str) -> int:
    """Write the table (Markdown, JSON) and the plot; print the table."""
    peers = [e for e in results if not e.startswith(("moonlet", "memcpy"))]
    first_moonlet = next(e for e in results if e.startswith("moonlet"))
    lines = [f"# moonlet vs. peer engines, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}. Two processes, "
             f"{'adjacent blocks (memcpy: scattered)' if args.adjacent else 'scattered blocks'}, "
             f"{args.duration:g} s per row, one run "
             f"of each (whole suite {elapsed:.0f} s). Command: `{command}`.", "",
             "Baselines: " + ", ".join(f"{k} {v:.2f} GB/s" if v else f"{k}: not installed"
                                       for k, v in baselines.items()) + ".", "",
             "| op | block x batch | engine | GB/s | req/s | p50 us | p99 us | moonlet best / best peer |",
             "|---|---|---|---|---|---|---|---|"]
    for op, block, batch in CONFIGS:
        key = (op, block, batch)
        best_peer = max((results[e][key]["gbps"] for e in peers if "gbps" in results[e][key]), default=None)
        mine = max((results[e][key]["gbps"] for e in results if e.startswith("moonlet") and "gbps" in results[e][key]),
                   default=None)
        ratio = f"{mine / best_peer:.2f}x" if mine and best_peer else "n/a"
        for engine, rows in results.items():
            r = rows[key]
            if "error" in r:
                lines.append(f"| {op} | {human(block)} x {batch} | {engine} | error: {r['error'][:120]} | | | | |")
            else:
                lat = (f"{r['p50_us']:.0f} | {r['p99_us']:.0f}" if "p50_us" in r else " | ")
                lines.append(f"| {op} | {human(block)} x {batch} | {engine} | {r['gbps']:.3f} | {r['req_per_s']:,.0f} "
                             f"| {lat} | {ratio if engine == first_moonlet else ''} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(
        {"baselines": baselines, "elapsed_s": elapsed,
         "rows": [{"engine": e, "op": k[0], "block": k[1], "batch": k[2], **v} for e, rows in results.items()
                  for k, v in rows.items()]}, indent=1))
    plot(results, baselines, args.out + ".png")
    print(text)
    print(f"wrote {args.out}.md, .json, .png in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
