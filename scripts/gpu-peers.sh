#!/usr/bin/env bash
# The peer engines for GPU machines that have no package registry (benchmarks/compare.py --use-vram).
#
#   scripts/gpu-peers.sh pack [PYTHON_VERSION]   here: writes .bench/gpu-peers/*.tar.xz (about 45 MB)
#   scripts/gpu-peers.sh unpack DIR              on the GPU machine: DIR/site (PYTHONPATH), DIR/lib (LD_LIBRARY_PATH)
#
# Packed: Mooncake's CUDA wheel (mooncake-transfer-engine, the transfer engine only: engine.so and the
# libraries it links), NIXL's (nixl-cu12, without its expert-parallel kernels), both for PYTHON_VERSION
# (default 3.12, the GPU machine's), CUDA 12's runtime library (nvidia-cuda-runtime-cu12: the wheels are
# built against it, the GPU machine's torch may bring another), and Debian's libibverbs1 /
# ibverbs-providers / libnuma1, which Mooncake's engine links against even without an RDMA NIC. The rest
# (torch, numpy, the driver) comes from the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
MOONCAKE=mooncake-transfer-engine==0.3.13.post1
NIXL=nixl-cu12==1.5.1
case "${1:-}" in
pack)
  py="${2:-3.12}"
  out=.bench/gpu-peers
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$out" "$work/mc" "$work/nx" "$work/lib" "$work/debs"
  pip download -q --no-deps --only-binary=:all: --python-version "$py" --platform manylinux_2_28_x86_64 \
    "$MOONCAKE" "$NIXL" -d "$work/wheels"
  (cd "$work/mc" && unzip -q "$work"/wheels/mooncake_transfer_engine-*.whl \
     'mooncake/__init__.py' 'mooncake/buffer_pool.py' 'mooncake/engine.so' 'mooncake/libasio.so' \
     'mooncake/libetcd_wrapper.so' 'mooncake_transfer_engine.libs/*' 'mooncake_transfer_engine-*.dist-info/*' \
     && rm -f mooncake_transfer_engine.libs/libetcd_wrapper-*.so)
  (cd "$work/nx" && unzip -q "$work"/wheels/nixl_cu12-*.whl -x 'nixl_ep_cu12/*')
  pip download -q --no-deps --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    nvidia-cuda-runtime-cu12 -d "$work/cudart"
  unzip -q -j "$work"/cudart/*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$work/lib"
  (cd "$work/debs" && apt-get download libibverbs1 ibverbs-providers libnuma1 >/dev/null 2>&1 \
     && for d in *.deb; do dpkg -x "$d" x; done && cp -a x/usr/lib/x86_64-linux-gnu/*.so* "$work/lib/")
  tar cf - -C "$work/mc" . | xz -T2 -6 > "$out/mooncake-cuda.tar.xz"
  tar cf - -C "$work/nx" . | xz -T2 -6 > "$out/nixl-cu12.tar.xz"
  tar cJf "$out/libs.tar.xz" -C "$work/lib" .
  echo "$MOONCAKE $NIXL python $py" > "$out/VERSIONS"
  ls -la "$out"
  ;;
unpack)
  dir="$2"
  mkdir -p "$dir/site" "$dir/lib"
  for t in mooncake-cuda nixl-cu12; do tar xJf ".bench/gpu-peers/$t.tar.xz" -C "$dir/site"; done
  tar xJf .bench/gpu-peers/libs.tar.xz -C "$dir/lib"
  cat .bench/gpu-peers/VERSIONS
  ;;
*)
  echo "usage: $0 pack [PYTHON_VERSION] | unpack DIR" >&2
  exit 2
  ;;
esac
