"""Registering many buffers with a metadata store: one by one (a descriptor published per buffer, each longer
than the last) against ``TransferEngine.register_many`` (one descriptor for all).

    python benchmarks/register_many.py [--counts 500,2000] [--json FILE]

Starts moonlet's HTTP metadata server in this process and, for each count, registers that many 64-byte
buffers with a fresh engine each way. Prints seconds per way and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from moonlet import EngineConfig, MetadataServer, TransferEngine  # noqa: E402


def seconds(url: str, count: int, many: bool) -> float:
    name = f"register-{'many' if many else 'each'}-{count}"
    with TransferEngine(name, url, config=EngineConfig(transports=("tcp",))) as eng:
        areas = [bytearray(os.urandom(64)) for _ in range(count)]
        t0 = time.perf_counter()
        if many:
            eng.register_many(areas)
        else:
            for area in areas:
                eng.register(area)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="500,2000")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    srv = MetadataServer(port=0).start()
    rows = []
    try:
        for count in (int(c) for c in args.counts.split(",")):
            each, many = seconds(srv.url, count, False), seconds(srv.url, count, True)
            rows.append({"buffers": count, "one_by_one_s": each, "register_many_s": many})
            print(f"{count:6d} buffers: one by one {each:8.3f} s, register_many {many:7.3f} s, {each / many:7.1f}x")
    finally:
        srv.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
