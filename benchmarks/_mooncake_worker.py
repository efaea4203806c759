"""Runs one side of a Mooncake Transfer Engine benchmark (TCP, P2PHANDSHAKE).

Executed with the Python of a virtualenv that has ``mooncake-transfer-engine-non-cuda``;
``tcp_vs_baselines.py`` starts it.  Target: prints ``READY host:port`` and waits
for stdin to close.  Initiator: runs the rows given as JSON and prints one JSON
result per row.  Nothing of moonlet is imported here.
"""

import json
import mmap
import sys
import threading
import time


def engine():
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise SystemExit(f"mooncake initialize failed: {rc}")
    return eng


def main():
    role, size = sys.argv[1], int(sys.argv[2])
    eng = engine()
    mem = mmap.mmap(-1, size)
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    if eng.register_memory(addr, size, "cpu:0") != 0:
        raise SystemExit("mooncake register_memory failed")
    if role == "target":
        print(f"READY 127.0.0.1:{eng.get_rpc_port()}", flush=True)
        sys.stdin.read()
        return
    target = sys.argv[3]
    rows = json.loads(sys.argv[4])
    remote = eng.get_first_buffer_address(target)
    for op, block, batch, threads, duration in rows:
        stride = block * 2
        fn = eng.batch_transfer_sync_write if op == "write" else eng.batch_transfer_sync_read
        counts = [0] * threads
        lats = []
        fails = []

        def work(t):
            base = t * stride * batch
            locs = [addr + base + j * stride for j in range(batch)]
            rems = [remote + base + j * stride for j in range(batch)]
            lens = [block] * batch
            end = time.perf_counter() + duration
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                rc = fn(target, locs, rems, lens)
                lats.append(time.perf_counter() - t0)
                if rc != 0:
                    fails.append(rc)
                    return
                counts[t] += batch

        ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        el = time.perf_counter() - t0
        lats.sort()
        n = sum(counts)
        print(json.dumps({"op": op, "block": block, "batch": batch, "threads": threads, "gbps": n * block / el / 1e9,
                          "req_per_s": n / el, "p50_us": lats[len(lats) // 2] * 1e6 if lats else 0,
                          "p99_us": lats[int(len(lats) * 0.99)] * 1e6 if lats else 0, "error": fails[:1]}),
              flush=True)


if __name__ == "__main__":
    main()
