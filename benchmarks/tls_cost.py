"""What TLS and the cluster secret cost: `moonlet bench` over TCP loopback, plain vs secret vs secret + TLS.

    python benchmarks/tls_cost.py [--runs 3] [--duration 2]

Rows are interleaved per run, so machine drift hits every variant alike; medians are
reported with the ratio to the plain run of the same row. Certificates are made
with the openssl CLI in a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _moonlet_bench import bench_row

ROOT = Path(__file__).resolve().parent.parent
ROWS = (("write", "4K", 32), ("write", "64K", 32), ("write", "1M", 32), ("read", "1M", 32))


def certs(d: str) -> str:
    def run(*a: str) -> None:
        subprocess.run(a, check=True, capture_output=True, cwd=d)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=bench-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bench", "-keyout", "e.key", "-out", "e.csr")
    run("openssl", "x509", "-req", "-in", "e.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-out", "e.pem")
    return ",".join(os.path.join(d, f) for f in ("e.pem", "e.key", "ca.pem"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / f"tls-{datetime.date.today()}.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        secret = os.path.join(d, "secret")
        Path(secret).write_text("benchmark cluster secret, 32 b.\n")
        variants = {"plain": [], "secret": ["--secret-file", secret],
                    "secret + TLS": ["--secret-file", secret, "--tls", certs(d)]}
        results = {(row, v): [] for row in ROWS for v in variants}
        for _ in range(args.runs):
            for row in ROWS:
                for v, extra in variants.items():
                    results[(row, v)].append(bench_row("tcp", *row, args.duration, *extra)["gbps"])
    lines = [f"# TLS and secret cost, TCP loopback ({datetime.date.today()})", "",
             f"Command: `python benchmarks/tls_cost.py --runs {args.runs} --duration {args.duration}`; "
             "GB/s, median of the runs, ratio to plain in the same run.", "",
             "| op | block x batch | " + " | ".join(variants) + " | " + " | ".join(f"{v} / plain" for v in variants
                                                                           if v != "plain") + " |",
             "|" + " --- |" * (2 + 2 * len(variants) - 1)]
    for row in ROWS:
        med = {v: statistics.median(results[(row, v)]) for v in variants}
        lines.append(f"| {row[0]} | {row[1]} x {row[2]} | " + " | ".join(f"{med[v]:.3f}" for v in variants) + " | "
                     + " | ".join(f"{med[v] / med['plain']:.2f}" for v in variants if v != "plain") + " |")
    lines += ["", "Runs (GB/s): " + "; ".join(f"{r[0]} {r[1]} {v}: {results[(r, v)]}" for r in ROWS for v in variants)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
