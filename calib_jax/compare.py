"""Paired comparison of two evaluated runs on one test set: every metric's difference, with a
bootstrap interval.

``python -m calib_jax.compare --baseline runs/paper/cifar10/resnet50/ce --other
runs/paper/cifar10/resnet50/flsd53 [--bootstrap 1000] [--seed 0] [--json FILE]``

Each side is an evaluation directory (``eval_final/``, ...: one holding ``results.json`` and
``logits.npz``, which ``python -m calib_jax.evaluate`` writes) or a run directory, whose
table evaluation (``eval_<config.eval_checkpoint>``) is taken. The two must hold the same
test set (their test labels are compared, and the fingerprints of their test sets where both
evaluations recorded them: :func:`calib_jax.data.datasets.fingerprint`). For every metric of
the evaluation report (error, NLL, ECE, AdaECE, classwise ECE, MCE), before and after each
run's own temperature, it prints ``other - baseline`` with the basic 95 % interval of
``--bootstrap`` resamples of the test set, the same resamples for both runs (paired: the test
set's shared difficulty cancels, so the interval is narrower than the two runs' own intervals
together), and how many resamples put ``other`` below ``baseline``. OOD AUROC (entropy and
confidence) is compared on every OOD set both evaluations hold with as many examples: the
test set with the same resamples, the OOD set resampled independently of it (the same OOD
resamples for both runs); an OOD set whose fingerprints differ (e.g. CIFAR-10-C from the
release's files in one evaluation and generated in the other: one name, one size, other
images) is left out, and one that an evaluation from before fingerprints holds is compared by
name and size alone and named as unverified (``ood_unverified``); the others are named as
left out. The temperatures are held fixed (chosen on the validation split), as the
evaluation reports them. See :mod:`calib_jax.bootstrap` on what an interval
of a calibration error's difference means (measured coverage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from calib_jax import bootstrap, calibration, evaluate, metrics, ood
from calib_jax.files import atomic_write_text

__all__ = ["ComparisonRefused", "auroc_difference", "compare", "evaluation_dir",
           "markdown_comparison", "summary_difference"]


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


def _minus(other: dict, base: dict) -> dict:
    """``other - base``, key by key."""
    return {name: other[name] - base[name] for name in base}


def summary_difference(baseline_logits, other_logits, labels) -> dict:
    """``metrics.summary(other) - metrics.summary(baseline)``, metric by metric (jittable:
    :func:`compare` bootstraps it)."""
    return _minus(metrics.summary(other_logits, labels), metrics.summary(baseline_logits, labels))


def _summary_pair(baseline_logits, other_logits, labels):
    # summary_difference's arguments, each run's softmax, bins and order computed once.
    return (metrics.summary_context(baseline_logits, labels),
            metrics.summary_context(other_logits, labels))


def _summary_difference_from_counts(summary_pair, counts) -> dict:
    """:func:`summary_difference` of the resample with these counts (no softmax or sort per
    resample)."""
    base, other = (metrics.summary_from_counts(context, counts) for context in summary_pair)
    return _minus(other, base)


def auroc_difference(baseline_in, other_in, baseline_out, other_out) -> dict:
    """Each OOD score's AUROC of ``other`` minus ``baseline``'s (in-distribution test logits,
    OOD logits; jittable)."""
    return _minus(ood.aurocs(other_in, other_out), ood.aurocs(baseline_in, baseline_out))


def _ranked_pair(baseline_in, other_in, baseline_out, other_out):
    # auroc_difference's arguments, each run's scores ordered once (bootstrap_by_counts).
    return (ood.ranked_scores(baseline_in, baseline_out),
            ood.ranked_scores(other_in, other_out))


def _auroc_difference_from_counts(ranked_pair, in_counts, out_counts) -> dict:
    """:func:`auroc_difference` of the resample with these counts (no sort per resample)."""
    base, other = (ood.aurocs_from_counts(r, in_counts, out_counts) for r in ranked_pair)
    return _minus(other, base)


def compare(baseline, other, *, num_resamples: int = 1000, seed: int = 0) -> dict:
    """The comparison (see the module docstring) as a dict: ``{"baseline", "other",
    "num_resamples", "seed", "temperature", "ood_left_out": {set: why}, "ood_unverified":
    {set: why}, "before": {metric: {"baseline", "other", "difference", "basic_95": [low,
    high], "percentile_95": [low, high], "other_lower": count}, "ood_auroc": {set: {score:
    {...}}}}, "after": ...}``;
    ``baseline`` and ``other`` are evaluation or run directories."""
    bootstrap.check_num_resamples(num_resamples)
    key = bootstrap.seed_key(seed)
    num_resamples, seed = int(num_resamples), int(seed)  # NumPy ints too: the report is JSON
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
    data = [results.get("data", {}) for results in (base_results, other_results)]
    fingerprints = [d.get("fingerprints", {}) for d in data]
    if None not in (tests := [f.get("test") for f in fingerprints]) and tests[0] != tests[1]:
        raise ComparisonRefused(
            f"{dirs[0]} and {dirs[1]} were evaluated on different test sets (the same labels, "
            f"other inputs: fingerprints {tests[0][:19]}... and {tests[1][:19]}...; from "
            f"{data[0].get('test')} and {data[1].get('test')}); compare runs evaluated on one "
            f"copy of the data set")
    ood_names, ood_left_out, ood_unverified = _common_ood_sets(base, oth, dirs, data)
    report = {"baseline": str(dirs[0]), "other": str(dirs[1]), "num_resamples": num_resamples,
              "seed": seed, "temperature": {"baseline": float(base["temperature"]),
                                            "other": float(oth["temperature"])},
              "ood_left_out": ood_left_out, "ood_unverified": ood_unverified}
    labels = jnp.asarray(labels_a)
    for tag in ("before", "after"):
        # Each run's own T after scaling, as its evaluation reports it.
        scales = [float(saved["temperature"]) if tag == "after" else 1.0 for saved in (base, oth)]
        z = [calibration.apply_temperature(saved["test_logits"], scale)
             for saved, scale in zip((base, oth), scales)]
        # summary_difference's resamples, counted.
        result = bootstrap.bootstrap_by_counts(_summary_pair, _summary_difference_from_counts,
                                               z[0], z[1], labels, key=key,
                                               num_resamples=num_resamples)
        report[tag] = {name: _row(result, name, base_results["test"][tag][name],
                                  other_results["test"][tag][name])
                       for name in evaluate.METRIC_NAMES}
        report[tag]["ood_auroc"] = {}
        for name in ood_names:
            z_out = [calibration.apply_temperature(saved[f"ood_logits_{name}"], scale)
                     for saved, scale in zip((base, oth), scales)]
            # The test set drawn with the indices above (group 0), the OOD set on its own;
            # auroc_difference's resamples, counted (one sort per run, not per resample).
            result = bootstrap.bootstrap_by_counts(
                _ranked_pair, _auroc_difference_from_counts, z[0], z[1], z_out[0], z_out[1],
                key=key, num_resamples=num_resamples, groups=(0, 0, 1, 1))
            report[tag]["ood_auroc"][name] = {
                score: _row(result, score, base_results["test"][tag]["ood_auroc"][name][score],
                            other_results["test"][tag]["ood_auroc"][name][score])
                for score in ood.SCORES}
    return report


def _row(result, name, baseline_value, other_value) -> dict:
    basic = bootstrap.interval(result.value[name], result.samples[name], method="basic")
    return {"baseline": baseline_value, "other": other_value,
            "difference": float(result.value[name]),
            "basic_95": [float(basic[0]), float(basic[1])],
            "percentile_95": [float(result.low[name]), float(result.high[name])],
            "other_lower": int(np.sum(np.asarray(result.samples[name]) < 0))}


def _common_ood_sets(base, other, dirs, data) -> tuple[list, dict, dict]:
    """``(compared, left out, unverified)``: the OOD sets both evaluations hold with as many
    examples and, where both recorded them, the same fingerprint; why each other set is left
    out; which compared sets an evaluation without fingerprints (an earlier version) leaves
    identified by name and size alone."""
    names = [{k[len("ood_logits_"):] for k in saved if k.startswith("ood_logits_")}
             for saved in (base, other)]
    common, left_out, unverified = [], {}, {}
    for name in sorted(names[0] | names[1]):
        if name not in names[0] or name not in names[1]:
            left_out[name] = f"only {dirs[0 if name in names[0] else 1]} evaluated it"
            continue
        sizes = [len(saved[f"ood_logits_{name}"]) for saved in (base, other)]
        if sizes[0] != sizes[1]:
            left_out[name] = f"{sizes[0]} and {sizes[1]} examples: not the same set"
            continue
        prints = [d.get("fingerprints", {}).get("ood", {}).get(name) for d in data]
        if None not in prints and prints[0] != prints[1]:
            where = [d.get("ood_sources", {}).get(name, "?") for d in data]
            left_out[name] = (f"other examples under one name and size (fingerprints differ; "
                              f"from {where[0]} and {where[1]})")
            continue
        if None in prints:
            old = [str(d) for d, p in zip(dirs, prints) if p is None]
            unverified[name] = (f"compared by name and size alone: {' and '.join(old)} "
                                f"recorded no fingerprint of it (evaluated by an earlier "
                                f"version; evaluate again to check)")
        common.append(name)
    return common, left_out, unverified


def markdown_comparison(report: dict) -> str:
    """The comparison as markdown (percent; NLL as is)."""
    lines = [f"`other` = {report['other']} (T = {report['temperature']['other']:.2f}) against "
             f"`baseline` = {report['baseline']} (T = {report['temperature']['baseline']:.2f}):"
             f" other - baseline on the same {report['num_resamples']:,} resamples of the test "
             f"set (seed {report['seed']}); 95 % basic bootstrap intervals.", "",
             "| metric | T | baseline | other | difference | 95 % interval | resamples with "
             "other lower |", "|" + " --- |" * 7]
    def line(name, label, row, scale, digits):
        def show(v):
            return evaluate.fixed(scale * v, digits)
        low, high = row["basic_95"]
        return (f"| {name} | {label} | {show(row['baseline'])} | {show(row['other'])} | "
                f"{'+' if row['difference'] > 0 else ''}{show(row['difference'])} | "
                f"{evaluate.fixed_interval(scale * low, scale * high, digits)} | "
                f"{row['other_lower']:,} of {report['num_resamples']:,} |")

    for tag, label in (("before", "1"), ("after", "each run's")):
        for name in evaluate.METRIC_NAMES:
            lines.append(line(name, label, report[tag][name],
                              *((1.0, 4) if name == "nll" else (100.0, 2))))
        for ood_name, scores in report[tag].get("ood_auroc", {}).items():
            for score, row in scores.items():
                lines.append(line(f"OOD AUROC {ood_name} ({score})", label, row, 100.0, 2))
    if any(report[tag].get("ood_auroc") for tag in ("before", "after")):
        lines.append("\nOOD AUROC: the test set's resamples above, each OOD set resampled "
                     "independently (the same OOD resamples for both runs); higher is better.")
    for name, why in report.get("ood_left_out", {}).items():
        lines.append(f"\nOOD set {name} not compared: {why}.")
    for name, why in report.get("ood_unverified", {}).items():
        lines.append(f"\nOOD set {name} {why}.")
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
    try:
        bootstrap.check_num_resamples(args.bootstrap, "--bootstrap")
        bootstrap.check_seed(args.seed, "--seed")
    except ValueError as e:
        parser.error(str(e))
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
