"""Time a full evaluation pass: calib_jax (compiled) vs a NumPy port of the reference's loops.

The pass is ECE + AdaECE + classwise ECE + MCE + NLL on one set of logits, and
separately the 100-temperature grid search by ECE. The NumPy port follows the
reference's modules line by line: each metric module computes its own softmax,
then loops over bins in Python (and over classes for classwise ECE);
``set_temperature_cv`` loops over the 100 temperatures and evaluates both NLL
and ECE at each (it always does, whichever criterion selects). It is
vectorised only inside a bin, as a straightforward port would be.

calib_jax runs ``metrics.summary`` (every metric from one softmax, one
compiled call) and ``calibration.temperature_grid_search``; the input checks
that every public call makes are included in its time.

Usage:
  python benchmarks/metrics_bench.py [--sizes 10000x100,100000x1000] [--repeats 3]
      [--json out.json]

Prints a table; timings are medians over repeats, after one warm-up call that
compiles (its time is reported as "compile").
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import calibration, metrics
from calib_jax.files import atomic_write_text

EDGES = metrics.bin_edges(15)


# --------------------------------------------------------------- NumPy loop port


def np_softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_binned(values, hits, lowers, uppers):
    ece, mce = 0.0, 0.0
    for lo, hi in zip(lowers, uppers):
        in_bin = (values > lo) & (values <= hi)
        prop = in_bin.mean()
        if prop > 0:
            gap = abs(values[in_bin].mean() - hits[in_bin].mean())
            ece += gap * prop
            mce = max(mce, gap)
    return ece, mce


def np_top_label(logits, labels):
    p = np_softmax(logits)
    return p.max(1), (p.argmax(1) == labels).astype(np.float32)


def np_ece(logits, labels):  # ECELoss
    conf, hits = np_top_label(logits, labels)
    return np_binned(conf, hits, EDGES[:-1], EDGES[1:])[0]


def np_mce(logits, labels):
    conf, hits = np_top_label(logits, labels)
    return np_binned(conf, hits, EDGES[:-1], EDGES[1:])[1]


def np_adaptive_ece(logits, labels):  # AdaptiveECELoss
    conf, hits = np_top_label(logits, labels)
    n = len(conf)
    edges = np.interp(np.linspace(0, n, 16), np.arange(n), np.sort(conf)).astype(np.float32)
    return np_binned(conf, hits, edges[:-1], edges[1:])[0]


def np_classwise_ece(logits, labels):  # ClasswiseECELoss
    p = np_softmax(logits)
    per_class = [np_binned(p[:, k], (labels == k).astype(np.float32), EDGES[:-1], EDGES[1:])[0]
                 for k in range(int(labels.max()) + 1)]
    return float(np.mean(per_class))


def np_nll(logits, labels):  # nn.CrossEntropyLoss
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


def np_pass(logits, labels):
    return (np_ece(logits, labels), np_adaptive_ece(logits, labels),
            np_classwise_ece(logits, labels), np_mce(logits, labels), np_nll(logits, labels))


def np_temperature_search(logits, labels):  # set_temperature_cv
    best_ece, best_nll, best_t, t = 1e7, 1e7, None, 0.1
    for _ in range(100):
        v_nll = np_nll(logits / np.float32(t), labels)
        v_ece = np_ece(logits / np.float32(t), labels)
        if best_nll > v_nll:
            best_nll = v_nll
        if best_ece > v_ece:
            best_ece, best_t = v_ece, t
        t += 0.1
    return best_t


# --------------------------------------------------------------- calib_jax


def jax_pass(logits, labels):
    values = jax.block_until_ready(metrics.summary(logits, labels))
    return tuple(values[k] for k in ("ece", "adaptive_ece", "classwise_ece", "mce", "nll"))


def jax_temperature_search(logits, labels):
    return jax.block_until_ready(calibration.temperature_grid_search(logits, labels).temperature)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def make_problem(n, c, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n).astype(np.int32)
    logits = rng.standard_normal((n, c)).astype(np.float32) * 2
    logits[np.arange(n), labels] += np.where(rng.random(n) < 0.7, 4.0, 0.0).astype(np.float32)
    return logits, labels


def bench_size(n, c, repeats, numpy_repeats):
    logits_np, labels_np = make_problem(n, c)
    logits, labels = jnp.asarray(logits_np), jnp.asarray(labels_np)
    rows = []
    whole = {}
    for name, ours, theirs in [
        ("eval pass (ECE+AdaECE+CW-ECE+MCE+NLL)", jax_pass, np_pass),
        ("100-temperature search (ECE)", jax_temperature_search, np_temperature_search),
    ]:
        start = time.perf_counter()
        got = ours(logits, labels)
        first = time.perf_counter() - start
        t_ours = timed(lambda: ours(logits, labels), repeats)
        t_np = timed(lambda: theirs(logits_np, labels_np), numpy_repeats)
        want = theirs(logits_np, labels_np)
        if name.startswith("eval"):
            agree = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want))))
        else:
            agree = abs(float(got) - float(np.float32(want)))
        rows.append(dict(size=f"{n}x{c}", what=name, calib_jax_s=t_ours, compile_s=first - t_ours,
                         numpy_loop_s=t_np, speedup=t_np / t_ours, max_abs_diff=agree))
        whole["calib_jax_s"] = whole.get("calib_jax_s", 0.0) + t_ours
        whole["compile_s"] = whole.get("compile_s", 0.0) + first - t_ours
        whole["numpy_loop_s"] = whole.get("numpy_loop_s", 0.0) + t_np
    rows.append(dict(size=f"{n}x{c}", what="**whole pass**", speedup=whole["numpy_loop_s"] /
                     whole["calib_jax_s"], max_abs_diff=max(r["max_abs_diff"] for r in rows),
                     **whole))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--sizes", default="10000x100,100000x1000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy-repeats", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        rows.extend(bench_size(n, c, args.repeats, args.numpy_repeats))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.local_device_count()} device(s)")
    header = ("| size | what | calib_jax (s) | compile (s) | NumPy loop port (s) | speed-up "
              "| max abs diff |")
    print(header)
    print("|" + "---|" * 7)
    for r in rows:
        print(f"| {r['size']} | {r['what']} | {r['calib_jax_s']:.4f} | {r['compile_s']:.2f} "
              f"| {r['numpy_loop_s']:.3f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.2e} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
