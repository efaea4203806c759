#!/usr/bin/env bash
# Lone and batched TCP requests, old vs new moonlet source trees, five interleaved rounds of `moonlet bench`:
#   OUT=DIR scripts/ab-lone.sh      (trees in .bench/old-src and .bench/new-src, copies of two checkouts' src/)
set -uo pipefail
export PYTHONUNBUFFERED=1
for i in 1 2 3 4 5; do
  for side in old new; do
    for row in "write 64K 1" "read 64K 1" "write 4K 32" "read 4K 32"; do
      set -- $row
      PYTHONPATH=$PWD/.bench/$side-src timeout 60 python3 -m moonlet.cli.main bench --protocol tcp --op $1 --block-size $2 --batch-size $3 --duration 2 --json $OUT/lat-$side-$1-$2-$3-$i.json >/dev/null 2>&1 || echo "fail $side $row $i"
    done
  done
done
python3 - <<'PY'
import json, glob, os, statistics
out = os.environ["OUT"]
for row in ["write-64K-1", "read-64K-1", "write-4K-32", "read-4K-32"]:
    for side in ["old", "new"]:
        vals = []
        for f in sorted(glob.glob(f"{out}/lat-{side}-{row}-*.json")):
            d = json.load(open(f)); r = d[0] if isinstance(d, list) else d
            r = r.get("rows", [r])[0] if isinstance(r, dict) and "rows" in r else r
            vals.append((r["req_per_s"], r["p50_us"]))
        print(row, side, "req/s", sorted(round(v[0]) for v in vals), "p50", sorted(v[1] for v in vals))
PY
