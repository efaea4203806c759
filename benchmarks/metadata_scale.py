"""Metadata at cluster scale: 1,000 descriptors published and resolved on each backend, on loopback.

    python benchmarks/metadata_scale.py [--count 1000]

Starts its own HTTP metadata server, etcd and Redis (Debian's etcd-server and
redis-server) on free loopback ports. Each descriptor is a real one (an engine
with one registered buffer), renamed per entry and published by its own client
as each engine would (publish latency includes Redis's connection set-up and
etcd's lease grant); resolves go through one client. Also prints the size of the descriptor of an
engine with 1,000 registered buffers.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import sys
import tempfile
import time

from moonlet import MetadataServer, TransferEngine
from moonlet.metadata import connect

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from stores import Store  # noqa: E402  (the test helpers that start real servers)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(url: str, count: int, descriptor: bytes) -> dict:
    """Publish ``count`` descriptors, one client each as ``count`` engines would (etcd: a lease each;
    Redis: a connection each), then resolve them all through one client."""
    pub, res = [], []
    engines = []
    for i in range(count):
        client = connect(url, 5.0, 60.0)
        t0 = time.perf_counter()
        client.publish(f"engine-{i}", descriptor)
        pub.append(time.perf_counter() - t0)
        engines.append(client)
    backend = connect(url, 5.0, 60.0)
    for i in range(count):
        t0 = time.perf_counter()
        assert backend.fetch(f"engine-{i}") == descriptor
        res.append(time.perf_counter() - t0)
    backend.close()
    for client in engines:
        client.close()
    return {"publish_p50_ms": percentile(pub, 0.5) * 1e3, "publish_p99_ms": percentile(pub, 0.99) * 1e3,
            "resolve_p50_ms": percentile(res, 0.5) * 1e3, "resolve_p99_ms": percentile(res, 0.99) * 1e3,
            "total_s": sum(pub) + sum(res)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    args = ap.parse_args()
    with TransferEngine() as eng:
        eng.register(bytearray(4096))
        one = eng.descriptor().to_json()
        mem = mmap.mmap(-1, 1000 * 8192)
        base = memoryview(mem)
        for i in range(1000):
            eng.register(base[i * 8192:i * 8192 + 4096])
        big = len(eng.descriptor().to_json())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, MetadataServer(port=0) as http:
        rows["http (moonlet metadata-server)"] = measure(http.url, args.count, one)
        for kind in ("etcd", "redis"):
            srv = Store(kind, tmp).start()
            try:
                rows[kind] = measure(srv.url, args.count, one)
            finally:
                srv.stop()
    print(f"# {platform.node()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {args.count} descriptors of {len(one)} bytes each")
    print("| backend | publish p50 ms | publish p99 ms | resolve p50 ms | resolve p99 ms |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['publish_p50_ms']:.2f} | {r['publish_p99_ms']:.2f} | {r['resolve_p50_ms']:.2f} | "
              f"{r['resolve_p99_ms']:.2f} |")
    print(f"\nDescriptor of an engine with 1,000 registered buffers: {big:,} bytes "
          f"({big / 1000:.0f} bytes a buffer).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
