"""``moonlet bench``: throughput, requests/s and latency of transfers between two engines.

With no ``--mode`` it starts a target in a subprocess on loopback and runs
the initiator here, so one command measures a real two-process transfer.
Both sides write their memory once before anything is timed (page faults
would otherwise be measured as transfer time), every row is checked against
the buffer size before the first one runs, and each row is printed (and
written to ``--json``) as it finishes.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..batch import Op, Request
from ..config import DEFAULT, ENVIRONMENT, env_name, resolve
from ..engine import NO_SECRET_WARNING, TransferEngine
from ..errors import MoonletError
from ..memory import Buffer

log = logging.getLogger("moonlet.bench")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SWEEP_BLOCKS = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
SWEEP_BATCHES = [1, 8, 32, 128]
DEFAULT_ROWS = [("write", 4 * KiB, 32), ("read", 4 * KiB, 32), ("write", 64 * KiB, 1), ("read", 64 * KiB, 1),
                ("write", 1 * MiB, 32), ("read", 1 * MiB, 32)]
READY = "MOONLET-TARGET-READY"
#: Transports ``--protocol`` may name (the engine's, less "local", which cannot reach another process).
PROTOCOLS = ("auto", "tcp", "rdma", "shm", "cuda_ipc")
ERROR_PREFIX = "moonlet: error: "  # how the command reports a MoonletError on stderr (main.py)
TOUCH_CHUNK = 16 * MiB


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
    p.add_argument("--metadata", default="p2p",
                   help="where segment descriptors live: p2p (default: no server, targets are host:port), "
                        "http://host:port of a metadata server, etcd://host:port[,...][/cluster] or "
                        "redis://[user:pass@]host:port[/db]")
    p.add_argument("--name", help="this engine's segment name (with a metadata server)")
    p.add_argument("--target", help="initiator: segment name of the target (p2p: host:port)")
    p.add_argument("--listen", help="address to listen on (default $MOONLET_LISTEN_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="target: port to listen on (default $MOONLET_PORT, else any free)")
    p.add_argument("--op", choices=["read", "write"], help="operation (default: the standard table)")
    p.add_argument("--block-size", type=parse_size, help="bytes per request, e.g. 4K, 1M")
    p.add_argument("--batch-size", type=int, help="requests per batch")
    p.add_argument("--threads", type=int, default=1, help="initiator threads submitting batches (default 1)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per row (default 2)")
    p.add_argument("--buffer-size", type=parse_size, default=1 * GiB,
                   help="registered bytes per side (default 1G); host memory is written once (pre-touched) "
                        "before the first row is timed, and every row must fit in it")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="transport: auto (any that works), tcp, rdma, shm (same host) or cuda_ipc (same host, "
                        "GPU); default $MOONLET_TRANSPORTS, else auto")
    p.add_argument("--use-vram", action="store_true", help="register GPU memory (needs moonlet[cuda])")
    p.add_argument("--gpu", type=int, default=0, help="with --use-vram: this side's GPU ordinal (default 0)")
    p.add_argument("--target-gpu", type=int, help="with --use-vram and no --mode: the target's GPU (default --gpu)")
    p.add_argument("--shared", action="store_true",
                   help="target memory from engine.allocate(): same-host initiators map it and memcpy")
    p.add_argument("--secret-file",
                   help="file holding the cluster secret (default $MOONLET_SECRET_FILE, else $MOONLET_SECRET)")
    p.add_argument("--tls", metavar="CERT,KEY,CA", help="TLS on every connection: PEM certificate, key and CA")
    p.add_argument("--mooncake-wire", action="store_true",
                   help="also speak Mooncake's wire: Mooncake engines (transfer_engine_bench) can use this target, "
                        "and this initiator can use a Mooncake target")
    p.add_argument("--lanes", type=int, help="connections per peer (default $MOONLET_LANES, else 2)")
    p.add_argument("--spin-us", type=int, help="busy-poll window after traffic, microseconds (default "
                   "$MOONLET_SPIN_US, else 1000; 0: never spin)")
    p.add_argument("--reactors", type=int, help="target: threads serving peers (default $MOONLET_REACTORS, "
                   "else one per CPU, at most 16)")
    p.add_argument("--sweep", action="store_true",
                   help="block sizes 4K..16M x batch sizes 1..128, or one of them with --block-size or "
                        "--batch-size (all of it needs --buffer-size 4G, or 2G with --adjacent)")
    p.add_argument("--adjacent", action="store_true",
                   help="blocks of a batch back to back on both sides (default: scattered, a gap after each)")
    p.add_argument("--verify", action="store_true", help="check the bytes of every row")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE (rewritten after each row)")
    # A target started by this command leaves the no-secret warning to the initiator: one warning per run.
    p.add_argument("--quiet-no-secret", action="store_true", help=argparse.SUPPRESS)


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


def _engine(args: argparse.Namespace, port: int | None = None) -> TransferEngine:
    """An engine configured by the flags given, then ``MOONLET_<FIELD>`` variables, then defaults."""
    explicit: dict[str, Any] = {}
    if args.listen is not None:
        explicit["listen_host"] = args.listen
    if port is not None:
        explicit["port"] = port
    for name in ("lanes", "spin_us", "reactors"):
        if getattr(args, name) is not None:
            explicit[name] = getattr(args, name)
    if args.protocol is not None:
        explicit["transports"] = () if args.protocol == "auto" else (args.protocol,)
    if args.secret_file:
        explicit["secret_file"] = args.secret_file
    if args.mooncake_wire:
        explicit["mooncake_wire"] = True
    if args.tls:
        explicit.update(zip(("tls_cert_file", "tls_key_file", "tls_ca_file"), args.tls.split(",")))
    cfg, sources = resolve(explicit)
    for name, source in sources.items():
        if source != DEFAULT:
            log.debug("config %s=%r (%s)", name, getattr(cfg, name),
                      env_name(name) if source == ENVIRONMENT else "flag")
    eng = TransferEngine(args.name, args.metadata, config=cfg)
    log.info("engine %s: transports %s, %d lane(s) per peer", eng.name, ", ".join(cfg.transports) or "auto",
             cfg.lanes)
    return eng


def _alloc(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def pretouch(buf: Buffer) -> None:
    """Write every page of host buffer ``buf`` once, so that no timed transfer pays for its first fault."""
    t0 = time.perf_counter()
    view = buf.view(buf.addr, buf.length)
    zeros = bytes(min(TOUCH_CHUNK, buf.length))
    for off in range(0, buf.length, len(zeros)):
        end = min(off + len(zeros), buf.length)
        view[off:end] = zeros[:end - off]
    log.info("pre-touched %s of host memory in %.2f s", human(buf.length), time.perf_counter() - t0)


def _memory(eng: TransferEngine, args: argparse.Namespace) -> Buffer:
    """Register this side's benchmark memory, written once: host (mmap), engine.allocate() or GPU (--use-vram,
    whose memory the driver backs at allocation)."""
    if args.use_vram:
        from .. import gpu

        return eng.register(gpu.alloc(args.gpu, args.buffer_size), args.buffer_size)
    buf = eng.allocate(args.buffer_size) if args.shared else eng.register(_alloc(args.buffer_size))
    pretouch(buf)
    return buf


def run_target(args: argparse.Namespace) -> int:
    if args.quiet_no_secret:
        logging.getLogger("moonlet").addFilter(lambda record: record.msg != NO_SECRET_WARNING)
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
    if args.sweep:  # --block-size or --batch-size fix that axis
        blocks = [args.block_size] if args.block_size else SWEEP_BLOCKS
        batches = [args.batch_size] if args.batch_size else SWEEP_BATCHES
        return [(op, bs, n) for op in ops for bs in blocks for n in batches]
    if args.block_size or args.batch_size or args.op:
        return [(op, args.block_size or 64 * KiB, args.batch_size or 1) for op in ops]
    return DEFAULT_ROWS


def row_bytes(block: int, batch: int, threads: int, adjacent: bool) -> int:
    """Bytes of buffer one row uses on each side (scattered blocks leave a block-sized gap after each)."""
    return (block if adjacent else block * 2) * batch * threads


def check_buffer(rows: list[tuple[str, int, int]], threads: int, adjacent: bool, available: int) -> None:
    """:class:`MoonletError` before anything runs when a row needs more than ``available`` bytes per side."""
    needs = [(row_bytes(block, batch, threads, adjacent), op, block, batch) for op, block, batch in rows]
    too_big = [n for n in needs if n[0] > available]
    if too_big:
        need, op, block, batch = max(too_big)
        raise MoonletError(f"buffer too small for {len(too_big)} of {len(rows)} row(s): {op} {human(block)} x "
                           f"{batch} x {threads} thread(s) needs {human(need)} per side, the buffer is "
                           f"{human(available)}; raise --buffer-size to {human(need)}")


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def run_row(eng: TransferEngine, seg, local, remote, op: str, block: int, batch: int, threads: int,
            duration: float, verify: bool, adjacent: bool = False) -> Row:
    """Run one table row: ``threads`` threads each submitting ``batch`` requests of ``block`` bytes."""
    stride = block if adjacent else block * 2  # scattered: never adjacent, so nothing can merge them
    per_thread = stride * batch
    if row_bytes(block, batch, threads, adjacent) > min(local.length, remote.length):
        raise MoonletError(f"buffer too small for {threads} x {batch} x {human(block)}; raise --buffer-size")
    kind = Op.WRITE if op == "write" else Op.READ
    reqs_by_thread = []
    for t in range(threads):
        base = t * per_thread
        reqs_by_thread.append([Request(kind, local.addr + base + j * stride, seg, remote.addr + base + j * stride,
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


TABLE_HEAD = (f"{'op':<6}{'block':>10}{'batch':>7}{'thr':>5}{'GB/s':>9}{'req/s':>12}{'p50 us':>10}{'p99 us':>10}"
              "  transport")


def table_line(r: Row) -> str:
    """One row of the table under :data:`TABLE_HEAD`."""
    v = "" if r.verified is None else ("  verified" if r.verified else "  BYTES DIFFER")
    return (f"{r.op:<6}{human(r.block_size):>10}{r.batch_size:>7}{r.threads:>5}{r.gbps:>9.3f}{r.req_per_s:>12.0f}"
            f"{r.p50_us:>10.0f}{r.p99_us:>10.0f}  {r.transport}{v}")


def _check_flags(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """The rows to run, after the checks that need no engine (so a bad command fails before starting one)."""
    rows_spec = _rows(args)
    if args.threads < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise MoonletError("--threads and --batch-size must be at least 1")
    if args.verify and args.use_vram:
        raise MoonletError("--verify checks bytes in host memory; drop --use-vram or --verify")
    check_buffer(rows_spec, args.threads, args.adjacent, args.buffer_size)
    return rows_spec


def _write_json(path: str, rows: list[Row]) -> None:
    """Replace ``path`` with ``rows`` as JSON at once (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    os.replace(tmp, path)


def run_initiator(args: argparse.Namespace, target: str, port: int | None = None) -> int:
    rows_spec = _check_flags(args)
    with _engine(args, port) as eng:
        local = _memory(eng, argparse.Namespace(**{**vars(args), "shared": False}))
        seg = eng.open_segment(target)
        remote = max(seg.buffers, key=lambda b: b.length, default=None)
        if remote is None:
            raise MoonletError(f"target {target} has no registered buffer")
        check_buffer(rows_spec, args.threads, args.adjacent, min(local.length, remote.length))
        rows: list[Row] = []
        print(f"moonlet bench: initiator {eng.name} -> target {target}, {args.duration:g} s per row, "
              f"{len(rows_spec)} row(s)", file=sys.stderr)
        print(TABLE_HEAD)
        print("-" * len(TABLE_HEAD), flush=True)
        for i, (op, block, batch) in enumerate(rows_spec, 1):
            print(f"  [{i}/{len(rows_spec)}] {op} {human(block)} x {batch} ...", file=sys.stderr, flush=True)
            rows.append(run_row(eng, seg, local, remote, op, block, batch, args.threads, args.duration, args.verify,
                                args.adjacent))
            if args.json:  # the rows so far survive a later row's failure
                _write_json(args.json, rows)
            print(table_line(rows[-1]), flush=True)
        mem_ok = all(r.verified is not False for r in rows)
    return 0 if mem_ok else 1


def run_both(args: argparse.Namespace) -> int:
    _check_flags(args)
    level = logging.getLevelName(logging.getLogger("moonlet").getEffectiveLevel()).lower()
    cmd = [sys.executable, "-m", "moonlet.cli.main", "bench", "--mode", "target", "--metadata", args.metadata,
           "--buffer-size", str(args.buffer_size), "--log-level", level, "--quiet-no-secret",
           "--gpu", str(args.gpu if args.target_gpu is None else args.target_gpu)]
    for flag, value in (("--listen", args.listen), ("--port", args.port), ("--protocol", args.protocol),
                        ("--lanes", args.lanes), ("--spin-us", args.spin_us), ("--reactors", args.reactors),
                        ("--tls", args.tls), ("--secret-file", args.secret_file)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += [flag for flag, on in (("--shared", args.shared), ("--use-vram", args.use_vram),
                                  ("--mooncake-wire", args.mooncake_wire)) if on]
    if args.metadata != "p2p":
        cmd += ["--name", f"bench-target-{os.getpid()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        name = _await_ready(proc, timeout=30.0)
        if args.metadata != "p2p" and not args.name:
            args.name = f"bench-initiator-{os.getpid()}"
        return run_initiator(args, name, port=0)  # not $MOONLET_PORT: the target may hold it
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _relay_stderr(proc: subprocess.Popen[str], errors: list[str]) -> threading.Thread:
    """Copy the target's stderr to ours as it comes, except its final error, kept in ``errors`` for the
    initiator to report (as the one error of the command)."""
    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(ERROR_PREFIX):
                errors.append(line[len(ERROR_PREFIX):].strip())
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    th = threading.Thread(target=relay, name="moonlet-bench-target-stderr", daemon=True)
    th.start()
    return th


def _await_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    """The target's segment name once it says it is ready; :class:`MoonletError` with the target's own error
    when it exits first, or when ``timeout`` seconds pass."""
    result: list[str] = []
    errors: list[str] = []
    relay = _relay_stderr(proc, errors)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY):
                result.append(line.split()[1])
                return

    th = threading.Thread(target=read, daemon=True)
    th.start()
    th.join(timeout)
    if result:
        return result[0]
    if th.is_alive():
        raise MoonletError(f"bench target did not start within {timeout:g} s")
    try:  # its stdout ended: it exited, or is about to
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        raise MoonletError("bench target closed its output without starting") from None
    relay.join(5)
    raise MoonletError(errors[-1] if errors else f"bench target exited with code {code} before it was ready")


def main(args: argparse.Namespace) -> int:
    """``moonlet bench``: one side (``--mode``) or both, the target in a child process."""
    if args.mode == "target":
        return run_target(args)
    if args.mode == "initiator":
        if not args.target:
            raise MoonletError("--mode initiator needs --target NAME")
        return run_initiator(args, args.target)
    return run_both(args)

