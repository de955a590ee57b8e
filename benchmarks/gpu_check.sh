#!/usr/bin/env bash
# One device call (< 8 minutes): the training loop's compiled call (train_steps, 39 steps per
# call: the loop's default for CIFAR-10's 351 steps per epoch) for ResNet-50 on CIFAR-sized
# data at batch 128 and 1024, bfloat16 and float32, CE and FLSD-53; the per-step loop it
# replaced (with a loss comparison); the per-epoch validation pass and checkpoint saves; the
# six-loss row as one program (vmapped and sequential members, each checked against the
# single run); and the evaluation pass. Rows run in priority order and the JSON is rewritten
# after each, so a run cut short by the timeout keeps its figures. Results land in $OUT (or
# ./gpu_results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
# The repo is on PYTHONPATH below; the lent machine has jax, flax, optax and orbax already.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 450 python benchmarks/train_throughput.py \
    --models resnet50 --batch-sizes 128,1024 --dtypes bfloat16,float32 --losses ce,flsd53 \
    --steps-per-call 39 --calls 2 --per-step --epoch-overhead \
    --multi ce,brier,mmce_weighted,label_smoothing,focal,flsd53 --multi-modes vmap,sequential \
    --eval --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.txt"
echo "exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/train_throughput.txt"
