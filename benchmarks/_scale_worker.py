"""One process of ``benchmarks/scale.py``: a moonlet target or initiator, or one end of a plain socket stream.

    python _scale_worker.py target PROTOCOL BYTES
        registers BYTES of ordinary memory, prints ``READY <segment name> <address>``, serves until stdin closes
    python _scale_worker.py initiator PROTOCOL OP BLOCK BATCH SECONDS THREADS NAME@ADDR [NAME@ADDR ...]
        one submitting thread per target (THREADS "per-peer") or one for all ("one"); warms every target up,
        prints ``READY``, starts on a ``GO`` line, prints ``{"bytes": [per target], "seconds": s}``
    python _scale_worker.py stream-server OP CHUNK
        accepts one connection on a free port (printed as ``READY <port>``): receives (OP write) or sends (read)
    python _scale_worker.py stream-client OP CHUNK SECONDS PORT
        the other end, timed like an initiator (``READY``, ``GO``, then the same JSON with one entry); both
        move CHUNK bytes per sendall / recv_into

Every process waits for its coordinator's ``GO`` after it is ready, so the N peers of a row move bytes over
the same seconds. Blocks are scattered (a block-sized gap after each) as in ``moonlet bench``.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import sys
import threading
import time

SOCKET_BUFFER = 4 << 20  # as moonlet's default EngineConfig.socket_buffer


def _memory(size: int) -> mmap.mmap:
    mem = mmap.mmap(-1, size)
    for off in range(0, size, 1 << 24):  # random bytes, every page touched before the clock runs
        chunk = min(1 << 24, size - off)
        mem[off:off + chunk] = os.urandom(min(chunk, 1 << 16)) * (chunk // min(chunk, 1 << 16))
    return mem


def _ready_then_go(line: str) -> None:
    print(line, flush=True)
    if sys.stdin.readline().strip() != "GO":
        raise SystemExit("no GO from the coordinator")


def _engine(protocol: str):
    from moonlet import EngineConfig, TransferEngine

    return TransferEngine(config=EngineConfig.from_env(transports=(protocol,)))  # MOONLET_* settings apply


def target(protocol: str, size: int) -> None:
    eng = _engine(protocol)
    mem = _memory(size)
    buf = eng.register(mem)
    print(f"READY {eng.name} {buf.addr}", flush=True)
    sys.stdin.read()
    eng.close()


def initiator(protocol: str, op: str, block: int, batch: int, seconds: float, threads: str,
              targets: list[str]) -> None:
    from moonlet import Op

    eng = _engine(protocol)
    span = 2 * block * batch
    mem = _memory(span * len(targets))
    local = eng.register(mem)
    kind = Op.WRITE if op == "write" else Op.READ
    jobs = []  # per target: (name, local addrs, remote addrs, lengths)
    for i, spec in enumerate(targets):
        name, addr = spec.rsplit("@", 1)
        remote = int(addr)
        jobs.append((name, [local.addr + i * span + j * 2 * block for j in range(batch)],
                     [remote + j * 2 * block for j in range(batch)], [block] * batch))
    for job in jobs:  # connect and warm up every peer before the clock runs
        eng.submit_many(kind, *job).check()
    moved = [0] * len(jobs)
    per_batch = block * batch

    def one(i: int, end: float) -> None:
        job = jobs[i]
        while time.perf_counter() < end:
            eng.submit_many(kind, *job).check()
            moved[i] += per_batch

    def all_of_them(end: float) -> None:
        while time.perf_counter() < end:
            pending = [eng.submit_many(kind, *job) for job in jobs]
            for i, b in enumerate(pending):
                b.check()
                moved[i] += per_batch

    _ready_then_go("READY")
    t0 = time.perf_counter()
    end = t0 + seconds
    if threads == "one":
        all_of_them(end)
    else:
        ths = [threading.Thread(target=one, args=(i, end)) for i in range(len(jobs))]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    print(json.dumps({"bytes": moved, "seconds": time.perf_counter() - t0}), flush=True)
    eng.close()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def stream_server(op: str, block: int) -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"READY {lsock.getsockname()[1]}", flush=True)
    conn, _ = lsock.accept()
    _tune(conn)
    buf = memoryview(_memory(block))
    try:
        if op == "write":  # the client sends: receive until it closes
            while conn.recv_into(buf):
                pass
        else:
            while True:
                conn.sendall(buf)
    except (BrokenPipeError, ConnectionResetError):
        pass


def stream_client(op: str, block: int, seconds: float, port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    _tune(sock)
    buf = memoryview(_memory(block))
    _ready_then_go("READY")
    moved = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if op == "write":
            sock.sendall(buf)
            moved += block
        else:
            n = sock.recv_into(buf)
            if not n:
                break
            moved += n
    elapsed = time.perf_counter() - t0
    sock.close()
    print(json.dumps({"bytes": [moved], "seconds": elapsed}), flush=True)


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "target":
        target(argv[1], int(argv[2]))
    elif role == "initiator":
        initiator(argv[1], argv[2], int(argv[3]), int(argv[4]), float(argv[5]), argv[6], argv[7:])
    elif role == "stream-server":
        stream_server(argv[1], int(argv[2]))
    elif role == "stream-client":
        stream_client(argv[1], int(argv[2]), float(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
