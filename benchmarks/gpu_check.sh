#!/usr/bin/env bash
# One device call (< 8 minutes), two parts, results in $OUT (or ./gpu_results):
#
# 1. The table (train_throughput.py, at most TABLE_S seconds): the training loop's compiled
#    call (train_steps, 39 steps per call: the loop's default for CIFAR-10's 351 steps per
#    epoch) for ResNet-50 on CIFAR-sized data at batch 128 and 1024, bfloat16 and float32, CE
#    and FLSD-53 (the per-step loop it replaced was measured once and is left out: its
#    `--per-step` row is in benchmarks/NOTES.md); the per-epoch validation pass and checkpoint saves; the six-loss row as one program (sequential members,
#    the GPU default, then vmapped; each checked against the single run); and the evaluation
#    pass. Rows run in priority order and the JSON is rewritten after each, so a run cut
#    short by the timeout keeps its figures; a row that fails is recorded and the others
#    still run. (On an H200 the 330 s reached the headline's rows, CE at batch 1024 bf16 and
#    at 128 fp32, and FLSD-53 at 128 bf16; not the rest: benchmarks/NOTES.md.)
# 2. Where the headline call's device time goes, and variants of it (gpu_profile.py, at most
#    PROFILE_S seconds): a kernel breakdown by part of the step, the gzipped trace and the
#    optimised HLO for offline reading; then images/s of BatchNorm's autodiff gradient (the
#    code before its closed form), scan unroll 2, and XLA options.
#
# Both parts share one persistent compilation cache (JAX_COMPILATION_CACHE_DIR), so part 2
# reuses part 1's compiled headline program and its convolution autotuning. The table's
# first row of each shape therefore compiles cold, as a user's first run does; a later row
# with the same convolutions (FLSD-53 beside CE) finds them autotuned.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    > "$OUT/gpu.txt" 2>&1 || true
# The repo is on PYTHONPATH; the lent machine has jax, flax, optax and orbax already.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"  # the lent machine's python3 holds jax
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/calib_jax_compile_cache}"
timeout -k 10 "${TABLE_S:-330}" "$PYTHON" benchmarks/train_throughput.py \
    --models resnet50 --batch-sizes 128,1024 --dtypes bfloat16,float32 --losses ce,flsd53 \
    --steps-per-call 39 --calls 2 --epoch-overhead \
    --multi ce,brier,mmce_weighted,label_smoothing,focal,flsd53 --multi-modes sequential,vmap \
    --eval --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.txt"
echo "exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/train_throughput.txt"
timeout -k 10 "${PROFILE_S:-140}" "$PYTHON" benchmarks/gpu_profile.py --out "$OUT" 2>&1
echo "profile exit status: $?"
