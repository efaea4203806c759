#!/usr/bin/env bash
# Run every GPU test and the GPU benchmarks in one go, on a machine with NVIDIA GPUs.
# Results go to ${OUT:-docs/results}/gpu-<date>.md (and .log). Needs torch and cuda-python
# (cuda-bindings) importable by python3; moonlet is used from this checkout (no install step).
# With .bench/gpu-peers (scripts/gpu-peers.sh pack, carried along), also runs the side-by-side
# comparison with Mooncake's and NIXL's CUDA wheels (compare-gpu-<date>.md/.json/.png).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-docs/results}"
mkdir -p "$out"
day=$(date +%Y-%m-%d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{
  echo "## moonlet info"; echo '```'; python3 -m moonlet.cli.main info; echo '```'
  echo "## nvidia-smi topo -m"; echo '```'; nvidia-smi topo -m 2>&1 || true; echo '```'
  echo "## GPU tests"; echo '```'
  python3 -m pytest -q -rs -p no:cacheprovider ${TESTS:-tests/test_gpu.py tests/test_transfer.py} 2>&1 | tail -25
  echo '```'
  echo "## one small-block batch, where the time goes"; echo '```'
  python3 benchmarks/gpu_profile.py --seconds 2 2>&1 | head -60
  echo '```'
} > "$out/gpu-$day.log" 2>&1
python3 benchmarks/gpu.py --runs "${RUNS:-3}" --duration "${DURATION:-2}" --markdown "$out/gpu-bench-$day.md" \
  --json "$out/gpu-$day.json" >> "$out/gpu-$day.log" 2>&1
cat "$out/gpu-bench-$day.md" "$out/gpu-$day.log" > "$out/gpu-$day.md" 2>/dev/null
rm -f "$out/gpu-bench-$day.md" "$out/gpu-$day.log"
if [ -d .bench/gpu-peers ] && [ -z "${SKIP_COMPARE:-}" ]; then
  peers=$(mktemp -d)
  scripts/gpu-peers.sh unpack "$peers" > "$out/compare-gpu-$day.log" 2>&1
  python3 benchmarks/compare.py --use-vram --peers "$peers" --duration "${COMPARE_DURATION:-0.5}" \
    --out "$out/compare-gpu-$day" >> "$out/compare-gpu-$day.log" 2>&1
  tail -5 "$out/compare-gpu-$day.log"
fi
cat "$out/gpu-$day.md"
