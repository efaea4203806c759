#!/usr/bin/env bash
# benchmarks/scale.py on the 16-CPU GPU machine (no registry there): carry .bench/scale-peers
# (scripts/scale-peers.sh pack) and, for "ab", .bench/head-src (the src tree to compare against).
#
#   OUT=dir scripts/scale-run.sh fan-in|fan-out [DURATION]   one pattern, every row; OUT/scale-<pattern>.{json,md}
#   OUT=dir scripts/scale-run.sh ab [ROUNDS]                 N = 1 fan-in rows, .bench/head-src and src interleaved
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-docs/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
mc=$(mktemp -d)
scripts/scale-peers.sh unpack "$mc"
export LD_LIBRARY_PATH="$mc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
case "$1" in
fan-in|fan-out)
  python3 benchmarks/scale.py --patterns "$1" --duration "${2:-2}" --mooncake-bench "$mc/transfer_engine_bench" \
    --out "$out/scale-$1" > "$out/scale-$1.log" 2>&1
  ;;
ab)
  for r in $(seq "${2:-3}"); do
    for side in head-src src; do
      src=$PWD/src; [ "$side" = head-src ] && src=$PWD/.bench/head-src
      python3 benchmarks/scale.py --patterns fan-in --peers 1 --engines moonlet --transports tcp,shm \
        --duration 2 --src "$src" --out "$out/ab-$side-$r" > "$out/ab-$side-$r.log" 2>&1
    done
  done
  ;;
esac
