#!/usr/bin/env bash
# Usage: bash benchmarks/gpu_check.sh [table|profile|batch1024|models|init|all]   (default: all)
# Results in $OUT (or ./gpu_results). On a lent machine (at most 10 minutes per command) run
# the parts as separate calls on the warm machine, `table` first (6 min), then `profile`
# (~7 min), then `batch1024` if the session has time left (~3 min), `models` after that
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
# profile (at most PROFILE_S, then GRAPHS_S seconds):
#    1. gpu_profile.py: a kernel breakdown of the headline call by part of the step, the
#    gzipped trace and optimised HLO; images/s of XLA options and earlier code, each against
#    the default in the same process (graph_conv: cuDNN's convolutions recorded into the
#    CUDA graphs; before_bytes: BatchNorm without the fourth session's byte cuts;
#    fewer_kernels, two candidates together: BatchNorm's sums in two stages written out and
#    the loop over a flat parameter vector, 860.5 -> 686.5 kernels per step statically, same
#    bytes; lean: fewer_kernels in graph_conv's graphs, the candidate to adopt whole),
#    then each timed again in 5 interleaved rounds (medians vs the
#    default's: the machine's drift cancels), and last a trace of lean (what is left
#    once the gaps and the small kernels go). Five variants, as each compile of the unrolled
#    loop takes up to ~40 s on an H200;
#    2. train_throughput.py under XLA_FLAGS=$GRAPH_FLAGS (graph_conv_concurrent for every
#    compile: graph_conv, and the graph's nodes ordered by data dependencies only, so
#    independent kernels may overlap): the headline row (against the table's) and the
#    six-loss row (sequential members, which the concurrent graph may run side by side), in
#    $OUT/graphs.
# batch1024 (gpu_profile.py at batch 1024, at most PROFILE_1024_S seconds, untraced, 3
#    rounds, in $OUT/batch1024): the fourth session's three byte cuts together and apart
#    (before_bytes, convert_residual, mask_from_y; static: -11.7% of the bytes in all),
#    graph_conv, and autodiff_bn (BatchNorm's gradient by autodiff), where the row fell from
#    24,649 img/s (commit 1949c9d) to 20,015 (commit cae96e9).
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
    timeout -k 10 "${PROFILE_S:-200}" "$PYTHON" benchmarks/gpu_profile.py --out "$OUT" \
        --variants default,graph_conv,before_bytes,fewer_kernels,lean \
        --trace-variants lean \
        2>&1 | tee "$OUT/gpu_profile_log.txt"
    echo "profile exit status: ${PIPESTATUS[0]}"
    mkdir -p "$OUT/graphs"
    # gpu_profile.py's graph_conv_concurrent variant, as flags for the whole process.
    GRAPH_FLAGS="$(cd benchmarks && "$PYTHON" -c \
        'from gpu_profile import xla_flags; print(xla_flags("graph_conv_concurrent"))')"
    if [ -z "$GRAPH_FLAGS" ]; then  # never time the default under the graphs' name
        echo "graphs rows skipped: no flags from gpu_profile.xla_flags" \
            | tee "$OUT/graphs/train_throughput.txt"
    else
        echo "XLA_FLAGS for the graphs rows: $GRAPH_FLAGS"
        XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$GRAPH_FLAGS" timeout -k 10 "${GRAPHS_S:-200}" \
            "$PYTHON" benchmarks/train_throughput.py --models resnet50 --batch-sizes 128 \
            --dtypes bfloat16 --losses ce --steps-per-call 39 --calls 2 \
            --multi ce,brier,mmce_weighted,label_smoothing,focal,flsd53 --multi-modes sequential \
            --json "$OUT/graphs/train_throughput.json" 2>&1 \
            | tee "$OUT/graphs/train_throughput.txt"
        echo "graphs exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/graphs/train_throughput.txt"
    fi
fi
if [ "$PART" = batch1024 ] || [ "$PART" = all ]; then
    timeout -k 10 "${PROFILE_1024_S:-180}" "$PYTHON" benchmarks/gpu_profile.py --batch 1024 \
        --no-profile --rounds 3 --out "$OUT/batch1024" \
        --variants default,before_bytes,convert_residual,mask_from_y,graph_conv,autodiff_bn \
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
