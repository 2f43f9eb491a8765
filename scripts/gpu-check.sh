#!/usr/bin/env bash
# The one-command device check of the fused CUDA kernel, on the GPU machine (no Rust there):
#   here:   bash scripts/build-gpu-bundle.sh
#   device: run `bash scripts/gpu-check.sh` with carry [".gpu"]   (about 5 minutes; under 8)
# Everything goes under $OUT (default ./gpu-out): per-step logs, the bench JSON, SUMMARY.md.
#
# In this order (most useful first; each step has a timeout and the whole a deadline, DEADLINE):
# 1. the device, driver and bundle's commit;
# 2. tests/cuda_kernel.rs with CANDLE_MHA_DEVICE=cuda: the kernel against the reference on random
#    shapes and every mask, outputs poisoned with NaN first; decode; strided and misaligned inputs;
# 3. the bench: bench_cuda (candle-mha, candle matmul+softmax) and PyTorch SDPA (flash,
#    efficient, cuDNN) in the same call, merged by scripts/bench_cuda_table.py (printed last);
# 4. every case in tests/cases (MHA parity, sdpa, varlen) through mha_case --device cuda, with
#    each backend (auto, reference, cuda-fused; cuda-fused FAILs name why a case cannot run);
# 5. tests/sdpa.rs and tests/parity.rs with CANDLE_MHA_DEVICE=cuda;
# 6. compute-sanitizer memcheck over a small kernel sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
work=$(mktemp -d)
summary="$OUT/SUMMARY.md"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
DEADLINE=${DEADLINE:-450} # seconds: the whole check stays under 8 minutes with the unpacking
step() { # step NAME TIMEOUT CMD...: runs CMD, logs to $OUT/NAME.log, notes status and time
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 10)); then
        note "- $name: skipped (the ${DEADLINE}s deadline is spent)"
        return 0
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local what="ok"
    ((rc == 124)) && what="TIMEOUT after ${limit}s"
    ((rc != 0 && rc != 124)) && what="FAILED (exit $rc)"
    note "- $name: $what, $((SECONDS - t0)) s"
    ((rc != 0)) && tail -n 4 "$OUT/$name.log" | sed 's/^/      | /' | tee -a "$summary"
    return 0
}

note "# gpu-check $(date -u +%FT%TZ)"
cat .gpu/BUILD_INFO 2>/dev/null | sed 's/^/    /' | tee -a "$summary"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/    gpu: /' | tee -a "$summary"

for f in .gpu/*.xz; do
    name=$(basename "$f" .xz)
    xz -dc "$f" > "$work/$name" && chmod +x "$work/$name"
done
LD_LIBRARY_PATH=$(RUN_QUIET=1 bash .gpu/run-on-gpu.sh /usr/bin/printenv LD_LIBRARY_PATH)
export LD_LIBRARY_PATH
export CANDLE_MHA_DEVICE=cuda RUST_BACKTRACE=1

note "## tests (CANDLE_MHA_DEVICE=cuda)"
for t in cuda_kernel; do
    step "test-$t" 120 "$work/$t" --test-threads=1
    grep -E "^test result|panicked|FAILED" "$OUT/test-$t.log" | head -5 | sed 's/^/    /' | tee -a "$summary"
done

note "## bench"
step bench-candle-mha 120 "$work/bench_cuda" --json "$OUT/bench_ours.jsonl"
step bench-torch 90 python3 scripts/bench_cuda_torch.py --json "$OUT/bench_torch.jsonl"
python3 scripts/bench_cuda_table.py "$OUT/bench_ours.jsonl" "$OUT/bench_torch.jsonl" > "$OUT/bench_table.md" 2>&1
bench_table=$(cat "$OUT/bench_table.md")
note "## tests/cases through mha_case --device cuda"
for backend in auto reference cuda-fused; do
    step "cases-$backend" 45 "$work/mha_case" --device cuda --backend "$backend" tests/cases
    note "    $backend: $(grep -E '^[0-9]+ passed, [0-9]+ failed' "$OUT/cases-$backend.log" | tail -1)"
done

note "## more tests (CANDLE_MHA_DEVICE=cuda)"
for t in sdpa parity; do
    step "test-$t" 60 "$work/$t" --test-threads=1
    grep -E "^test result|panicked|FAILED" "$OUT/test-$t.log" | head -5 | sed 's/^/    /' | tee -a "$summary"
done

note "## compute-sanitizer memcheck (small sweep)"
if command -v compute-sanitizer > /dev/null; then
    CUDA_SWEEP_CASES=12 step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$work/cuda_kernel" --test-threads=1 gpu_
    grep -E "ERROR SUMMARY|^test result" "$OUT/memcheck.log" | sed 's/^/    /' | tee -a "$summary"
else
    note "    compute-sanitizer not found"
fi

note "## bench table"
echo "$bench_table" | tee -a "$summary"
rm -rf "$work"
