"""Images/s of the real training loop's compiled call, including on-device batching and
augmentation.

Each row times ``calib_jax.train.train_steps`` -- the unit ``train_and_evaluate``
runs: ``--steps-per-call`` steps in one compiled call, each batch gathered from
device-resident uint8 data, cropped and flipped per example, normalised, then
forward + backward + clipped SGD -- for one model x batch size x dtype x loss, compiled
as the training loop compiles it on this device (``train.loop_functions``: on GPU with
cuDNN's convolutions in XLA's CUDA graphs, ``--no-graph-convolutions`` without; the
parameters as one vector on GPU, ``train.default_flat_params``, ``--param-layout`` to
choose).
Compile time (the first call) is reported apart. Optional rows:

* ``--per-step``: the old loop (``pipeline.train_batch`` + ``train.train_step``
  dispatched from Python every step) at the first configuration, for before/after;
* ``--multi``: K runs with different losses as one program
  (``train.multi_train_steps``, shared batches as in a table row; members
  vmapped and / or sequential, ``--multi-modes``), with the row's time
  relative to one single run;
* ``--eval``: the evaluation pass (``metrics.summary`` + the 100-temperature
  search) on 10,000 x C logits;
* ``--epoch-overhead``: what the training loop does besides training, per epoch
  (the validation pass over 5,000 images, as ``train_and_evaluate`` runs it) and per
  checkpoint (``RunCheckpoints.save`` synchronous, and asynchronous: the time
  training waits and the time until the files are complete), folded into the
  full-run estimate with a checkpoint after every epoch as the upper bound.

Rows run in priority order and the JSON is rewritten after every row, so a run
cut short still leaves its figures: the evaluation pass; the headline
configuration (first loss, dtype and batch size) with its per-step baseline and
epoch overhead; the configurations that change one of the three; the multi-run's
first mode; the rest; the multi-run's other modes. A row that fails (an XLA error, out of
memory) is printed and recorded with its error, the rows after it still run, and the script
then exits with status 1.
The full-run estimate is 350 epochs x 351 steps x 128 images at the measured
rate (plus the compile time).

Usage (GPU):  python benchmarks/train_throughput.py --models resnet50 --per-step \
    --multi ce,brier,mmce_weighted,label_smoothing,focal,flsd53 --eval --json out.json
Usage (CPU smoke): python benchmarks/train_throughput.py --models resnet8 \
    --batch-sizes 32 --steps-per-call 1 --calls 3 --dtypes float32 --losses ce
(``tests/test_train_throughput.py`` runs the table part's kinds of row at ResNet-8 size and
``tests/test_gpu_profile.py`` parses every command line of ``gpu_check.sh``, so that a lent GPU
session is not the first to find the scripts broken.)
Data are synthetic device-resident uint8 images (45,000 x 32 x 32 x 3), so the
input files are not counted; the augmentation and batching are. XLA options for
every row come from the environment (``XLA_FLAGS``, recorded in the JSON), e.g. the
CUDA-graph settings that ``gpu_check.sh profile`` times the six-loss row with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import calibration, metrics, models, train
from calib_jax.data import pipeline
from calib_jax.files import atomic_write_text

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# CIFAR-10's training and validation splits (the reference's 45,000 / 5,000), the paper's epochs.
NUM_TRAIN, NUM_VAL, EPOCHS = 45000, 5000, 350
#: The models the benchmarks time: the image models (their data is CIFAR-sized images).
IMAGE_MODELS = tuple(m for m in models.names() if m not in train.TEXT_MODELS)


def _timed_calls(call, state, calls):
    """(compile seconds, steady seconds per call, first call's metrics) of
    ``state, metrics = call(state)``."""
    start = time.perf_counter()
    state, first = call(state)
    first = jax.device_get(first)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        state, m = call(state)
    jax.block_until_ready(m)
    return compile_s, (time.perf_counter() - start) / calls, first


def _first_and_mean(run, repeats):
    """(seconds of the first, compiling call; mean seconds of ``repeats`` more) of ``run()``,
    which must wait for its own results."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return first, (time.perf_counter() - start) / repeats


def optimizer():
    """The reference's optimiser at its CIFAR-10 schedule (batch 128)."""
    return train.make_optimizer(train.piecewise_lr(0.1, NUM_TRAIN // 128))


def model_and_optimizer(name, dtype):
    """The benchmark's model (10 classes, ``dtype`` a key of :data:`DTYPES`) and optimiser."""
    return models.get(name, 10, dtype=DTYPES[dtype]), optimizer()


def _state(name, dtype, seed=0):
    model, tx = model_and_optimizer(name, dtype)
    return model, tx, train.create_train_state(jax.random.PRNGKey(seed), model, tx,
                                               models.input_shape(name))


def _val_split(num_val):
    """Random validation images on the host, like the loop's validation split."""
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (num_val, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, num_val))


def synthetic_train_data():
    """``(images, labels, order)``: the benchmark's training split on the device (random
    uint8 images and labels, CIFAR-10's 45,000 x 32 x 32 x 3) and epoch 0's order."""
    rng = np.random.default_rng(0)
    x_dev, y_dev = pipeline.put_on_device(
        rng.integers(0, 256, (NUM_TRAIN, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, NUM_TRAIN))
    return x_dev, y_dev, pipeline.epoch_order(0, 0, NUM_TRAIN)


def _steps_per_call(args, batch_size):
    return max(1, min(args.steps_per_call, NUM_TRAIN // batch_size))


def _loop(args):
    """``(train_steps, multi_train_steps, fields)`` as the training loop runs them on this
    device, with ``--param-layout`` and ``--graph-convolutions``; ``fields``: what a row
    records of how its call was compiled (``flat_params``, ``compiler_options``)."""
    platform = jax.devices()[0].platform
    options = train.loop_compiler_options(platform, graph_convolutions=args.graph_convolutions)
    steps, multi_steps = train._loop_jits(options)
    return steps, multi_steps, {
        "flat_params": train._param_layout_is_flat(args.param_layout, platform),
        "compiler_options": options}


def _unroll(args, members=1):
    """``--unroll``, or (0) the training loop's own default for this device and member
    count (``train.default_unroll``), so each row times what ``train_and_evaluate`` runs."""
    return args.unroll or train.default_unroll(jax.devices()[0].platform, members)


def loss_agreement(got, want, tolerance=1e-2):
    """How two loss trajectories of the same start and batches agree: the first step's
    relative difference (only the forward pass's rounding differs there), the largest over
    all steps, and how many leading steps stay within ``tolerance``.

    On the benchmark's synthetic task (random images, random labels, learning rate 0.1)
    training is chaotic: two programs that round differently (bfloat16 vs float32, another
    convolution algorithm) drift apart by tens of percent within 39 steps (measured on an
    H200), so the first step, not the maximum, is the check of equal computation."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rel = np.abs(got - want) / np.abs(want)
    outside = np.flatnonzero(rel > tolerance)
    return {"first_step_rel_diff": float(rel[0]), "max_rel_diff": float(rel.max()),
            "steps_within_1pct": int(outside[0]) if outside.size else int(rel.size),
            "steps": int(rel.size)}


def _agreement_text(a):
    return (f"first-step loss within {a['first_step_rel_diff']:.1e}, within 1% for "
            f"{a['steps_within_1pct']}/{a['steps']} steps")


def bench_model(args, name, batch_size, dtype, loss, data):
    x_dev, y_dev, order = data
    _, _, state = _state(name, dtype)
    n, unroll = _steps_per_call(args, batch_size), _unroll(args)
    steps, _, loop_fields = _loop(args)

    def call(s):
        return steps(s, x_dev, y_dev, order, 0, 0, 0, num_steps=n, loss_name=loss,
                     batch_size=batch_size, mean=MEAN, std=STD, dtype=DTYPES[dtype],
                     unroll=unroll, flat_params=loop_fields["flat_params"])

    compile_s, per_call, first = _timed_calls(call, state, args.calls)
    rate = n * batch_size / per_call
    return {"model": name, "batch": batch_size, "dtype": dtype, "loss": loss,
            "steps_per_call": n, "unroll": unroll, **loop_fields,
            "img_per_s": rate, "compile_s": compile_s,
            "first_call_losses": [float(v) for v in first["loss"]],
            "full_run_min": EPOCHS * (NUM_TRAIN // batch_size) * batch_size / rate / 60}


def bench_per_step(args, name, batch_size, dtype, loss, data, chunk_losses):
    """The per-step Python loop (what the training loop did before train_steps), and the
    largest relative difference of its first ``n`` losses to ``train_steps``' (same
    initial state, same batches: the correctness check of the chunked loop)."""
    x_dev, y_dev, order = data
    _, _, state = _state(name, dtype)
    n = _steps_per_call(args, batch_size)

    def call(s):
        losses = []
        for i in range(n):
            xb, yb = pipeline.train_batch(x_dev, y_dev, order, i, seed=0, epoch=0,
                                          batch_size=batch_size)
            s, m = train.train_step(s, xb, yb, 0, loss_name=loss, mean=MEAN, std=STD,
                                    dtype=DTYPES[dtype])
            losses.append(m["loss"])
        return s, {"loss": jnp.stack(losses)}

    compile_s, per_call, first = _timed_calls(call, state, args.calls)
    return {"model": name, "batch": batch_size, "dtype": dtype, "loss": loss,
            "mode": "per-step loop", "img_per_s": n * batch_size / per_call,
            "compile_s": compile_s,
            "losses_vs_train_steps": loss_agreement(first["loss"], chunk_losses)}


def bench_multi(args, name, batch_size, dtype, losses, data, single_row, mode):
    """K members with ``losses`` as one program; its member with the single row's loss
    (same initialisation, same batches) is compared with that row's losses."""
    x_dev, y_dev, order = data
    model, tx, _ = _state(name, dtype)
    stacked = train.stack_states([
        train.create_train_state(jax.random.PRNGKey(0), model, tx, models.input_shape(name))
        for _ in losses])
    orders = jnp.stack([order] * len(losses))
    seeds = jnp.zeros(len(losses), jnp.int32)
    n, unroll = _steps_per_call(args, batch_size), _unroll(args, len(losses))
    _, multi_steps, loop_fields = _loop(args)

    def call(s):
        return multi_steps(s, x_dev, y_dev, orders, 0, 0, seeds, num_steps=n,
                           losses_=tuple(losses), shared_batch=True, batch_size=batch_size,
                           mean=MEAN, std=STD, dtype=DTYPES[dtype], members=mode,
                           unroll=unroll, flat_params=loop_fields["flat_params"])

    compile_s, per_call, first = _timed_calls(call, stacked, args.calls)
    rate = n * batch_size / per_call  # images per second seen by each member
    # The loop's per-epoch validation of the K members (the trained state was donated:
    # a fresh stack of the same shapes times the same).
    stacked = train.stack_states([
        train.create_train_state(jax.random.PRNGKey(0), model, tx, models.input_shape(name))
        for _ in losses])
    images, labels = _val_split(NUM_VAL)

    def validate():  # what train_and_evaluate runs after each epoch
        return train._validate_members(stacked, images, labels, len(losses), mode, mean=MEAN,
                                       std=STD, dtype=DTYPES[dtype], batch_size=500)

    val_compile_s, val_s = _first_and_mean(validate, 2)
    single_rate = single_row["img_per_s"]
    agreement, member_losses = None, None
    if single_row["loss"] in losses:
        member_losses = np.asarray(first["loss"])[:, losses.index(single_row["loss"])]
        agreement = loss_agreement(member_losses, single_row["first_call_losses"])
        member_losses = [float(v) for v in member_losses]
    return {"model": name, "batch": batch_size, "dtype": dtype, "loss": "+".join(losses),
            "runs": len(losses), "members": mode, "unroll": unroll,
            **loop_fields,
            "img_per_s": rate,
            "losses_vs_single_run": agreement, "member_losses": member_losses,
            "compile_s": compile_s,
            "row_time_over_single_run": (single_rate / rate) if single_rate else None,
            "val_pass_s": val_s, "val_compile_s": val_compile_s, "val_images": NUM_VAL,
            "full_row_min": EPOCHS * (NUM_TRAIN // batch_size) * batch_size / rate / 60}


def bench_epoch_overhead(name, batch_size, dtype, single_row, repeats=3):
    """Seconds per epoch of the validation pass, and per checkpoint of a synchronous and an
    asynchronous save (blocking part, and until complete), for ``name``'s state."""
    import tempfile

    from calib_jax import checkpoints
    _, _, state = _state(name, dtype)
    images, labels = _val_split(NUM_VAL)

    def validate():  # what train_and_evaluate runs after each epoch
        return train._validate_members(state, images, labels, 1, "vmap", mean=MEAN, std=STD,
                                       dtype=DTYPES[dtype], batch_size=500)

    val_compile, val_s = _first_and_mean(validate, repeats)
    state_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(
        checkpoints.state_to_tree(state))) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for mode in ("sync", "async"):
            ckpt = checkpoints.RunCheckpoints(f"{tmp}/{mode}", async_save=mode == "async")
            ckpt.save(1, state, {})  # the first save sets up Orbax's threads and metadata
            ckpt.wait()
            start = time.perf_counter()
            ckpt.save(2, state, {})
            returned = time.perf_counter() - start
            ckpt.wait()
            timings[mode] = (returned, time.perf_counter() - start)
            ckpt.close()
    epoch_train_s = (NUM_TRAIN // batch_size) * batch_size / single_row["img_per_s"]
    per_epoch = {mode: epoch_train_s + val_s + t[0] for mode, t in timings.items()}
    return {"model": name, "batch": batch_size, "dtype": dtype, "epoch_overhead": True,
            "val_pass_s": val_s, "val_compile_s": val_compile, "val_images": NUM_VAL,
            "state_mb": state_mb, "ckpt_sync_s": timings["sync"][0],
            "ckpt_async_blocking_s": timings["async"][0],
            "ckpt_async_complete_s": timings["async"][1], "train_epoch_s": epoch_train_s,
            "full_run_min_ckpt_every_epoch": {m: EPOCHS * v / 60 for m, v in per_epoch.items()}}


def bench_eval(num_classes=10, n=10000, repeats=5):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((n, num_classes)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, n))

    def run():
        jax.block_until_ready((metrics.summary(logits, labels),
                               calibration.temperature_grid_search(logits, labels).ece))

    compile_s, pass_s = _first_and_mean(run, repeats)
    return {"eval_pass_s": pass_s, "compile_s": compile_s, "logits": f"{n}x{num_classes}"}


def _print_row(r):
    if "epoch_overhead" in r:
        full = r["full_run_min_ckpt_every_epoch"]
        print(f"epoch overhead ({r['model']}, {r['dtype']}): validation pass "
              f"{r['val_pass_s'] * 1000:.0f} ms / {r['val_images']} images (compile "
              f"{r['val_compile_s']:.1f} s); checkpoint of {r['state_mb']:.0f} MB: sync "
              f"{r['ckpt_sync_s'] * 1000:.0f} ms, async {r['ckpt_async_blocking_s'] * 1000:.0f} ms "
              f"blocking ({r['ckpt_async_complete_s'] * 1000:.0f} ms to complete); 350 epochs at "
              f"batch {r['batch']} with validation and a checkpoint every epoch: "
              f"{full['async']:.1f} min (sync saves: {full['sync']:.1f})", flush=True)
    elif "eval_pass_s" in r:
        print(f"evaluation pass (summary + 100-T search) on {r['logits']}: "
              f"{r['eval_pass_s'] * 1000:.1f} ms after {r['compile_s']:.1f} s compile", flush=True)
    elif "runs" in r:
        ratio = r["row_time_over_single_run"]
        agreement = r["losses_vs_single_run"]
        print(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['runs']} runs ({r['members']}) | "
              f"{r['img_per_s']:,.0f} per run ({r['img_per_s'] * r['runs']:,.0f} in all; row = "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} one run; {r['full_row_min']:.1f} "
              f"min for 350 epochs; vs the single run: "
              f"{'-' if agreement is None else _agreement_text(agreement)}; validation of "
              f"the {r['runs']} runs: {r['val_pass_s'] * 1000:.0f} ms / {r['val_images']} "
              f"images) | "
              f"{r['compile_s']:.1f} |", flush=True)
    else:
        if "mode" in r:
            extra = (f" ({r['mode']}; vs train_steps: "
                     f"{_agreement_text(r['losses_vs_train_steps'])})")
        else:
            unrolled = f", unroll {r['unroll']}" if r.get("unroll", 1) > 1 else ""
            unrolled += ", flat params" if r.get("flat_params") else ""
            unrolled += ", graph convs" if r.get("compiler_options") else ""
            extra = (f" ({r['steps_per_call']}/call{unrolled}; "
                     f"350 epochs: {r['full_run_min']:.1f} min)")
        print(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['loss']}{extra} | "
              f"{r['img_per_s']:,.0f} | {r['compile_s']:.1f} |", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``; None: ``sys.argv``); exits with a usage error on a bad one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--losses", default="ce,flsd53")
    parser.add_argument("--steps-per-call", type=int, default=50,
                        help="steps per compiled call (1 on CPU: jax-ml/jax#12868)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls after the compiling one")
    parser.add_argument("--unroll", type=int, default=0,
                        help="lax.scan unroll of each call's steps (0 = train.default_unroll: "
                             "the training loop's default for this device)")
    parser.add_argument("--param-layout", default="auto", choices=train.PARAM_LAYOUTS,
                        help="the parameters in the loop: auto (the training loop's default, "
                             "train.default_flat_params), flat or tree")
    parser.add_argument("--graph-convolutions", action=argparse.BooleanOptionalAction,
                        default=True, help="on GPU, cuDNN's convolutions in XLA's CUDA graphs "
                        "(the training loop's default, train.loop_compiler_options)")
    parser.add_argument("--per-step", action="store_true",
                        help="also time the per-step Python loop at the first configuration")
    parser.add_argument("--multi", default="", help="losses of a vmapped multi-run at the first "
                        "batch size, e.g. ce,brier,mmce_weighted,label_smoothing,focal,flsd53")
    parser.add_argument("--multi-modes", default="vmap,sequential",
                        help="how the multi-run's members share the program")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--epoch-overhead", action="store_true",
                        help="time the per-epoch validation pass and checkpoint saves")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.unroll < 0:
        parser.error(f"--unroll must be >= 0 (0 = the training loop's default), got {args.unroll}")
    # Names and sizes are checked here, not row by row: a typo in gpu_check.sh would otherwise
    # cost its rows' GPU time in a session, each failing on its own.
    for flag, allowed in (("models", IMAGE_MODELS), ("dtypes", tuple(DTYPES)),
                          ("losses", train.LOSS_NAMES), ("multi", train.LOSS_NAMES),
                          ("multi_modes", train.MEMBER_MODES)):
        text = getattr(args, flag)
        unknown = [v for v in text.split(",") if v not in allowed] if text else []
        if unknown:
            parser.error(f"--{flag.replace('_', '-')}: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(allowed)}")
    if not all(b.strip().isdigit() and int(b) >= 1 for b in args.batch_sizes.split(",")):
        parser.error(f"--batch-sizes takes positive integers, e.g. 128,1024; got {args.batch_sizes}")
    require_at_least_one(parser, args, ("steps_per_call", "calls"))
    return args


def require_at_least_one(parser, args, flags) -> None:
    """A usage error for the first of ``flags`` (argparse destinations) below 1."""
    for flag in flags:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def main(argv=None) -> int:
    """Runs the rows (see the module docstring); returns the exit status: 1 when a row
    failed (every other row still ran and is in the table and the JSON), else 0."""
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"{platform.machine()}"
          + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    data = synthetic_train_data()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtypes, losses = args.dtypes.split(","), args.losses.split(",")
    rows = []

    def save():  # atomically, after every row: a run cut short keeps what it measured
        if args.json:
            atomic_write_text(args.json, json.dumps(
                {"device": device.device_kind, "jax": jax.__version__,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, indent=2))

    def record(r):
        rows.append(r)
        _print_row(r)
        save()

    def attempt(label, bench, *bench_args):
        """Runs one row; a row that fails (an XLA error, out of memory) is printed and
        recorded, and the rows after it still run."""
        try:
            r = bench(*bench_args)
        except Exception as error:  # noqa: BLE001 - reported, never swallowed silently
            r = {"row": label, "error": f"{type(error).__name__}: {str(error)[:1000]}"}
            print(f"row {label} failed: {r['error']}", flush=True)
            rows.append(r)
            save()
            return None
        record(r)
        return r

    if args.eval:
        attempt("eval", bench_eval)
    print("| model | batch | dtype | loss | img/s | compile (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    modes = args.multi_modes.split(",") if args.multi else []
    for name in args.models.split(","):
        # Priority order: the headline row (first loss, dtype and batch size) with its
        # per-step baseline and epoch overhead; the rows that change one of the three; the
        # multi-run's first mode; the other rows; the multi-run's other modes. (On an H200 a
        # ResNet-50 row compiles in 15-40 s, the six-member sequential program in 86-110 s.)
        grid = sorted(((li, di, bi) for li in range(len(losses)) for di in range(len(dtypes))
                       for bi in range(len(batches))), key=lambda c: (sum(c), c))
        first_mode_after = max(i for i, c in enumerate(grid) if sum(c) <= 1)
        headline = None

        def multi(mode_list):
            for mode in mode_list:
                attempt(f"multi-{mode}", bench_multi, args, name, headline["batch"],
                        headline["dtype"], args.multi.split(","), data, headline, mode)

        for position, (li, di, bi) in enumerate(grid):
            loss, dtype, bs = losses[li], dtypes[di], batches[bi]
            r = attempt(f"{name}/{bs}/{dtype}/{loss}", bench_model, args, name, bs, dtype, loss,
                        data)
            if position == 0 and r is not None:
                headline = r
                if args.per_step:
                    attempt("per-step", bench_per_step, args, name, bs, dtype, loss, data,
                            np.asarray(r["first_call_losses"]))
                if args.epoch_overhead:
                    attempt("epoch-overhead", bench_epoch_overhead, name, bs, dtype, r)
            if position == first_mode_after and headline is not None:
                multi(modes[:1])
        if headline is not None:
            multi(modes[1:])
    failed = [r["row"] for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
