#!/usr/bin/env bash
# A few benchmarks/scale.py rows under several settings (VAR=value ...), for tuning on the 16-CPU machine:
#   OUT=dir scripts/scale-probe.sh "ARGS" "ENV1" "ENV2" ...   e.g. "MOONLET_REACTORS=8 MOONLET_SPIN_US=0"
set -uo pipefail
cd "$(dirname "$0")/.."
args="$1"; shift
for settings in "$@"; do
  echo "== $settings"
  env $settings python3 benchmarks/scale.py $args 2>&1 | grep -E "^fan|Error|error" | head -40
done
