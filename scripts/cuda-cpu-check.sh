#!/usr/bin/env bash
# The fused CUDA kernel checked on this CPU-only machine, before any GPU (scripts/cuda_cpu_check.py):
# the Triton kernels under TRITON_INTERPRET=1 against the reference semantics on a sweep of shapes
# and masks (with the shipped variants' tile shapes), the shipped cubins and PTX against the
# launcher's manifest, and a fresh ahead-of-time compile, assembled by the ptxas bundled in the
# triton wheel, compared byte for byte with the committed artifacts; any register spill fails it.
# Ends with "N passed, M failed".
#
#   bash scripts/cuda-cpu-check.sh [--cases N] [--seed S] [--skip-sweep] [--skip-artifacts]
#
# Installs triton==3.6.0 and numpy (scripts/requirements-cuda.txt; no torch, no CUDA) into a venv
# under ${XDG_CACHE_HOME:-~/.cache}/candle-mha/triton-venv (override with TRITON_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-mha/triton-venv}
stamp="$venv/.requirements"
if [[ ! -x "$venv/bin/python" ]] || ! cmp -s scripts/requirements-cuda.txt "$stamp"; then
    echo "installing scripts/requirements-cuda.txt into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-cuda.txt
    cp scripts/requirements-cuda.txt "$stamp"
fi
exec "$venv/bin/python" scripts/cuda_cpu_check.py "$@"
