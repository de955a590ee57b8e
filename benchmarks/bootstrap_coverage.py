"""How often a bootstrap interval of ECE holds the population ECE, and what a bootstrap costs.

Simulated 10-class models (``calib_jax.bootstrap``'s docstring quotes the table this prints):
true logits ``z ~ 2 N(0, 1)`` per class and labels drawn from ``softmax(z)``, so a model whose
logits are ``z`` is calibrated and one with ``s z`` (``s > 1``) over-confident. The
population ECE of each model (and of each paired difference) is its ECE on
``--population`` examples; then, for each of ``--trials`` test sets of ``--test-size``
examples, a 95 % interval from ``--resamples`` resamples, by both methods, is checked for
holding it; the same for ``metrics.ece_sweep`` (monotonic sweep, against the population's
15-bin ECE: both estimate the model's true calibration error), with each row's mean test
estimate beside the population value (the estimators' bias). Last, the time of one
``bootstrap`` of ``metrics.ece``, of ``metrics.summary`` (every metric) over ``--time-size``
examples of ``--time-classes`` classes (10; 100 for CIFAR-100's size) and
``--time-resamples`` resamples (1,000), of ``metrics.bootstrap_summary`` (the same resamples
counted: one softmax and sort), and of ``ood.aurocs`` (both OOD scores) of those
examples against ``--time-ood-size`` others (26,032: SVHN's test set), each resampled on its
own (``groups=(0, 1)``; a sort per resample), and of ``ood.bootstrap_aurocs`` (the same
resamples counted, one sort), after the compiling call.

Usage:
  python benchmarks/bootstrap_coverage.py [--trials 40] [--test-size 2000]
      [--resamples 500] [--population 400000] [--time-size 10000] [--time-resamples 1000]
      [--time-ood-size 26032] [--time-classes 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import bootstrap, metrics, ood
from calib_jax.files import atomic_write_text

NUM_CLASSES = 10
CALIBRATED, LESS_OVERCONFIDENT, OVERCONFIDENT = 1.0, 1.1, 1.2


def draw(num_examples: int, seed: int, num_classes: int = NUM_CLASSES):
    """``(true logits [N, C] float32, labels [N])``: labels drawn from the logits' softmax."""
    rng = np.random.default_rng(seed)
    z = 2.0 * rng.standard_normal((num_examples, num_classes))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((num_examples, 1))).argmax(1)
    return jnp.asarray(z, jnp.float32), jnp.asarray(labels)


def ece_gap(better, worse, labels):
    """The paired difference ``ECE(worse) - ECE(better)``."""
    return metrics.ece(worse, labels) - metrics.ece(better, labels)


# (row, metric_fn, scales of the logits it is given, the population value's function). The
# sweep rows are measured against the population's 15-bin ECE, as the ECE rows: both
# estimate the same true calibration error, which that number approximates best.
ROWS = (("calibrated", metrics.ece, (CALIBRATED,), metrics.ece),
        ("over-confident", metrics.ece, (OVERCONFIDENT,), metrics.ece),
        ("difference, over-confident - calibrated", ece_gap, (CALIBRATED, OVERCONFIDENT),
         ece_gap),
        ("difference, over-confident - less so", ece_gap, (LESS_OVERCONFIDENT, OVERCONFIDENT),
         ece_gap),
        ("ECE_sweep, calibrated", metrics.ece_sweep, (CALIBRATED,), metrics.ece),
        ("ECE_sweep, over-confident", metrics.ece_sweep, (OVERCONFIDENT,), metrics.ece))


