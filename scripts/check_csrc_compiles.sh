#!/usr/bin/env bash
# Compile-only check of the CUDA C++ backend; needs nvcc, no GPU, no CUDA build of torch.
#
#   scripts/check_csrc_compiles.sh            # every csrc/*.cu for sm_80 and sm_90, warnings are errors
#   VERBOSE=1 scripts/check_csrc_compiles.sh  # also print ptxas register / shared memory / spill use
#
# Each csrc/*.cu is compiled with `nvcc -c` (object discarded) for sm_80 and sm_90.
# csrc/bindings.cpp needs torch headers: when python can import torch it is
# syntax-checked with the host compiler (g++ -fsyntax-only) against torch's headers;
# a CPU-only torch wheel lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h),
# which the check supplies from a temporary folder.
#
# Exit status: 0 when everything compiles (or nvcc is absent: skipped, with a message),
# 1 on the first failure.
set -euo pipefail

SELF="${BASH_SOURCE[0]}"
[[ "$SELF" == */* ]] || SELF="./$SELF"
ROOT="$(cd "${SELF%/*}/.." && pwd)"  # builtins only: this runs before the nvcc check
CSRC="${CSRC_DIR:-$ROOT/csrc}"  # CSRC_DIR: check another folder (the tests use it)

NVCC="${NVCC:-}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  NVCC="$(command -v nvcc || true)"
fi
if [[ -z "$NVCC" ]]; then
  echo "SKIP: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH); csrc/ was not compile-checked"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*' || echo 'unknown release'))"

ARCH_FLAGS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
# torch's CUDAExtension compiles .cu files with these defines (no implicit half / bf16
# conversions or operators): check under them, since they only take features away.
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
NVCC_FLAGS=(-c -std=c++17 -O3 --threads "${NVCC_THREADS:-0}" -Werror all-warnings
  -Xcompiler -Wall,-Wextra,-Werror "${TORCH_NVCC_DEFINES[@]}" -I"$CSRC")
if [[ "${VERBOSE:-0}" != "0" ]]; then
  NVCC_FLAGS+=(-Xptxas -v,-warn-spills)
fi

status=0
shopt -s nullglob
cu_files=("$CSRC"/*.cu)
if [[ ${#cu_files[@]} -eq 0 ]]; then
  echo "FAIL: no .cu files under $CSRC"
  exit 1
fi
for cu in "${cu_files[@]}"; do
  name="$(basename "$cu")"
  start=$SECONDS
  if "$NVCC" "${NVCC_FLAGS[@]}" "${ARCH_FLAGS[@]}" -o "$WORK/${name%.cu}.o" "$cu"; then
    echo "ok    $name (sm_80, sm_90) in $((SECONDS - start)) s"
  else
    echo "FAIL  $name"
    status=1
  fi
done

# bindings.cpp: host-side syntax check against torch's headers, when torch is importable.
CXX_BIN="${CXX:-g++}"
PYTHON_BIN="${PYTHON:-python3}"
if [[ ! -f "$CSRC/bindings.cpp" ]]; then
  echo "SKIP  bindings.cpp: not in $CSRC"
elif ! command -v "$CXX_BIN" >/dev/null 2>&1; then
  echo "SKIP  bindings.cpp: no host compiler ($CXX_BIN)"
elif ! INCLUDES="$("$PYTHON_BIN" - <<'EOF' 2>/dev/null
import sysconfig
from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))
EOF
)"; then
  echo "SKIP  bindings.cpp: torch is not importable with $PYTHON_BIN"
else
  CUDA_INC="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
  if [[ ! -f "$CUDA_INC/cuda_runtime_api.h" ]]; then
    CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
  fi
  inc_flags=()
  stub_needed=1
  while IFS= read -r dir; do
    [[ -n "$dir" ]] || continue
    inc_flags+=(-isystem "$dir")
    [[ -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ]] && stub_needed=0
  done <<<"$INCLUDES"
  if [[ $stub_needed -eq 1 ]]; then
    # Generated at torch's build time, shipped only in CUDA wheels; its whole content:
    mkdir -p "$WORK/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
    inc_flags+=(-isystem "$WORK/stub")
  fi
  inc_flags+=(-isystem "$CUDA_INC")
  start=$SECONDS
  if "$CXX_BIN" -fsyntax-only -std=c++20 -Wall -Wextra -Werror "${inc_flags[@]}" -I"$CSRC" "$CSRC/bindings.cpp"; then
    echo "ok    bindings.cpp (host syntax check, c++20, torch headers) in $((SECONDS - start)) s"
  else
    echo "FAIL  bindings.cpp"
    status=1
  fi
fi

exit $status
