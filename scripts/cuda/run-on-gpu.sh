#!/usr/bin/env bash
# (Kept in this repository so that its CI and GPU bundle need nothing from outside it; the
# same script as the workplace's shared/cuda/run-on-gpu.sh.)
# run-on-gpu.sh [BINARY [ARGS...]] -- run a binary produced by build-cuda.sh on a
# CUDA 13 GPU machine.  No Rust/CUDA toolkit needed there, only the NVIDIA driver
# (libcuda.so.1) and the CUDA 13 runtime libraries, e.g. from pip's nvidia-* wheels
# (as installed with PyTorch cu13x) or from a CUDA 13 toolkit.
# BINARY (may be BINARY.xz) defaults to ./probe or ./probe.xz next to this script.  Set CUDA13_LIB_DIRS
# (colon-separated) to force library dirs; RUN_QUIET=1 skips the diagnostics.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { [[ "${RUN_QUIET:-0}" == 1 ]] || echo "[run] $*" >&2; }
if [[ $# -gt 0 && -f "$1" ]]; then BIN="$1"; shift
elif [[ -f "$HERE/probe" ]]; then BIN="$HERE/probe"
else BIN="$HERE/probe.xz"; fi
# BIN may be xz-compressed (xz -9 shrinks candle cuda binaries ~9x): unpack next to
# it (or into a temp dir if that is read-only) with xz or python's lzma.
if [[ "$BIN" == *.xz ]]; then
  out="${BIN%.xz}"
  if [[ ! -f "$out" || "$BIN" -nt "$out" ]]; then
    [[ -w "$(dirname "$BIN")" ]] || out="$(mktemp -d)/$(basename "${BIN%.xz}")"
    { command -v xz >/dev/null 2>&1 && xz -dc "$BIN" > "$out.part"; } ||
      python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BIN" "$out.part" ||
      { say "cannot decompress $BIN"; exit 127; }
    chmod +x "$out.part" && mv -f "$out.part" "$out"
  fi
  BIN="$out"
fi
if [[ ! -x "$BIN" ]] && ! chmod +x "$BIN" 2>/dev/null; then
  tmp="$(mktemp -d)"; cp "$BIN" "$tmp/" && BIN="$tmp/$(basename "$BIN")" && chmod +x "$BIN"
fi

NEEDED=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13)

cands=()
IFS=: read -r -a extra <<< "${CUDA13_LIB_DIRS:-}"
cands+=("${extra[@]}")
# pip wheels (nvidia/cu13/lib for CUDA 13 wheels, nvidia/<pkg>/lib for older layouts)
for py in python3 python ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python3"} ${CONDA_PREFIX:+"$CONDA_PREFIX/bin/python3"}; do
  command -v "$py" >/dev/null 2>&1 || continue
  while IFS= read -r d; do
    [[ -n "$d" ]] && cands+=("$d"/cu13/lib "$d"/*/lib)
  done < <("$py" - 2>/dev/null <<'EOF'
import importlib.util as u
s = u.find_spec("nvidia")
print("\n".join(s.submodule_search_locations) if s and s.submodule_search_locations else "")
EOF
)
done
cands+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib)
# last resort: search the usual python / opt trees
while IFS= read -r f; do cands+=("$(dirname "$f")"); done < <(
  find /opt /usr/local/lib /usr/lib/python3* "$HOME/.local" /home -maxdepth 9 \
       \( -name libcublas.so.13 -o -name libcudart.so.13 \) 2>/dev/null | sort -u)
cands+=(/usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/lib64)

dirs=()
for lib in "${NEEDED[@]}"; do
  hit=""
  for d in "${cands[@]}"; do
    [[ -n "$d" && "$d" != */stubs* && -e "$d/$lib" ]] && { hit="$d"; break; }
  done
  if [[ -n "$hit" ]]; then
    say "$lib -> $hit"
    [[ " ${dirs[*]-} " == *" $hit "* ]] || dirs+=("$hit")
  else
    say "WARNING: $lib not found in any candidate dir (set CUDA13_LIB_DIRS)"
  fi
done
for d in /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/lib64; do
  if [[ -e "$d/libcuda.so.1" && "$d" != */stubs* ]]; then
    say "libcuda.so.1 (driver) -> $d"
    [[ " ${dirs[*]-} " == *" $d "* ]] || dirs+=("$d")
    break
  fi
done
LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
if [[ "${RUN_QUIET:-0}" != 1 ]]; then
  say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader >&2
  say "ldd $BIN:"; ldd "$BIN" >&2
  ldd "$BIN" | grep -q 'not found' && say "WARNING: unresolved libraries above"
fi
exec "$BIN" "$@"