def coverage(args) -> list[dict]:
    z_pop, y_pop = draw(args.population, seed=10_000)
    rows = []
    for name, fn, scales, target in ROWS:
        population = float(target(*(s * z_pop for s in scales), y_pop))
        held = {m: 0 for m in bootstrap.METHODS}
        widths, estimates = [], []
        for trial in range(args.trials):
            z, y = draw(args.test_size, seed=trial)
            for method in bootstrap.METHODS:
                r = bootstrap.bootstrap(fn, *(s * z for s in scales), y,
                                        key=jax.random.key(trial),
                                        num_resamples=args.resamples, method=method)
                held[method] += bool(r.low <= population <= r.high)
            widths.append(float(r.high - r.low))
            estimates.append(float(r.value))
        rows.append({"row": name, "population": population, "held": held,
                     "trials": args.trials, "mean_width": float(np.mean(widths)),
                     "mean_estimate": float(np.mean(estimates))})
        print(f"| {name} | {100 * population:.2f} | {100 * np.mean(estimates):.2f} | "
              + " | ".join(f"{held[m]} / {args.trials}" for m in bootstrap.METHODS)
              + f" | {100 * np.mean(widths):.2f} |", flush=True)
    # The unpaired comparison of the last row: the two models' intervals, each on its own.
    z, y = draw(args.test_size, seed=0)
    apart = sum(float(r.high - r.low) for r in (
        bootstrap.bootstrap(metrics.ece, s * z, y, key=jax.random.key(0),
                            num_resamples=args.resamples)
        for s in (LESS_OVERCONFIDENT, OVERCONFIDENT)))
    print(f"(unpaired: the two intervals of the last row's models together {100 * apart:.2f} "
          f"wide, test set 0)")
    rows.append({"row": "unpaired widths, last row's models, test set 0", "width": apart})
    return rows


def timing(args) -> list[dict]:
    z, y = draw(args.time_size, seed=1, num_classes=args.time_classes)
    z_ood, _ = draw(args.time_ood_size, seed=2, num_classes=args.time_classes)
    out = []

    def generic(fn, arrays, groups):
        def run(key):
            return bootstrap.bootstrap(fn, *arrays, key=key, num_resamples=args.time_resamples,
                                       groups=groups)
        return run

    def counted_summary(key):
        return metrics.bootstrap_summary(1.2 * z, y, key=key, num_resamples=args.time_resamples)

    def counted_aurocs(key):
        return ood.bootstrap_aurocs(1.2 * z, 0.3 * z_ood, key=key,
                                    num_resamples=args.time_resamples)

    both = [args.time_size, args.time_ood_size]
    for name, run, examples in (
            ("metrics.ece", generic(metrics.ece, (1.2 * z, y), None), [args.time_size]),
            ("metrics.summary", generic(metrics.summary, (1.2 * z, y), None), [args.time_size]),
            ("metrics.bootstrap_summary", counted_summary, [args.time_size]),
            ("ood.aurocs", generic(ood.aurocs, (1.2 * z, 0.3 * z_ood), (0, 1)), both),
            ("ood.bootstrap_aurocs", counted_aurocs, both)):
        times = []
        for call in range(3):
            start = time.perf_counter()
            r = run(jax.random.key(call))
            jax.block_until_ready(r.samples)
            times.append(time.perf_counter() - start)
        row = {"metric": name, "examples": examples, "classes": args.time_classes,
               "resamples": args.time_resamples,
               "first_call_s": times[0], "later_call_s": float(np.median(times[1:]))}
        what = name if ".bootstrap_" in name else f"bootstrap of {name}"
        print(f"{what}, {' and '.join(map(str, examples))} x {args.time_classes}, "
              f"{args.time_resamples:,} resamples: first call {times[0]:.2f} s, then "
              f"{row['later_call_s']:.2f} s")
        out.append(row)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--population", type=int, default=400_000)
    parser.add_argument("--time-size", type=int, default=10_000)
    parser.add_argument("--time-resamples", type=int, default=1000)
    parser.add_argument("--time-ood-size", type=int, default=26_032)
    parser.add_argument("--time-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for field in ("trials", "test_size", "resamples", "population", "time_size",
                  "time_resamples", "time_ood_size", "time_classes"):
        least = 2 if field.endswith(("resamples", "classes")) else 1
        if getattr(args, field) < least:
            parser.error(f"--{field.replace('_', '-')} must be >= {least}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or ''}")
    print("| row | population ECE (%) | mean test estimate (%) | percentile held | basic held | "
          "mean basic width (%) |")
    print("| --- | --- | --- | --- | --- | --- |")
    report = {"coverage": coverage(args), "timing": timing(args), "args": vars(args)}
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
