"""``moonlet bench``: throughput, requests/s and latency of transfers between two engines.

With no ``--mode`` it starts a target in a subprocess on loopback and runs
the initiator here, so one command measures a real two-process transfer.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

from ..batch import Op, Request
from ..config import EngineConfig
from ..engine import TransferEngine
from ..errors import MoonletError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SWEEP_BLOCKS = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
SWEEP_BATCHES = [1, 8, 32, 128]
DEFAULT_ROWS = [("write", 4 * KiB, 32), ("read", 4 * KiB, 32), ("write", 64 * KiB, 1), ("read", 64 * KiB, 1),
                ("write", 1 * MiB, 32), ("read", 1 * MiB, 32)]
READY = "MOONLET-TARGET-READY"


def parse_size(text: str) -> int:
    """``"4K"``, ``"1MiB"``, ``"16m"``, ``"4096"`` -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": KiB, "m": MiB, "g": GiB}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 1M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["target", "initiator"], help="run one side only (default: both, loopback)")
    p.add_argument("--metadata", default="p2p", help="p2p (default) or http://host:port of a metadata server")
    p.add_argument("--name", help="this engine's segment name (with a metadata server)")
    p.add_argument("--target", help="initiator: segment name of the target (p2p: host:port)")
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="target: port to listen on (default: any free)")
    p.add_argument("--op", choices=["read", "write"], help="operation (default: the standard table)")
    p.add_argument("--block-size", type=parse_size, help="bytes per request, e.g. 4K, 1M")
    p.add_argument("--batch-size", type=int, help="requests per batch")
    p.add_argument("--threads", type=int, default=1, help="initiator threads submitting batches (default 1)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per row (default 2)")
    p.add_argument("--buffer-size", type=parse_size, default=1 * GiB, help="registered bytes per side (default 1G)")
    p.add_argument("--protocol", default="auto", help="transport: auto (default), tcp, rdma or shm (same host)")
    p.add_argument("--use-vram", action="store_true", help="register GPU memory (needs moonlet[cuda])")
    p.add_argument("--gpu", type=int, default=0, help="with --use-vram: this side's GPU ordinal (default 0)")
    p.add_argument("--target-gpu", type=int, help="with --use-vram and no --mode: the target's GPU (default --gpu)")
    p.add_argument("--shared", action="store_true",
                   help="target memory from engine.allocate(): same-host initiators map it and memcpy")
    p.add_argument("--secret-file", help="file holding the cluster secret (default: $MOONLET_SECRET, if set)")
    p.add_argument("--tls", metavar="CERT,KEY,CA", help="TLS on every connection: PEM certificate, key and CA")
    p.add_argument("--mooncake-wire", action="store_true",
                   help="also speak Mooncake's wire: Mooncake engines (transfer_engine_bench) can use this target, "
                        "and this initiator can use a Mooncake target")
    p.add_argument("--lanes", type=int, default=EngineConfig.lanes, help="connections per peer")
    p.add_argument("--sweep", action="store_true", help="block sizes 4K..16M x batch sizes 1..128")
    p.add_argument("--adjacent", action="store_true",
                   help="blocks of a batch back to back on both sides (default: scattered, a gap after each)")
    p.add_argument("--verify", action="store_true", help="check the bytes of every row")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")


@dataclass
class Row:
    op: str
    block_size: int
    batch_size: int
    threads: int
    seconds: float
    requests: int
    gbps: float
    req_per_s: float
    p50_us: float
    p99_us: float
    transport: str
    verified: bool | None


def _engine(args: argparse.Namespace, port: int = 0) -> TransferEngine:
    transports = () if args.protocol == "auto" else (args.protocol,)
    tls = dict(zip(("tls_cert_file", "tls_key_file", "tls_ca_file"), args.tls.split(","))) if args.tls else {}
    cfg = EngineConfig(listen_host=args.listen, port=port, lanes=args.lanes, transports=transports,
                       secret_file=args.secret_file, mooncake_wire=args.mooncake_wire, **tls)
    return TransferEngine(args.name, args.metadata, config=cfg)


