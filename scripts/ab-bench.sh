#!/usr/bin/env bash
# A/B of the loopback benchmarks between an older moonlet source tree and this checkout, interleaved in
# rounds so that a machine's drift touches both sides alike:
#   scripts/ab-bench.sh OLD_SRC [ROUNDS]      (OLD_SRC: a copy of an older checkout's src/)
# Writes ${OUT:-docs/results}/ab-<tag>-{old,new}-{tcp,same-host}-<round>.json (tag: $TAG, else the date) and
# prints each run's table.
set -uo pipefail
cd "$(dirname "$0")/.."
old=$(readlink -f "$1"); rounds=${2:-2}
out="${OUT:-docs/results}"; mkdir -p "$out"; day=${TAG:-$(date +%Y-%m-%d)}
export PYTHONUNBUFFERED=1
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    src=$PWD/src; [ "$side" = old ] && src=$old
    echo "=== round $r: $side ($src)"
    PYTHONPATH=$src python3 benchmarks/tcp_vs_baselines.py --runs 1 --duration 2 --no-mooncake \
      --json "$out/ab-$day-$side-tcp-$r.json" 2>&1 | tail -12
    PYTHONPATH=$src python3 benchmarks/same_host.py --runs 1 --duration 2 \
      --json "$out/ab-$day-$side-same-host-$r.json" 2>&1 | tail -12
  done
done
