#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on the GPU machine (which has no Rust), on this CPU-only
# machine, into .gpu/ (git-ignored; name it in the device tool's `carry`): the CUDA test binaries
# that honour CANDLE_MHA_DEVICE, the mha_case runner and bench_cuda, xz-compressed, plus
# scripts/cuda/run-on-gpu.sh and BUILD_INFO (commit, date).
#
#   bash scripts/build-gpu-bundle.sh        # then: device run, carry [".gpu"], bash scripts/gpu-check.sh
#
# Uses scripts/cuda/build-cuda.sh (CUDA 13 from PyPI, kernels for sm_90a = H100/H200; set
# CUDA_COMPUTE_CAP for another GPU) with its own target dir, ~/.cache/candle-mha/target-cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-mha/target-cuda}
tests=(cuda_kernel sdpa parity)
examples=(mha_case bench_cuda)
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
for e in "${examples[@]}"; do args+=(--example "$e"); done
json=$(mktemp)
bash scripts/cuda/build-cuda.sh cargo build --release --features cuda "${args[@]}" >&2
bash scripts/cuda/build-cuda.sh cargo test --release --features cuda --no-run "${args[@]}" \
    --message-format=json > "$json"
python3 - "$json" "${tests[@]}" "${examples[@]}" <<'PY' > .gpu/binaries.txt
import json, sys
want = set(sys.argv[2:])
seen = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name, kind = m["target"]["name"], m["target"]["kind"][0]
    if name in want and (kind == "example" or m["profile"]["test"]):
        seen[name] = m["executable"]
missing = want - seen.keys()
if missing:
    sys.exit(f"not built: {sorted(missing)}")
for name, path in sorted(seen.items()):
    print(name, path)
PY
while read -r name path; do
    # The examples' test harness build is not what we want: take the plain example binary.
    if [[ " ${examples[*]} " == *" $name "* ]]; then path="$CARGO_TARGET_DIR/release/examples/$name"; fi
    xz -9 -T0 -c "$path" > ".gpu/$name.xz"
    echo "$name: $(stat -c %s "$path") bytes -> $(stat -c %s ".gpu/$name.xz") xz" >&2
done < .gpu/binaries.txt
cp scripts/cuda/run-on-gpu.sh .gpu/
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- src kernels tests examples || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%FT%TZ)"
    echo "compute cap: ${CUDA_COMPUTE_CAP:-90}"
} > .gpu/BUILD_INFO
du -ch .gpu/*.xz | tail -1 >&2
