"""Runs one side of a NIXL (UCX backend) benchmark between two processes.

Executed with the Python of a virtualenv that has ``nixl-cu12``; ``compare.py``
starts it. Target: prints ``READY <metadata hex> <buffer address>`` and waits
for stdin to close. Initiator: runs the rows given as JSON and prints one JSON
result per row. Set ``UCX_TLS=tcp`` in the environment to force TCP.
Nothing of moonlet is imported here.
"""

import ctypes
import json
import mmap
import sys
import threading
import time


def agent(name):
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl._api import nixl_agent, nixl_agent_config
    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def main():
    role, size = sys.argv[1], int(sys.argv[2])
    mem = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    a = agent(role)
    a.register_memory([(addr, size, 0, "")], "DRAM")
    if role == "target":
        print(f"READY {a.get_agent_metadata().hex()} {addr}", flush=True)
        sys.stdin.read()
        return
    remote_name = a.add_remote_agent(bytes.fromhex(sys.argv[3]))
    remote = int(sys.argv[4])
    rows = json.loads(sys.argv[5])
    for op, block, batch, threads, duration in rows:
        stride = block * 2
        counts, lats, fails = [0] * threads, [], []

        def work(t):
            base = t * stride * batch
            local = a.get_xfer_descs([(addr + base + j * stride, block, 0) for j in range(batch)], "DRAM")
            far = a.get_xfer_descs([(remote + base + j * stride, block, 0) for j in range(batch)], "DRAM")
            handle = a.initialize_xfer(op.upper(), local, far, remote_name)
            end = time.perf_counter() + duration
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                state = a.transfer(handle)
                give_up = t0 + 10.0  # a transfer that does not finish is reported, not waited on forever
                while state == "PROC" and time.perf_counter() < give_up:
                    state = a.check_xfer_state(handle)
                lats.append(time.perf_counter() - t0)
                if state != "DONE":
                    fails.append(state)
                    break
                counts[t] += batch
            a.release_xfer_handle(handle)

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
