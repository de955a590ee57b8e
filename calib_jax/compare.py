"""Paired comparison of two evaluated runs on one test set: every metric's difference, with a
bootstrap interval.

``python -m calib_jax.compare --baseline runs/paper/cifar10/resnet50/ce --other
runs/paper/cifar10/resnet50/flsd53 [--bootstrap 1000] [--seed 0] [--json FILE]``

Each side is an evaluation directory (``eval_final/``, ...: one holding ``results.json`` and
``logits.npz``, which ``python -m calib_jax.evaluate`` writes) or a run directory, whose
table evaluation (``eval_<config.eval_checkpoint>``) is taken. The two must hold the same
test set (their test labels are compared). For every metric of the evaluation report (error,
NLL, ECE, AdaECE, classwise ECE, MCE), before and after each run's own temperature, it prints
``other - baseline`` with the basic 95 % interval of ``--bootstrap`` resamples of the test
set, the same resamples for both runs (paired: the test set's shared difficulty cancels, so
the interval is narrower than the two runs' own intervals together), and how many resamples
put ``other`` below ``baseline``. The temperatures are held fixed (chosen on the validation
split), as the evaluation reports them. See :mod:`calib_jax.bootstrap` on what an interval
of a calibration error's difference means (measured coverage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import bootstrap, calibration, evaluate, metrics
from calib_jax.files import atomic_write_text

__all__ = ["ComparisonRefused", "compare", "evaluation_dir", "markdown_comparison",
           "summary_difference"]


class ComparisonRefused(ValueError):
    """Two evaluations that cannot be compared as given (no logits saved, other test sets);
    the message says what to do instead."""


def evaluation_dir(path) -> Path:
    """``path`` if it holds an evaluation (``results.json``), else the table evaluation of the
    run in ``path`` (``eval_<config.eval_checkpoint>``)."""
    path = Path(path)
    if (path / "results.json").is_file():
        return path
    if (path / "config.json").is_file():
        found = evaluate.table_evaluation_dir(path)
        if (found / "results.json").is_file():
            return found
        raise ComparisonRefused(f"the run in {path} has no evaluation at {found}; evaluate it "
                                f"first: python -m calib_jax.evaluate --workdir {path}")
    group = (path / "members.json").is_file()
    raise ComparisonRefused(f"{path} holds neither an evaluation (results.json) nor a run "
                            f"(config.json); give an eval_* directory or a run directory" +
                            (" (this is a group of runs: give one of its members, "
                             f"{path}/<member>)" if group else ""))


def _load(eval_dir: Path) -> tuple[dict, dict]:
    results = json.loads((eval_dir / "results.json").read_text())
    path = eval_dir / evaluate.LOGITS_FILE
    if not path.is_file():
        raise ComparisonRefused(
            f"{eval_dir} has no {evaluate.LOGITS_FILE} (evaluations before calib_jax saved "
            f"logits lack it); evaluate the run again: python -m calib_jax.evaluate --workdir "
            f"{results['workdir']} --checkpoint {results['checkpoint']}")
    try:
        with np.load(path) as saved:
            arrays = {k: saved[k] for k in saved.files}
        missing = {"test_logits", "test_labels", "temperature"} - set(arrays)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))} in it")
    except Exception as error:  # truncated, not a zip, another file under the name
        raise ComparisonRefused(
            f"{path} cannot be read ({type(error).__name__}: {error}); evaluate the run again: "
            f"python -m calib_jax.evaluate --workdir {results['workdir']} --checkpoint "
            f"{results['checkpoint']}") from error
    return results, arrays


def summary_difference(baseline_logits, other_logits, labels) -> dict:
    """``metrics.summary(other) - metrics.summary(baseline)``, metric by metric (jittable:
    :func:`compare` bootstraps it)."""
    base, other = metrics.summary(baseline_logits, labels), metrics.summary(other_logits, labels)
    return {name: other[name] - base[name] for name in base}


def compare(baseline, other, *, num_resamples: int = 1000, seed: int = 0) -> dict:
    """The comparison (see the module docstring) as a dict: ``{"baseline", "other",
    "num_resamples", "seed", "before": {metric: {"baseline", "other", "difference",
    "basic_95": [low, high], "percentile_95": [low, high], "other_lower": count}}, "after":
    ...}``; ``baseline`` and ``other`` are evaluation or run directories."""
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or \
            num_resamples < 2:
        raise ValueError(f"`num_resamples` must be an int >= 2 (1000 is customary), got "
                         f"{num_resamples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"`seed` must be an int in [0, 2**32), got {seed!r}.")
    dirs = [evaluation_dir(baseline), evaluation_dir(other)]
    (base_results, base), (other_results, oth) = (_load(d) for d in dirs)
    labels_a, labels_b = base["test_labels"], oth["test_labels"]
    if labels_a.shape != labels_b.shape or not np.array_equal(labels_a, labels_b):
        what = (f"{len(labels_a)} and {len(labels_b)} test examples"
                if labels_a.shape != labels_b.shape else
                f"labels differing in {int(np.sum(labels_a != labels_b))} of {len(labels_a)} "
                f"test examples")
        raise ComparisonRefused(f"{dirs[0]} and {dirs[1]} were evaluated on different test "
                                f"sets ({what}); compare runs of one data set and split")
    report = {"baseline": str(dirs[0]), "other": str(dirs[1]), "num_resamples": num_resamples,
              "seed": seed, "temperature": {"baseline": float(base["temperature"]),
                                            "other": float(oth["temperature"])}}
    labels = jnp.asarray(labels_a)
    for tag in ("before", "after"):
        z = [calibration.apply_temperature(saved["test_logits"],
                                           float(saved["temperature"]) if tag == "after" else 1.0)
             for saved in (base, oth)]
        result = bootstrap.bootstrap(summary_difference, z[0], z[1], labels,
                                     key=jax.random.key(seed), num_resamples=num_resamples)
        basic = bootstrap.interval(result.value, result.samples, method="basic")
        report[tag] = {
            name: {"baseline": base_results["test"][tag][name],
                   "other": other_results["test"][tag][name],
                   "difference": float(result.value[name]),
                   "basic_95": [float(basic[0][name]), float(basic[1][name])],
                   "percentile_95": [float(result.low[name]), float(result.high[name])],
                   "other_lower": int(np.sum(np.asarray(result.samples[name]) < 0))}
            for name in evaluate.METRIC_NAMES}
    return report


def markdown_comparison(report: dict) -> str:
    """The comparison as markdown (percent; NLL as is)."""
    lines = [f"`other` = {report['other']} (T = {report['temperature']['other']:.2f}) against "
             f"`baseline` = {report['baseline']} (T = {report['temperature']['baseline']:.2f}):"
             f" other - baseline on the same {report['num_resamples']:,} resamples of the test "
             f"set (seed {report['seed']}); 95 % basic bootstrap intervals.", "",
             "| metric | T | baseline | other | difference | 95 % interval | resamples with "
             "other lower |", "|" + " --- |" * 7]
    for tag, label in (("before", "1"), ("after", "each run's")):
        for name in evaluate.METRIC_NAMES:
            row = report[tag][name]
            scale, digits = (1.0, 4) if name == "nll" else (100.0, 2)

            def show(v):
                return evaluate.fixed(scale * v, digits)
            low, high = row["basic_95"]
            lines.append(f"| {name} | {label} | {show(row['baseline'])} | {show(row['other'])} | "
                         f"{'+' if row['difference'] > 0 else ''}{show(row['difference'])} | "
                         f"[{show(low)}, {show(high)}] | {row['other_lower']:,} of "
                         f"{report['num_resamples']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--baseline", required=True, help="an eval_* directory or a run")
    parser.add_argument("--other", required=True, help="an eval_* directory or a run")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="resamples of the test set (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the resamples' seed (default 0)")
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    if args.bootstrap < 2:
        parser.error("--bootstrap must be >= 2 (1000 is customary)")
    if not 0 <= args.seed < 2 ** 32:
        parser.error("--seed must be in [0, 2**32)")
    try:
        report = compare(args.baseline, args.other, num_resamples=args.bootstrap, seed=args.seed)
    except (ComparisonRefused, FileNotFoundError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(markdown_comparison(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
