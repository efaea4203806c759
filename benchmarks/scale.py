"""Scale with peers: fan-in (N initiator processes -> 1 target) and fan-out (1 initiator process -> N targets).

    python benchmarks/scale.py [--peers 1,2,4,8,16] [--duration 2] [--patterns fan-in,fan-out]
                               [--ops write,read] [--blocks 64K,1M] [--transports tcp,shm]
                               [--engines moonlet,socket-streams,mooncake] [--mooncake-bench PATH]
                               [--out docs/results/scale-DATE-16cpu]
    python benchmarks/scale.py --plot RESULT.json     # (re)draw RESULT.png from a result file

Per row, every peer process first connects and warms up, then all start together on one signal and run
``--duration`` seconds; a row's GB/s is the sum of what each peer moved over its own clock, and
``per_peer_GBps`` lists each peer's share (fan-out: each target's).

* ``moonlet``: ``benchmarks/_scale_worker.py`` processes, one engine each, ``transports=(T,)`` for T in
  ``--transports`` (``shm``: ordinary registered memory, which the target copies with
  ``process_vm_readv``/``writev``). Fan-in: one target, N initiators each with one submitting thread.
  Fan-out: N targets, one initiator with one submitting thread per target (``threads`` = N) and, as a
  second row, one thread submitting to all (``threads`` = 1).
* ``socket-streams``: the ceiling, N plain TCP streams over loopback, two processes each (``sendall`` of
  one batch's bytes, block x 32, at a time / ``recv_into`` as much; ``read`` rows send the other way), 4 MiB
  socket buffers as moonlet's.
* ``mooncake``: Mooncake's ``transfer_engine_bench`` (TCP, P2PHANDSHAKE), fan-in only: one target, N
  initiators each with one thread. They start together but without the shared signal (the binary has
  none); each reports its own throughput. The binary comes from ``--mooncake-bench``, else from
  ``.bench/mooncake`` (``mooncake-transfer-engine-non-cuda``, created as the other benchmarks do).

Output: ``OUT.json`` (``{"machine": {...}, "rows": [...]}``, one row per measurement), ``OUT.md`` (table
with the ratio to the streams) and ``OUT.png`` (sum GB/s against N, with matplotlib where installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _peers import peer_python, stop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = str(HERE / "_scale_worker.py")
BATCH = 32
ENV = dict(os.environ)


def use_source(src: Path) -> None:
    """Run the moonlet of source tree ``src`` in every worker (default: this checkout's)."""
    ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


class Proc:
    """A worker process whose first line says it is ready; ``go()`` starts it, ``result()`` its JSON line."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, WORKER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=ENV)

    def ready(self, timeout: float = 60) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            if line.startswith("READY"):
                return line.split()[1:]
        self.p.kill()
        raise RuntimeError("a worker did not start: " + (self.p.stderr.read().strip()[-800:] or "no output"))  # type: ignore[union-attr]

    def go(self) -> None:
        self.p.stdin.write("GO\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]

    def result(self, timeout: float) -> dict:
        out, err = self.p.communicate(timeout=timeout)
        lines = [x for x in out.splitlines() if x.startswith("{")]
        if self.p.returncode or not lines:
            raise RuntimeError(f"a worker failed ({self.p.returncode}): {err.strip()[-800:]}")
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()  # type: ignore[union-attr]
                self.p.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()


def _timed(peers: list[Proc], seconds: float) -> list[float]:
    """Start ``peers`` together; each one's GB/s per target it served."""
    for p in peers:
        p.ready()
    for p in peers:
        p.go()
    out = []
    for p in peers:
        r = p.result(seconds + 60)
        out += [b / r["seconds"] / 1e9 for b in r["bytes"]]
    return out


def streams(n: int, op: str, block: int, seconds: float) -> list[float]:
    chunk = str(block * BATCH)  # what one batch moves: one sendall / recv_into of it at a time
    servers = [Proc("stream-server", op, chunk) for _ in range(n)]
    try:
        ports = [s.ready()[0] for s in servers]
        return _timed([Proc("stream-client", op, chunk, str(seconds), port) for port in ports], seconds)
    finally:
        for s in servers:
            s.stop()


class Targets:
    """Moonlet target processes kept across rows (one per transport and slot), each with room for 16 peers'
    blocks of the largest row."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.live: dict[tuple[str, int], tuple[Proc, str]] = {}

    def get(self, transport: str, slot: int) -> str:
        key = (transport, slot)
        if key not in self.live:
            proc = Proc("target", transport, str(self.size))
            name, addr = proc.ready()
            self.live[key] = (proc, f"{name}@{addr}")
        return self.live[key][1]

    def close(self) -> None:
        for proc, _ in self.live.values():
            proc.stop()
        self.live.clear()


def moonlet_fan_in(targets: Targets, transport: str, n: int, op: str, block: int, seconds: float) -> list[float]:
    name, addr = targets.get(transport, 0).rsplit("@", 1)
    span = 2 * block * BATCH
    return _timed([Proc("initiator", transport, op, str(block), str(BATCH), str(seconds), "per-peer",
                        f"{name}@{int(addr) + i * span}") for i in range(n)], seconds)


def moonlet_fan_out(targets: Targets, transport: str, n: int, op: str, block: int, seconds: float,
                    threads: str) -> list[float]:
    specs = [targets.get(transport, i) for i in range(n)]
    return _timed([Proc("initiator", transport, op, str(block), str(BATCH), str(seconds), threads, *specs)],
                  seconds)


def mooncake_binary(explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        return (explicit, "") if os.access(explicit, os.X_OK) else (None, f"{explicit} is not executable")
    py, why = peer_python("mooncake")
    if py is None:
        return None, why
    where = subprocess.run([py, "-c", "import mooncake, os; print(os.path.dirname(mooncake.__file__))"],
                           capture_output=True, text=True).stdout.strip()
    binary = os.path.join(where, "transfer_engine_bench")
    return (binary, "") if os.access(binary, os.X_OK) else (None, f"no transfer_engine_bench in {where}")


def mooncake_fan_in(binary: str, n: int, op: str, block: int, seconds: float, size: int) -> list[float]:
    common = ["--metadata_server=P2PHANDSHAKE", "--local_server_name=127.0.0.1", "--protocol=tcp",
              f"--buffer_size={size}"]
    target = subprocess.Popen([binary, "--mode=target", *common], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        name = None
        end = time.monotonic() + 60
        while name is None and time.monotonic() < end:
            line = target.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            m = re.search(r"listening on (\S+:\d+)", line)
            name = m.group(1) if m else None
        if name is None:
            raise RuntimeError("transfer_engine_bench target did not start")
        inits = [subprocess.Popen([binary, "--mode=initiator", *common, f"--segment_id={name}", f"--operation={op}",
                                   f"--block_size={block}", f"--batch_size={BATCH}", "--threads=1",
                                   f"--duration={max(1, round(seconds))}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(n)]
        out = []
        for p in inits:
            _, err = p.communicate(timeout=seconds + 120)
            m = re.search(r"throughput ([\d.]+) GB/s", err)
            if p.returncode or not m:
                raise RuntimeError(f"transfer_engine_bench initiator failed ({p.returncode}): {err[-800:]}")
            out.append(float(m.group(1)))
        return out
    finally:
        stop(target)


def row(pattern: str, engine: str, transport: str, op: str, n: int, block: int, per_peer: list[float],
        threads: int) -> dict[str, Any]:
    return {"pattern": pattern, "engine": engine, "transport": transport, "op": op, "peers": n, "block": block,
            "batch": BATCH, "threads": threads, "GBps": round(sum(per_peer), 3),
            "per_peer_GBps": [round(x, 3) for x in per_peer]}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Scale with peers — {m['host']}, {m['cpus']} CPUs, {m['date']}", "",
             f"`{result['command']}`", "",
             "GB/s summed over peers; `x streams`: against N parallel plain socket streams in the same run; "
             "`slowest/fastest`: the least and most any one peer got.", "",
             "| pattern | op | block | N | engine | transport | threads | GB/s | x streams | slowest / fastest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ceiling = {(r["pattern"], r["op"], r["block"], r["peers"]): r["GBps"] for r in result["rows"]
               if r["engine"] == "socket-streams"}
    for r in result["rows"]:
        c = ceiling.get((r["pattern"], r["op"], r["block"], r["peers"]))
        ratio = f"{r['GBps'] / c:.2f}" if c and r["engine"] != "socket-streams" else ""
        pp = r["per_peer_GBps"]
        spread = f"{min(pp):.2f} / {max(pp):.2f}" if len(pp) > 1 else ""
        lines.append(f"| {r['pattern']} | {r['op']} | {human(r['block'])} × {r['batch']} | {r['peers']} | "
                     f"{r['engine']} | {r['transport']} | {r['threads']} | {r['GBps']:.2f} | {ratio} | {spread} |")
    for note in result.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str:
    """Draw sum GB/s against N, a panel per (pattern, op, block); '' or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    rows = result["rows"]
    panels = sorted({(r["pattern"], r["op"], r["block"]) for r in rows})
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (pattern, op, block) in zip(axes.flat, panels):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if (r["pattern"], r["op"], r["block"]) == (pattern, op, block):
                label = r["engine"] if r["engine"] != "moonlet" else f"moonlet {r['transport']}"
                if pattern == "fan-out" and r["engine"] == "moonlet" and r["threads"] == 1 and r["peers"] > 1:
                    label += " (1 thread)"
                lines.setdefault(label, []).append((r["peers"], r["GBps"]))
        for label, pts in sorted(lines.items()):
            pts.sort()
            style = "k--" if label == "socket-streams" else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{pattern} {op} {human(block)} × {BATCH}", fontsize=9)
        ax.set_xlabel("peers (N)", fontsize=8)
        ax.set_ylabel("GB/s (sum)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = result["machine"]
    fig.suptitle(f"moonlet scale, {m['cpus']} CPUs, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="1,2,4,8,16")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--patterns", default="fan-in,fan-out")
    ap.add_argument("--ops", default="write,read")
    ap.add_argument("--blocks", default="64K,1M")
    ap.add_argument("--transports", default="tcp,shm")
    ap.add_argument("--engines", default="moonlet,socket-streams,mooncake")
    ap.add_argument("--mooncake-bench", help="transfer_engine_bench binary (default: from .bench/mooncake)")
    ap.add_argument("--out", help="write OUT.json, OUT.md, OUT.png (default: print the table only)")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an earlier result")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="moonlet source tree the workers run "
                    "(another checkout's, for before/after runs)")
    args = ap.parse_args()
    use_source(args.src)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        why = plot(result, Path(args.plot).with_suffix(".png"))
        print(why or f"wrote {Path(args.plot).with_suffix('.png')}")
        return 1 if why else 0
    peers = [int(x) for x in args.peers.split(",")]
    blocks = [parse_size(x) for x in args.blocks.split(",")]
    engines = args.engines.split(",")
    cpus = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {
        "machine": {"cpus": cpus, "host": platform.node(), "date": datetime.date.today().isoformat()},
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "rows": [], "notes": []}
    binary, why = (None, "not asked for")
    if "mooncake" in engines:
        binary, why = mooncake_binary(args.mooncake_bench)
        if binary is None:
            result["notes"].append(f"Mooncake rows missing: {why}")
    size = 2 * max(blocks) * BATCH * max(peers)
    targets = Targets(size)

    def add(r: dict) -> None:
        result["rows"].append(r)
        print(f"{r['pattern']:8} {r['op']:5} {human(r['block']):>7} N={r['peers']:<2} {r['engine']:14} "
              f"{r['transport']:4} t={r['threads']:<2} {r['GBps']:7.2f} GB/s  per peer {r['per_peer_GBps']}",
              flush=True)
        if args.out:
            Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")

    try:
        for pattern in args.patterns.split(","):
            for block in blocks:
                for op in args.ops.split(","):
                    for n in peers:
                        if "socket-streams" in engines:
                            add(row(pattern, "socket-streams", "tcp", op, n, block,
                                    streams(n, op, block, args.duration), n))
                        if "moonlet" in engines:
                            for t in args.transports.split(","):
                                if pattern == "fan-in":
                                    add(row(pattern, "moonlet", t, op, n, block,
                                            moonlet_fan_in(targets, t, n, op, block, args.duration), 1))
                                else:
                                    add(row(pattern, "moonlet", t, op, n, block, moonlet_fan_out(
                                        targets, t, n, op, block, args.duration, "per-peer"), n))
                                    if n > 1:
                                        add(row(pattern, "moonlet", t, op, n, block, moonlet_fan_out(
                                            targets, t, n, op, block, args.duration, "one"), 1))
                        if binary and pattern == "fan-in":
                            add(row(pattern, "mooncake", "tcp", op, n, block,
                                    mooncake_fan_in(binary, n, op, block, args.duration, size), 1))
    finally:
        targets.close()
    print(markdown(result))
    if args.out:
        Path(args.out + ".md").write_text(markdown(result))
        why = plot(result, Path(args.out + ".png"))
        if why:
            print(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
