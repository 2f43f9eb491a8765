#!/usr/bin/env bash
# (Kept in this repository so that its CI and GPU bundle need nothing from outside it; the
# same script as the workplace's shared/cuda/build-cuda.sh.)
# build-cuda.sh -- build Rust code that uses candle's `cuda` feature on a machine
# WITHOUT a GPU / CUDA toolkit, for running later on a CUDA 13.0 GPU machine.
#
# Usage:  build-cuda.sh <command...>
#   e.g.  build-cuda.sh cargo build --release --features cuda
#         build-cuda.sh cargo test --release --features cuda --no-run
#         build-cuda.sh --env          # print the exports (eval-able) and exit
#
# What it does (idempotent; everything is cached under $CUDA13_PREFIX):
#   1. pip-installs the CUDA 13.0 compiler + link-time libraries
#      (nvcc, crt, nvvm/cicc/libdevice, cudart, cccl, nvrtc, curand, cublas)
#      with `pip install --target` (no root, no system CUDA needed);
#   2. adds unversioned link symlinks (libcudart.so -> libcudart.so.13, ...) in
#      <root>/lib64 and builds a link-only stub <root>/lib64/stubs/libcuda.so
#      (SONAME libcuda.so.1, every entry point returns CUDA_ERROR_STUB_LIBRARY)
#      because the real libcuda.so.1 ships with the GPU driver, not with pip;
#   3. exports PATH/NVCC/CUDA_HOME/CUDA_PATH/CUDA_ROOT/CUDA_TOOLKIT_ROOT_DIR/
#      CUDA_COMPUTE_CAP (default 90 = H100) and runs the command.
#
# Environment knobs:
#   CUDA13_PREFIX     cache dir (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cuda13-pip)
#   CUDA_COMPUTE_CAP  target GPU (default 90 -> sm_90a PTX/SASS for H100)
#   CUDA13_PYTHON     python used for pip (default python3)
#   CUDA13_RUNTIME_STUB=1  also put the libcuda stub + CUDA libs on LD_LIBRARY_PATH
#                     so the produced binaries can be *started* here (e.g. `cargo
#                     test`); CUDA calls then fail with CUDA_ERROR_STUB_LIBRARY.
#   CUDAFORGE_THREADS parallel nvcc jobs in candle-kernels' build (default nproc)
set -euo pipefail

# nvcc 13.0.x only: PTX from a newer nvcc (ISA > 9.0) cannot be JIT-compiled by a
# 13.0 driver (R580), and cudarc derives its API bindings from `nvcc --version`.
# Link-time libs are 13.0 releases, so binaries only import symbols that every
# CUDA 13.x runtime (libcudart/libcublas/libnvrtc.so.13, libcurand.so.10) has.
PKGS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-curand==10.4.0.35"
  "nvidia-cublas==13.0.2.14"
)
PREFIX="${CUDA13_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/cuda13-pip}"
PY="${CUDA13_PYTHON:-python3}"
ROOT="$PREFIX/nvidia/cu13"          # CUDA-13 pip wheels all install under nvidia/cu13
STAMP="$PREFIX/.cuda13-pkgs"
log() { echo "[build-cuda] $*" >&2; }

install_pip_cuda() {
  local want; want="$(printf '%s\n' "${PKGS[@]}")"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$ROOT/bin/nvcc" ]]; then
    return 0
  fi
  log "installing CUDA 13.0 build pieces into $PREFIX (~1.2 GiB, one-off)"
  local tmp="$PREFIX.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$PREFIX")"
  # one pip call: `pip --target` does not merge the shared nvidia/ namespace dir
  # across separate invocations.
  "$PY" -m pip install --quiet --no-deps --no-compile --target "$tmp" "${PKGS[@]}"
  rm -rf "$PREFIX"
  mv "$tmp" "$PREFIX"
  printf '%s\n' "${PKGS[@]}" > "$STAMP"
}

make_link_dirs() {
  local l64="$ROOT/lib64" stubs="$ROOT/lib64/stubs"
  mkdir -p "$stubs"
  local so
  for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    [[ -e "$ROOT/lib/$so" ]] || { log "missing $ROOT/lib/$so"; exit 1; }
    ln -sfn "../lib/$so" "$l64/${so%%.so.*}.so"
  done
  if [[ ! -f "$stubs/libcuda.so.1" || "$stubs/libcuda.so.1" -ot "$ROOT/include/cuda.h" ]]; then
    log "generating link stub $stubs/libcuda.so.1"
    local c="$stubs/libcuda_stub.c"
    {
      echo "/* link-time stub for the CUDA driver API; never ship it. */"
      echo "#define STUB(n) int n(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }"
      # every cu* identifier the 13.0 headers mention (incl. _v2/_ptds/_ptsz names
      # the macros map to): a superset of what cudarc's cuda-13000 bindings import
      grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$ROOT"/include/cuda.h "$ROOT"/include/cudaEGL.h \
        "$ROOT"/include/cudaGL.h "$ROOT"/include/cudaVDPAU.h "$ROOT"/include/cudaTypedefs.h \
        "$ROOT"/include/cudaProfilerTypedefs.h | sort -u | sed 's/.*/STUB(&)/'
    } > "$c"
    cc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so.1.tmp" "$c"
    mv "$stubs/libcuda.so.1.tmp" "$stubs/libcuda.so.1"
    ln -sfn libcuda.so.1 "$stubs/libcuda.so"
  fi
}

install_pip_cuda
make_link_dirs

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# candle-kernels' build (cudaforge) otherwise uses only half the cores for nvcc
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc 2>/dev/null || echo 2)}"
export PATH="$ROOT/bin:$PATH"
export NVCC="$ROOT/bin/nvcc"
# cudarc's build script adds <X>/lib, <X>/lib64, <X>/lib64/stubs ... of EVERY one
# of these that is set, so point all of them at the pip toolkit.
export CUDA_HOME="$ROOT" CUDA_PATH="$ROOT" CUDA_ROOT="$ROOT" CUDA_TOOLKIT_ROOT_DIR="$ROOT"
unset CUDNN_LIB CUDARC_CUDA_VERSION
if [[ "${CUDA13_RUNTIME_STUB:-0}" == 1 ]]; then
  export LD_LIBRARY_PATH="$ROOT/lib:$ROOT/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

ver="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ "$ver" == 13.0 ]] || { log "expected nvcc 13.0, got '$ver'"; exit 1; }

if [[ "${1:-}" == "--env" ]]; then
  for v in PATH NVCC CUDA_HOME CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDA_COMPUTE_CAP CUDAFORGE_THREADS; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  [[ "${CUDA13_RUNTIME_STUB:-0}" == 1 ]] && printf 'export LD_LIBRARY_PATH=%q\n' "$LD_LIBRARY_PATH"
  exit 0
fi
[[ $# -gt 0 ]] || { sed -n '2,30p' "$0"; exit 2; }
log "nvcc $ver, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CUDA root $ROOT"
exec "$@"
