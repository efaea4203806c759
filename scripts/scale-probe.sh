#!/usr/bin/env bash
# A few benchmarks/scale.py rows under several settings (VAR=value ...), for tuning on the 16-CPU machine:
#   OUT=dir scripts/scale-probe.sh "ARGS" "ENV1" "ENV2" ...   e.g. "MOONLET_REACTORS=8 MOONLET_SPIN_US=0"
# With SAMPLE=S, scripts/cpu-sample.py also prints every worker's (and thread's) CPU % each second for S seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
args="$1"; shift
for settings in "$@"; do
  echo "== $settings"
  [ -n "${SAMPLE:-}" ] && python3 scripts/cpu-sample.py _scale_worker "$SAMPLE" 1 &
  env $settings python3 benchmarks/scale.py $args 2>&1 | grep -E "^fan|Error|error" | head -40
  wait
done
