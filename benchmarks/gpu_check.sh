#!/usr/bin/env bash
# Usage: bash benchmarks/gpu_check.sh [table|profile|batch1024|models|init|all]   (default: all)
# Results in $OUT (or ./gpu_results). On a lent machine (at most 10 minutes per command) run
# the parts as separate calls on the warm machine, `table` first (5.5 min), then `profile`
# (~4 min), then `batch1024` if the session has time left (~3.5 min), `models` after that
# (~5.5 min), `init` last (~2 min); they share one persistent compilation cache
# (JAX_COMPILATION_CACHE_DIR; init_bench.py's processes run without it).
#
# table (train_throughput.py, at most TABLE_S seconds): the training loop's compiled call
#    (train_steps, 39 steps per call: the loop's default for CIFAR-10's 351 steps per epoch)
#    for ResNet-50 on CIFAR-sized data at batch 128 and 1024, bfloat16 and float32, CE and
#    FLSD-53; the per-epoch validation pass and checkpoint saves; the six-loss row as one
#    program (sequential members, the GPU default, after the rows that change one of batch,
#    dtype, loss; vmapped members last); and the evaluation pass. Rows run in priority order
#    and the JSON is rewritten after each, so a run cut short keeps its figures; a row that
#    fails is recorded and the others still run (the part's "exit status" line then says 1;
#    gpu_profile.py likewise for a variant, a trace or the rounds that failed). (On an H200: a ResNet-50 row compiles in
#    15-40 s, the six-member program in ~90 s; the first five rows, through the six-loss
#    sequential row, take ~290 s; all nine but the vmapped row took 450 s.)
# profile (at most PROFILE_S seconds): gpu_profile.py: a kernel breakdown of the headline call
#    by part of the step, the gzipped trace and optimised HLO; then images/s of the training
#    loop's GPU defaults taken away, each against the default in the same process
#    (before_lean: all three, the library before the third GPU session; separate_sums:
#    BatchNorm's sums without the per-image stage; tree_params: the loop over the
#    parameters' tree, not one vector; no_graph_conv: cuDNN's convolutions launched outside
#    XLA's CUDA graphs), each then timed again in 5 interleaved rounds (medians vs the
#    default's: the machine's drift cancels), and last a trace of before_lean. (On an
#    H200 the third session measured the three together against before_lean's code:
#    +4.8%, ranges apart; which of the three gives what is this part's question.) The
#    graph_conv_concurrent rows the part ran before failed on an H200 (cuDNN status 5003
#    while tracing a convolution into a graph) and were dropped.
# batch1024 (gpu_profile.py at batch 1024, at most PROFILE_1024_S seconds, untraced, 3
#    rounds, in $OUT/batch1024): the same variants at batch 1024 (unmeasured there).
# models (train_throughput.py, at most MODELS_S seconds, in $OUT/models): the paper's other
#    CIFAR models, ResNet-110, Wide-ResNet-26-10 and DenseNet-121, at batch 128 bfloat16 with
#    cross-entropy (one row each, in that order: the time a run of each takes; unmeasured on a
#    GPU so far). Their training calls compile long: for an H200 without a device (autotuning
#    off, a 2-core host, hlo_static.py's wall time) ResNet-110 70 s, WRN-26-10 29 s,
#    DenseNet-121 148 s (ResNet-50: 41 s; it compiled in 37-40 s on the H200 with autotuning),
#    so the part needs ~5.5 min.
# init (init_bench.py, at most INIT_S seconds, in $OUT/init): a run's initial state for
#    ResNet-50 and DenseNet-121 computed on the host's CPU (the default for a state on an
#    accelerator) and on the GPU, each in a fresh process without the compilation cache: the
#    start-up each costs (predicted from compiles for an H200 without a device: 12 s vs 3.5 s
#    and 33 s vs 8.7 s on a 2-core host, plus the GPU's autotuning), and how many numbers
#    differ between the two (predicted: at most the last bit of some normal draws).
#
# The first row of each shape compiles cold, as a user's first run does; a later row with the
# same convolutions (FLSD-53 beside CE) finds them autotuned.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
case "$PART" in
    table|profile|batch1024|models|init|all) ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [table|profile|batch1024|models|init|all] (got '$PART')" >&2
       exit 2;;
esac
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    > "$OUT/gpu.txt" 2>&1 || true
# The repo is on PYTHONPATH; the lent machine has jax, flax, optax and orbax already.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"  # the lent machine's python3 holds jax
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/calib_jax_compile_cache}"
if [ "$PART" = table ] || [ "$PART" = all ]; then
    timeout -k 10 "${TABLE_S:-360}" "$PYTHON" benchmarks/train_throughput.py \
        --models resnet50 --batch-sizes 128,1024 --dtypes bfloat16,float32 --losses ce,flsd53 \
        --steps-per-call 39 --calls 2 --epoch-overhead \
        --multi ce,brier,mmce_weighted,label_smoothing,focal,flsd53 --multi-modes sequential,vmap \
        --eval --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.txt"
    echo "exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/train_throughput.txt"
fi
if [ "$PART" = profile ] || [ "$PART" = all ]; then
    timeout -k 10 "${PROFILE_S:-240}" "$PYTHON" benchmarks/gpu_profile.py --out "$OUT" \
        --variants default,before_lean,separate_sums,tree_params,no_graph_conv \
        --trace-variants before_lean \
        2>&1 | tee "$OUT/gpu_profile_log.txt"
    echo "profile exit status: ${PIPESTATUS[0]}"
fi
if [ "$PART" = batch1024 ] || [ "$PART" = all ]; then
    timeout -k 10 "${PROFILE_1024_S:-200}" "$PYTHON" benchmarks/gpu_profile.py --batch 1024 \
        --no-profile --rounds 3 --out "$OUT/batch1024" \
        --variants default,before_lean,separate_sums,tree_params,no_graph_conv \
        2>&1 | tee "$OUT/gpu_profile_1024_log.txt"
    echo "batch-1024 variants exit status: ${PIPESTATUS[0]}"
fi
if [ "$PART" = models ] || [ "$PART" = all ]; then
    mkdir -p "$OUT/models"
    timeout -k 10 "${MODELS_S:-330}" "$PYTHON" benchmarks/train_throughput.py \
        --models resnet110,wide_resnet_26_10,densenet121 --batch-sizes 128 --dtypes bfloat16 \
        --losses ce --steps-per-call 39 --calls 2 \
        --json "$OUT/models/train_throughput.json" 2>&1 | tee "$OUT/models/train_throughput.txt"
    echo "models exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/models/train_throughput.txt"
fi
if [ "$PART" = init ] || [ "$PART" = all ]; then
    mkdir -p "$OUT/init"
    timeout -k 10 "${INIT_S:-150}" "$PYTHON" benchmarks/init_bench.py \
        --models resnet50,densenet121 --json "$OUT/init/init_bench.json" 2>&1 \
        | tee "$OUT/init/init_bench.txt"
    echo "init exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/init/init_bench.txt"
fi
