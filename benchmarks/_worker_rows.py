"""The row loop shared by the peer-engine workers (standard library only: it runs in the peers' venvs).

``run_row`` starts ``threads`` threads, each calling ``transfer(thread)`` (one batch,
returning None or an error) until ``seconds`` have passed, and prints one JSON result.
"""

import json
import threading
import time


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
