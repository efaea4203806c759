#!/usr/bin/env bash
# Mooncake's transfer_engine_bench for machines without a package registry (benchmarks/scale.py there).
#
#   scripts/scale-peers.sh pack          here: writes .bench/scale-peers/mooncake-bench.tar.xz from .bench/mooncake
#                                        (mooncake-transfer-engine-non-cuda, made by the other benchmarks)
#   scripts/scale-peers.sh unpack DIR    there: DIR/transfer_engine_bench runs with DIR/lib
#
# Packed: the binary, the libraries its wheel bundles, and every other library it links against except the C
# library's own (libc, libm, libdl, libpthread, librt, the loader), so the GPU machine's system need not have
# libibverbs, libnuma or libcurl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.bench/scale-peers
case "${1:-}" in
pack)
  site=$(.bench/mooncake/bin/python -c "import mooncake, os; print(os.path.dirname(os.path.dirname(mooncake.__file__)))")
  bin="$site/mooncake/transfer_engine_bench"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$out" "$work/lib"
  cp "$bin" "$work/"
  ldd "$bin" | awk '/=>/ {print $3}' | grep -Ev '/(libc|libm|libdl|libpthread|librt)\.so' | xargs -I{} cp -L {} "$work/lib/"
  tar cf - -C "$work" . | xz -T2 -6 > "$out/mooncake-bench.tar.xz"
  ls -la "$out"
  ;;
unpack)
  mkdir -p "$2"
  tar xJf "$out/mooncake-bench.tar.xz" -C "$2"
  ;;
*)
  echo "usage: $0 pack | unpack DIR" >&2
  exit 2
  ;;
esac
