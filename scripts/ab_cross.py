"""Lone 64 KiB TCP requests for every pairing of an old and a new moonlet as initiator and as target (three
interleaved rounds), to tell which side a difference comes from.

    OUT=DIR python scripts/ab_cross.py      (trees in .bench/old-src and .bench/new-src: copies of two checkouts' src/)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = [sys.executable, "-m", "moonlet.cli.main", "bench", "--protocol", "tcp", "--buffer-size", "64M"]


def tree(side: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{os.getcwd()}/.bench/{side}-src", PYTHONUNBUFFERED="1")


def main() -> None:
    out = os.environ["OUT"]
    res: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for rnd in range(3):
        for tside in ("old", "new"):
            tgt = subprocess.Popen([*BENCH, "--mode", "target"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, env=tree(tside))
            assert tgt.stdout is not None
            name = next(line.split()[1] for line in tgt.stdout if line.startswith("MOONLET-TARGET-READY"))
            try:
                for iside in ("old", "new"):
                    for op in ("write", "read"):
                        path = f"{out}/x-{iside}-{tside}-{op}-{rnd}.json"
                        subprocess.run([*BENCH, "--mode", "initiator", "--target", name, "--op", op, "--block-size",
                                        "64K", "--batch-size", "1", "--duration", "2", "--json", path],
                                       env=tree(iside), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       timeout=60, check=True)
                        with open(path) as f:
                            row = json.load(f)[0]
                        res.setdefault((iside, tside, op), []).append((round(row["req_per_s"]), row["p50_us"]))
            finally:
                tgt.terminate()
                tgt.wait(10)
    for (iside, tside, op), runs in sorted(res.items()):
        print(f"initiator={iside} target={tside} {op} req/s {sorted(r[0] for r in runs)} "
              f"p50 {sorted(r[1] for r in runs)}")


if __name__ == "__main__":
    main()
