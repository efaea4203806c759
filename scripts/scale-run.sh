#!/usr/bin/env bash
# benchmarks/scale.py on the 16-CPU GPU machine (no registry there): carry .bench/scale-peers
# (scripts/scale-peers.sh pack) and, for "ab", .bench/head-src (the src tree to compare against).
#
#   OUT=dir scripts/scale-run.sh fan-in|fan-out [DURATION [SCALE_ARGS...]]
#                                       one pattern, every row (or those SCALE_ARGS pick); OUT/scale-<pattern>.{json,md}
#   OUT=dir scripts/scale-run.sh ab [ROUNDS [OLD_SRC [SCALE_ARGS...]]]
#                                       OLD_SRC (.bench/head-src) and src interleaved, ROUNDS (3) times: the N = 1
#                                       fan-in rows, or those SCALE_ARGS pick; OUT/ab-{old,src}-<round>.{json,md,log}
#   OUT=dir scripts/scale-run.sh rep [ROUNDS [DURATION]]
#                                       the bar rows (TCP writes, N = 4 and 8, 64 KiB and 1 MiB, fan-in with the
#                                       streams and Mooncake, fan-out with the streams) ROUNDS (3) times:
#                                       OUT/rep-<round>.{json,md,log}
#   OUT=dir scripts/scale-run.sh profile [N]   where the target's time goes at fan-in N (8), TCP 64 KiB x 32 writes:
#                                       py-spy (carry .bench/py-spy) samples the target's threads for 8 s, those
#                                       holding the GIL (OUT/profile-gil.txt) and all (OUT/profile-all.txt),
#                                       collapsed stacks
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
    --out "$out/scale-$1" "${@:3}" > "$out/scale-$1.log" 2>&1
  ;;
rep)
  for r in $(seq "${2:-3}"); do
    python3 benchmarks/scale.py --patterns fan-in,fan-out --peers 4,8 --ops write --blocks 64K,1M --transports tcp \
      --duration "${3:-1.5}" --mooncake-bench "$mc/transfer_engine_bench" --out "$out/rep-$r" > "$out/rep-$r.log" 2>&1
  done
  ;;
profile)
  python3 benchmarks/scale.py --patterns fan-in --peers "${2:-8}" --engines moonlet --transports tcp --ops write \
    --blocks 64K --duration 20 --out "$out/profile" > "$out/profile.log" 2>&1 &
  sleep 8
  pid=$(pgrep -f "_scale_worker.py target" | head -1)
  [ -n "$pid" ] || { echo "no target process to sample (see $out/profile.log)" >&2; wait; exit 1; }
  .bench/py-spy record --nonblocking --gil --threads -r 250 -d 8 -f raw -o "$out/profile-gil.txt" -p "$pid" \
    > "$out/profile-py-spy.log" 2>&1 &
  .bench/py-spy record --nonblocking --idle --threads -r 250 -d 8 -f raw -o "$out/profile-all.txt" -p "$pid" \
    >> "$out/profile-py-spy.log" 2>&1
  wait
  ;;
ab)
  rounds=${2:-3}; old=$(readlink -f "${3:-.bench/head-src}")
  [ -d "$old/moonlet" ] || { echo "no moonlet package under ${3:-.bench/head-src}" >&2; exit 1; }
  args=(--patterns fan-in --peers 1 --engines moonlet --transports tcp,shm --duration 2)
  [ $# -gt 3 ] && args=("${@:4}")
  for r in $(seq "$rounds"); do
    for side in old src; do
      src=$PWD/src; [ "$side" = old ] && src=$old
      python3 benchmarks/scale.py "${args[@]}" --src "$src" --out "$out/ab-$side-$r" > "$out/ab-$side-$r.log" 2>&1
    done
  done
  ;;
esac
