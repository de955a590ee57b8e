#!/usr/bin/env bash
# One device call (< 8 minutes): training throughput of ResNet-50 on CIFAR-sized data at
# batch 128 and 1024, bfloat16 and float32, CE and FLSD-53; the six-loss vmapped row at
# batch 128; and the evaluation pass. Results land in $OUT (or ./gpu_results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
# The repo is on PYTHONPATH below; the lent machine has jax, flax, optax and orbax already.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 420 python benchmarks/train_throughput.py --models resnet50 \
    --batch-sizes 128,1024 --dtypes bfloat16,float32 --losses ce,flsd53 --steps 30 \
    --multi ce,brier,mmce_weighted,label_smoothing,focal,flsd53 --eval \
    --json "$OUT/train_throughput.json" | tee "$OUT/train_throughput.txt"