def _alloc(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def _memory(eng: TransferEngine, args: argparse.Namespace):
    """Register this side's benchmark memory: host (mmap), engine.allocate() or GPU (--use-vram)."""
    if args.use_vram:
        from .. import gpu

        return eng.register(gpu.alloc(args.gpu, args.buffer_size), args.buffer_size)
    if args.shared:
        return eng.allocate(args.buffer_size)
    return eng.register(_alloc(args.buffer_size))


def run_target(args: argparse.Namespace) -> int:
    eng = _engine(args, args.port)
    _memory(eng, args)
    print(f"{READY} {eng.name}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    eng.close()
    return 0


def _rows(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    ops = [args.op] if args.op else ["write", "read"]
    if args.sweep:
        return [(op, bs, n) for op in ops for bs in SWEEP_BLOCKS for n in SWEEP_BATCHES]
    if args.block_size or args.batch_size or args.op:
        return [(op, args.block_size or 64 * KiB, args.batch_size or 1) for op in ops]
    return DEFAULT_ROWS


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def run_row(eng: TransferEngine, seg, local, remote, op: str, block: int, batch: int, threads: int,
            duration: float, verify: bool, adjacent: bool = False) -> Row:
    """Run one table row: ``threads`` threads each submitting ``batch`` requests of ``block`` bytes."""
    stride = block if adjacent else block * 2  # scattered: never adjacent, so nothing can merge them
    per_thread = stride * batch
    if per_thread * threads > min(local.length, remote["length"]):
        raise MoonletError(f"buffer too small for {threads} x {batch} x {human(block)}; raise --buffer-size")
    kind = Op.WRITE if op == "write" else Op.READ
    reqs_by_thread = []
    for t in range(threads):
        base = t * per_thread
        reqs_by_thread.append([Request(kind, local.addr + base + j * stride, seg, remote["addr"] + base + j * stride,
                                       block) for j in range(batch)])
    verified = None
    if verify:
        # Known random bytes in the remote ranges (and local, for writes); reads compare against them.
        lview = local.view(local.addr, local.length)
        for reqs in reqs_by_thread:
            for r in reqs:
                off = r.local_addr - local.addr
                lview[off:off + block] = os.urandom(block)
            eng.submit([r._replace(op=Op.WRITE) for r in reqs]).check()
        expected = {r.local_addr: bytes(lview[r.local_addr - local.addr:r.local_addr - local.addr + block])
                    for reqs in reqs_by_thread for r in reqs}
        if kind == Op.READ:
            for a in expected:  # scribble so a read that moved nothing is caught
                lview[a - local.addr:a - local.addr + block] = bytes(block)
        verified = True
    lat: list[list[float]] = [[] for _ in range(threads)]
    counts = [0] * threads
    errors: list[str] = []
    start_evt = threading.Event()
    stop_at = [0.0]

    def worker(t: int) -> None:
        reqs = reqs_by_thread[t]
        las, ras, lens = [r.local_addr for r in reqs], [r.remote_addr for r in reqs], [r.length for r in reqs]
        mine = lat[t]
        start_evt.wait()
        end = stop_at[0]
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            statuses = eng.submit_many(kind, seg, las, ras, lens).wait()
            mine.append(time.perf_counter() - t0)
            bad = [s for s in statuses if not s.ok]
            if bad:
                errors.append(f"{bad[0].state.name}: {bad[0].reason}")
                return
            counts[t] += len(reqs)

    ths = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in ths:
        th.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    start_evt.set()
    for th in ths:
        th.join(duration + eng.config.request_timeout + 5)
    elapsed = time.perf_counter() - t0
    if errors:
        raise MoonletError(f"{op} {human(block)} x {batch}: {errors[0]}")
    if verify:
        lview = local.view(local.addr, local.length)
        if kind == Op.WRITE:  # read the target's copy back and compare
            for reqs in reqs_by_thread:
                for r in reqs:
                    lview[r.local_addr - local.addr:r.local_addr - local.addr + block] = bytes(block)
                eng.submit([r._replace(op=Op.READ) for r in reqs]).check()
        verified = all(bytes(lview[a - local.addr:a - local.addr + block]) == data for a, data in expected.items())
    total = sum(counts)
    flat = sorted(x for xs in lat for x in xs)
    transport = eng.submit(reqs_by_thread[0][:1]).wait()[0].transport
    return Row(op, block, batch, threads, round(elapsed, 3), total, round(total * block / elapsed / 1e9, 3),
               round(total / elapsed, 1), round(_percentile(flat, 0.5) * 1e6, 1),
               round(_percentile(flat, 0.99) * 1e6, 1), transport, verified)


def print_table(rows: list[Row], out=sys.stdout) -> None:
    head = f"{'op':<6}{'block':>10}{'batch':>7}{'thr':>5}{'GB/s':>9}{'req/s':>12}{'p50 us':>10}{'p99 us':>10}  transport"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        v = "" if r.verified is None else ("  verified" if r.verified else "  BYTES DIFFER")
        print(f"{r.op:<6}{human(r.block_size):>10}{r.batch_size:>7}{r.threads:>5}{r.gbps:>9.3f}{r.req_per_s:>12.0f}"
              f"{r.p50_us:>10.0f}{r.p99_us:>10.0f}  {r.transport}{v}", file=out)


def run_initiator(args: argparse.Namespace, target: str) -> int:
    rows_spec = _rows(args)
    if args.threads < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise MoonletError("--threads and --batch-size must be at least 1")
    if args.verify and args.use_vram:
        raise MoonletError("--verify checks bytes in host memory; drop --use-vram or --verify")
    with _engine(args) as eng:
        local = _memory(eng, argparse.Namespace(**{**vars(args), "shared": False}))
        seg = eng.open_segment(target)
        remote = max(seg.buffers, key=lambda b: b["length"], default=None)
        if remote is None:
            raise MoonletError(f"target {target} has no registered buffer")
        rows: list[Row] = []
        print(f"moonlet bench: initiator {eng.name} -> target {target}, {args.duration:g} s per row, "
              f"{len(rows_spec)} row(s)", file=sys.stderr)
        for i, (op, block, batch) in enumerate(rows_spec, 1):
            print(f"  [{i}/{len(rows_spec)}] {op} {human(block)} x {batch} ...", file=sys.stderr, flush=True)
            rows.append(run_row(eng, seg, local, remote, op, block, batch, args.threads, args.duration, args.verify,
                                args.adjacent))
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in rows], f, indent=1)
        mem_ok = all(r.verified is not False for r in rows)
    return 0 if mem_ok else 1


def run_both(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target", "--metadata", args.metadata,
           "--listen", args.listen, "--buffer-size", str(args.buffer_size), "--protocol", args.protocol,
           "--lanes", str(args.lanes), "--gpu", str(args.gpu if args.target_gpu is None else args.target_gpu)] + (["--shared"] if args.shared else []) \
        + (["--use-vram"] if args.use_vram else []) + (["--tls", args.tls] if args.tls else []) \
        + (["--secret-file", args.secret_file] if args.secret_file else []) \
        + (["--mooncake-wire"] if args.mooncake_wire else [])
    if args.metadata != "p2p":
        cmd += ["--name", f"bench-target-{os.getpid()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        name = _await_ready(proc, timeout=30.0)
        if args.metadata != "p2p" and not args.name:
            args.name = f"bench-initiator-{os.getpid()}"
        return run_initiator(args, name)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _await_ready(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(READY):
                result.append(line.split()[1])
                return

    th = threading.Thread(target=read, daemon=True)
    th.start()
    th.join(timeout)
    if not result:
        raise MoonletError(f"bench target did not start within {timeout:g} s (exit code {proc.poll()})")
    return result[0]


def main(args: argparse.Namespace) -> int:
    if args.mode == "target":
        return run_target(args)
    if args.mode == "initiator":
        if not args.target:
            raise MoonletError("--mode initiator needs --target NAME")
        return run_initiator(args, args.target)
    return run_both(args)

