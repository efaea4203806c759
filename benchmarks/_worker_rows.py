"""The row loop shared by the peer-engine workers (standard library only: it runs in the peers' venvs).

``run_row`` starts ``threads`` threads, each calling ``transfer(thread)`` (one batch,
returning None or an error) until ``seconds`` have passed, and prints one JSON result.
"""

import json
import mmap
import os
import threading
import time


def memory(role, size):
    """This side's benchmark memory: ``(address, keep-alive, GPU ordinal or None)``.

    Host memory (mmap) unless ``MOONLET_PEER_VRAM="INITIATOR_GPU,TARGET_GPU"`` is set, then GPU
    memory from torch on this role's GPU.
    """
    vram = os.environ.get("MOONLET_PEER_VRAM")
    if vram:
        import torch

        ordinal = int(vram.split(",")[0 if role == "initiator" else 1])
        t = torch.empty(size, dtype=torch.uint8, device=f"cuda:{ordinal}")
        return t.data_ptr(), t, ordinal
    import ctypes

    mem = mmap.mmap(-1, size)
    return ctypes.addressof(ctypes.c_char.from_buffer(mem)), mem, None


def run_row(op, block, batch, threads, seconds, transfer):
    counts, lats, fails = [0] * threads, [], []

    def work(t):
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            error = transfer(t)
            lats.append(time.perf_counter() - t0)
            if error is not None:
                fails.append(error)
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
                      "p99_us": lats[int(len(lats) * 0.99)] * 1e6 if lats else 0, "error": fails[:1]}), flush=True)
