"""Images/s of the real training step, including on-device batching and augmentation.

For each model x batch size x dtype x loss: one jitted step of
``calib_jax.train.train_step`` fed by ``calib_jax.data.pipeline.train_batch``
(gather from device-resident uint8 data + per-example crop and flip), waited
for once per measured window. Compile time (first call) is reported
separately. ``--multi K`` also times K runs with different losses as one
vmapped program (``train.multi_train_step``), and ``--eval`` times the
evaluation pass (``metrics.summary`` + the 100-temperature search) on 10,000
x C logits.

Usage (GPU):  python benchmarks/train_throughput.py --models resnet50 --json out.json
Usage (CPU smoke): python benchmarks/train_throughput.py --models resnet8 \
    --batch-sizes 32 --steps 3 --dtypes float32 --losses ce
Data are synthetic device-resident uint8 images (45,000 x 32 x 32 x 3), so the
input files are not counted; the augmentation and batching are.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import calibration, metrics, models, train
from calib_jax.data import pipeline

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _timed_steps(step_fn, state, x_dev, y_dev, order, batch_size, steps):
    """(state, compile seconds, steady img/s) for ``steps`` steps after the first."""
    def batch(i):
        return pipeline.train_batch(x_dev, y_dev, order, i % (len(order) // batch_size), seed=0,
                                    epoch=0, batch_size=batch_size)

    start = time.perf_counter()
    state, m = step_fn(state, *batch(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, steps + 1):
        state, m = step_fn(state, *batch(i))
    jax.block_until_ready(m)
    return state, compile_s, steps * batch_size / (time.perf_counter() - start)


def bench_model(name, batch_size, dtype, loss, steps, x_dev, y_dev, order):
    model = models.get(name, 10, dtype=DTYPES[dtype])
    state = train.create_train_state(jax.random.PRNGKey(0), model,
                                     train.make_optimizer(train.piecewise_lr(0.1, 351)),
                                     models.input_shape(name))

    def step(s, x, y):
        return train.train_step(s, x, y, 0, loss_name=loss, mean=MEAN, std=STD,
                                dtype=DTYPES[dtype])

    _, compile_s, rate = _timed_steps(step, state, x_dev, y_dev, order, batch_size, steps)
    return {"model": name, "batch": batch_size, "dtype": dtype, "loss": loss,
            "img_per_s": rate, "compile_s": compile_s}


def bench_multi(name, batch_size, dtype, losses, steps, x_dev, y_dev, order):
    model = models.get(name, 10, dtype=DTYPES[dtype])
    tx = train.make_optimizer(train.piecewise_lr(0.1, 351))
    states = [train.create_train_state(jax.random.PRNGKey(k), model, tx, models.input_shape(name))
              for k in range(len(losses))]
    stacked = train.stack_states(states)

    def step(s, x, y):
        return train.multi_train_step(s, x, y, 0, losses_=tuple(losses), mean=MEAN, std=STD,
                                      dtype=DTYPES[dtype])

    _, compile_s, rate = _timed_steps(step, stacked, x_dev, y_dev, order, batch_size, steps)
    return {"model": name, "batch": batch_size, "dtype": dtype, "loss": "+".join(losses),
            "img_per_s": rate, "compile_s": compile_s, "runs": len(losses),
            "run_img_per_s": rate * len(losses)}


def bench_eval(num_classes=10, n=10000, repeats=5):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((n, num_classes)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, n))

    def run():
        jax.block_until_ready((metrics.summary(logits, labels),
                               calibration.temperature_grid_search(logits, labels).ece))

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return {"eval_pass_s": (time.perf_counter() - start) / repeats, "compile_s": compile_s,
            "logits": f"{n}x{num_classes}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--losses", default="ce,flsd53")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--multi", default="", help="losses of a vmapped multi-run at the first "
                        "batch size, e.g. ce,brier,mmce_weighted,label_smoothing,focal,flsd53")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"{platform.machine()}")
    rng = np.random.default_rng(0)
    x_dev, y_dev = pipeline.put_on_device(
        rng.integers(0, 256, (45000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 45000))
    order = pipeline.epoch_order(0, 0, 45000)
    rows = []
    print("| model | batch | dtype | loss | img/s | compile (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            for dtype in args.dtypes.split(","):
                for loss in args.losses.split(","):
                    r = bench_model(name, bs, dtype, loss, args.steps, x_dev, y_dev, order)
                    rows.append(r)
                    print(f"| {name} | {bs} | {dtype} | {loss} | {r['img_per_s']:,.0f} | "
                          f"{r['compile_s']:.1f} |", flush=True)
            if args.multi and bs == int(args.batch_sizes.split(",")[0]):  # the first batch only
                r = bench_multi(name, bs, args.dtypes.split(",")[0], args.multi.split(","),
                                args.steps, x_dev, y_dev, order)
                rows.append(r)
                print(f"| {name} | {bs} | {r['dtype']} | {r['runs']} runs vmapped | "
                      f"{r['img_per_s']:,.0f} per run ({r['run_img_per_s']:,.0f} in all) | "
                      f"{r['compile_s']:.1f} |", flush=True)
    if args.eval:
        r = bench_eval()
        rows.append(r)
        print(f"evaluation pass (summary + 100-T search) on {r['logits']}: "
              f"{r['eval_pass_s'] * 1000:.1f} ms after {r['compile_s']:.1f} s compile")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
