#!/usr/bin/env bash
# Build the onnxopt kernels with AddressSanitizer + UndefinedBehaviorSanitizer and run
# tests/test_kernels.py against that build (ONNXOPT_KERNELS_LIB + LD_PRELOAD of libasan).
#
# Usage: kernels/sanitize.sh [extra pytest args]
# Env:   ONNXOPT_SANITIZE_BUILD_DIR (default build/sanitize), CXX, ONNXRUNTIME_INCLUDE_DIR.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ONNXOPT_SANITIZE_BUILD_DIR:-$root/build/sanitize}"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)

cmake -S "$root/kernels" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DONNXOPT_SANITIZE=ON >/dev/null
cmake --build "$build" -j "$(nproc)"

lib="$build/libonnxopt_kernels.so"
cxx="${CXX:-c++}"
asan="$($cxx -print-file-name=libasan.so)"
ubsan="$($cxx -print-file-name=libubsan.so)"
if [ ! -f "$asan" ]; then
  echo "sanitize.sh: libasan not found via $cxx -print-file-name" >&2
  exit 1
fi
preload="$asan"
[ -f "$ubsan" ] && preload="$asan:$ubsan"

export ONNXOPT_KERNELS_LIB="$lib"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:verify_asan_link_order=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
cd "$root"
LD_PRELOAD="$preload" python -m pytest tests/test_kernels.py -q -p no:cacheprovider "$@"
