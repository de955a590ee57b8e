"""The evaluation pass: checkpoint -> logits -> temperature search -> calibration report.

``python -m calib_jax.evaluate --workdir runs/X [--checkpoint final|best|latest|EPOCH]
[--criterion ece|nll] [--out DIR] [--data-dir DIR]``

The checkpoint defaults to the run's ``config.eval_checkpoint``: ``final`` (the last epoch,
the reference's protocol for the image data sets) or ``best`` (the highest validation
accuracy, its protocol for 20 Newsgroups and SST).

A work directory of several runs trained as one program (``members.json``,
see ``calib_jax.train.run_members``) evaluates every member in its own
directory.

Reads the run's ``config.json``, restores the requested checkpoint, computes
logits on the validation, test and OOD sets (SVHN test and CIFAR-10-C Gaussian
noise for CIFAR runs; a set that is not available is skipped and recorded as
such), picks the temperature on the validation split (the reference's
100-point grid by ECE by default; the NLL grid and the continuous NLL fit are
reported too, the fit only where the NLL has a minimum at a finite T: else ``nll_fit`` is
null and ``nll_fit_none`` says why, e.g. every validation prediction right), and reports on
the test split before and after scaling: error, NLL, ECE, AdaECE, classwise ECE, MCE, and
OOD AUROC with the entropy and confidence scores, and beside them the less biased
monotonic-sweep ECE (:func:`calib_jax.metrics.ece_sweep`, not one of the paper's metrics). Writes
``results.json``, ``results.md``, ``logits.npz`` (the validation, test and OOD logits with
their labels and the chosen T: what
:mod:`calib_jax.compare` and a notebook need, without the model; ``results.json`` records
each data set's source and content fingerprint, :func:`calib_jax.data.datasets.fingerprint`,
which compare checks before pairing two runs' examples), reliability
diagrams, confidence histograms, temperature curves and ROC curves (PNG) to
``--out`` (default ``<workdir>/eval_<checkpoint>``, and ``eval_<checkpoint>_nll`` with
``--criterion nll``, so that the default, ECE-picked results that ``build_tables.py`` and the
sweep read are never replaced by another criterion's).

``--bootstrap N`` (e.g. 1000) adds 95 % bootstrap intervals of every test metric
(``ece_sweep`` too) before and after scaling (:func:`test_intervals`: ``N`` resamples of the
test set, the same ones before and after, T fixed; ``--bootstrap-seed`` picks them):
``results.json``'s ``test_intervals`` holds the percentile and basic intervals and the
standard error of each metric, ``results.md`` shows the basic ones. OOD AUROC's intervals
resample each OOD set too, independently of the test set (a two-sample bootstrap). Read
:mod:`calib_jax.bootstrap` on what an interval of a calibration error can and cannot say.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np

from calib_jax import bootstrap, calibration, checkpoints, metrics, ood, plots, train
from calib_jax.data import datasets, sources
from calib_jax.files import (atomic_save_figure, atomic_write_bytes, atomic_write_text,
                             unwritable_reason)

__all__ = ["EvaluationRefused", "LOGITS_FILE", "check_finished", "default_out_name",
           "evaluate_run", "fixed", "fixed_interval", "grid_edge_note", "markdown_report", "main",
           "member_dirs", "nll_fit_phrase", "table_checkpoint", "table_evaluation_dir",
           "test_intervals", "test_report", "write_logits"]

OOD_SETS = {"cifar10": ("svhn", "cifar10_c"), "cifar100": ("svhn", "cifar10_c"),
            "synthetic": ("synthetic_c",)}
METRIC_NAMES = ("error", "nll", "ece", "adaptive_ece", "classwise_ece", "mce")


class EvaluationRefused(ValueError):
    """A run or checkpoint that cannot be evaluated as asked (not finished, diverged, its last
    checkpoint unreadable; an ``out`` that is a file); the message says what to pass instead."""


def load_run_config(workdir) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a calib_jax training run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_checkpoint(config, workdir, which: str, num_classes: int, example_shape):
    template = train.abstract_state_for_config(config, num_classes, example_shape)
    ckpt = checkpoints.RunCheckpoints(workdir)
    try:
        which_key = "latest" if which == "final" else which
        restored = ckpt.restore(template, int(which_key) if which_key.isdigit() else which_key)
    finally:
        ckpt.close()
    if restored is None:
        unreadable = checkpoints.saved_epochs(workdir, "best" if which == "best" else "latest")
        if not unreadable:
            raise FileNotFoundError(f"no readable {which!r} checkpoint in {workdir}")
        if which in ("final", "latest"):  # the training command recomputes them
            instead = f"rerun the run's training command to recompute them {_rerun(workdir)}"
        else:  # a finished run does not train its best or an earlier epoch again
            instead = ("evaluate another checkpoint (--checkpoint final, latest or an epoch), "
                       "or train the run again in a new work directory")
        raise EvaluationRefused(
            f"no {which!r} checkpoint of the run in {workdir} could be read (epochs "
            f"{', '.join(map(str, unreadable))}: see the warnings above); {instead}.")
    state, meta = restored
    if which == "final" and meta["epoch"] != config.num_epochs:
        # The run's last checkpoint is there (check_finished) but could not be read: the
        # restore fell back to an earlier one, with a warning.
        raise EvaluationRefused(
            f"the last checkpoint of the run in {workdir} (epoch {config.num_epochs}) could not "
            f"be read; the newest readable one is epoch {meta['epoch']}. Rerun the run's "
            f"training command to recompute the epochs after it {_rerun(workdir)}, or pass "
            f"--checkpoint latest to evaluate epoch {meta['epoch']}.")
    return state, meta


def _rerun(workdir) -> str:
    """Why rerunning training mends unreadable checkpoints (``RunCheckpoints.save``)."""
    return (f"(runs are deterministic: the same parameters; the unreadable files go to "
            f"{Path(workdir) / checkpoints.UNREADABLE_FOLDER}/)")


def check_finished(workdir, config, which: str) -> None:
    """Refuses to evaluate a run that has not reached ``config.num_epochs`` as ``which``
    (``"final"``, or the ``config.eval_checkpoint`` the tables report): the run's final or best
    checkpoint does not exist yet. Reads folder names only, so it runs before any data is
    loaded. ``config.json`` holds the latest program's ``num_epochs``: a finished run that was
    lengthened and is training on is not finished (its old last checkpoint says
    ``final``)."""
    trained = max(checkpoints.saved_epochs(workdir, "latest"), default=0)
    if trained >= config.num_epochs:
        return
    anyway = ("--checkpoint latest to evaluate the newest checkpoint" if which == "final" else
              f"--checkpoint {which} to evaluate the {which} so far")
    raise EvaluationRefused(
        f"the run in {workdir} has not finished (latest checkpoint: epoch {trained} of "
        f"{config.num_epochs}), so its {which} checkpoint is not there yet; pass {anyway} "
        f"anyway.")


def _ood_scores(test_logits, ood_logits):
    return {score: float(v) for score, v in ood.aurocs(test_logits, ood_logits).items()}


def test_report(test_logits, test_labels, temperature: float, ood_logits: dict) -> dict:
    """Every metric of :func:`calib_jax.metrics.summary` plus OOD AUROC (entropy and
    confidence, per OOD set) on the test logits, ``{"before": ..., "after": ...}``
    temperature scaling; and, beside the paper's metrics, the less biased
    :func:`calib_jax.metrics.ece_sweep` with its bin count (``ece_sweep``,
    ``sweep_num_bins``)."""
    report = {}
    for tag, scale in (("before", 1.0), ("after", temperature)):
        z = calibration.apply_temperature(test_logits, scale)
        values = {k: float(v) for k, v in metrics.summary(z, test_labels).items()}
        sweep, num_bins = metrics.ece_sweep(z, test_labels, return_num_bins=True)
        values["ece_sweep"], values["sweep_num_bins"] = float(sweep), int(num_bins)
        values["ood_auroc"] = {name: _ood_scores(z, calibration.apply_temperature(o, scale))
                               for name, o in ood_logits.items()}
        report[tag] = values
    return report


def _interval_entries(result, confidence: float, names) -> dict:
    """results.json's entries for metrics ``names`` of a bootstrap result whose value is a dict:
    each one's standard error, percentile interval and basic interval."""
    basic = bootstrap.interval(result.value, result.samples, confidence=confidence,
                               method="basic")
    return {name: {"std": float(result.std[name]),
                   "percentile": [float(result.low[name]), float(result.high[name])],
                   "basic": [float(basic[0][name]), float(basic[1][name])]}
            for name in names}


def _ece_sweep_entry(logits, labels):
    return {"ece_sweep": metrics.ece_sweep(logits, labels)}


def test_intervals(test_logits, test_labels, temperature: float, *, num_resamples: int,
                   seed: int = 0, confidence: float = 0.95, ood_logits=None) -> dict:
    """Bootstrap intervals of every :func:`calib_jax.metrics.summary` metric and of
    :func:`calib_jax.metrics.ece_sweep` on the test logits, and of OOD AUROC (entropy and
    confidence) per set of ``ood_logits`` (a dict, name to logits), before and after
    temperature scaling (``temperature`` fixed, as chosen on the validation split):
    ``{"num_resamples", "seed", "confidence", "before": {metric: {"std",
    "percentile": [low, high], "basic": [low, high]}, "ood_auroc": {name: {score: {...}}}},
    "after": ...}``. Before and after use the same ``num_resamples`` resamples of the test set
    (:func:`calib_jax.bootstrap.resample_indices` of :func:`calib_jax.bootstrap.seed_key`
    ``(seed)``, counted: :func:`calib_jax.metrics.bootstrap_summary`; ``ece_sweep``'s
    gathered: :func:`calib_jax.bootstrap.bootstrap`), so their differences
    are paired too; OOD AUROC resamples the test set with
    those indices and each OOD set independently (a two-sample bootstrap,
    :func:`calib_jax.ood.bootstrap_aurocs`)."""
    key = bootstrap.seed_key(seed)
    ood_logits = ood_logits or {}
    bootstrap.check_num_resamples(num_resamples)
    report = {"num_resamples": int(num_resamples), "seed": int(seed), "confidence": confidence}
    for tag, scale in (("before", 1.0), ("after", temperature)):
        z = calibration.apply_temperature(test_logits, scale)
        result = metrics.bootstrap_summary(z, test_labels, key=key,
                                           num_resamples=num_resamples, confidence=confidence)
        report[tag] = _interval_entries(result, confidence, sorted(result.value))
        # The sweep's b* moves with the resample (no counted form): gathered resamples, the
        # same indices (bootstrap_by_counts draws bootstrap's).
        report[tag].update(_interval_entries(
            bootstrap.bootstrap(_ece_sweep_entry, z, test_labels, key=key,
                                num_resamples=num_resamples, confidence=confidence),
            confidence, ["ece_sweep"]))
        report[tag]["ood_auroc"] = {}
        for ood_name, logits in ood_logits.items():
            result = ood.bootstrap_aurocs(z, calibration.apply_temperature(logits, scale),
                                          key=key, num_resamples=num_resamples,
                                          confidence=confidence)
            report[tag]["ood_auroc"][ood_name] = _interval_entries(result, confidence,
                                                                   ood.SCORES)
    return report


def evaluate_run(workdir, *, which: str | None = None, criterion: str = "ece", out=None,
                 data_dir=None, bootstrap_resamples: int = 0, bootstrap_seed: int = 0) -> dict:
    """Runs the evaluation pass (see the module docstring) and returns the results dict.

    ``which``: ``"final"``, ``"best"``, ``"latest"`` or an epoch; None (default) takes the
    run's ``config.eval_checkpoint`` (:func:`table_checkpoint`). ``"final"`` and the default
    refuse a run that has not finished (:func:`check_finished`; a table's "best" is the best of
    the whole run); ``which="best"`` evaluates the best so far, ``"latest"`` the newest.
    ``bootstrap_resamples`` > 0 adds :func:`test_intervals` (``results["test_intervals"]``)
    from that many resamples drawn with ``bootstrap_seed``."""
    if criterion not in calibration.CRITERIA:
        raise ValueError(f"`criterion` must be one of {calibration.CRITERIA}, got {criterion!r}.")
    bootstrap.check_num_resamples(bootstrap_resamples, "bootstrap_resamples", zero_allowed=True)
    bootstrap.check_seed(bootstrap_seed, "bootstrap_seed")
    # NumPy ints pass the checks; results.json needs Python ones (it is written last).
    bootstrap_resamples, bootstrap_seed = int(bootstrap_resamples), int(bootstrap_seed)
    workdir = Path(workdir)
    config = load_run_config(workdir)
    if data_dir:
        sources.candidate_data_dirs(data_dir)  # refuses one that is no directory, before compute
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise EvaluationRefused(f"`out` = {out} is a file; give a directory (the results, "
                                f"plots and report go into it)")
    if why := unwritable_reason(out if out is not None else workdir):  # before any compute
        raise EvaluationRefused(f"{'`out` = ' + str(out) if out is not None else workdir}: "
                                f"{why}; give --out a directory you can write.")
    if which is None or which == "final":
        which = which or table_checkpoint(config)
        check_finished(workdir, config, which)
    if not data_dir and config.get("data_dir") and not Path(config.data_dir).is_dir():
        # Trained on another machine: its data directory is not here, so search the defaults.
        print(f"note: the run's data_dir {config.data_dir} is not a directory here; searching "
              f"${sources.ENV_DATA_DIR}, ../shared/data, then TFDS (--data-dir to choose)",
              file=sys.stderr)
    else:
        data_dir = data_dir or config.get("data_dir") or None
    dtype = train._DTYPES[config.dtype]
    options = train.dataset_options(config)
    val = datasets.load(config.dataset, "val", data_dir=data_dir, **options)
    test = datasets.load(config.dataset, "test", data_dir=data_dir, **options)
    state, meta = restore_checkpoint(config, workdir, which, val.num_classes, val.inputs.shape[1:])

    def logits_of(ds, split_for_norm):
        if ds.name == config.dataset:
            mean, std = train.input_normalization(config, split_for_norm)
        else:  # OOD images are normalised with their own (CIFAR-10) constants
            mean, std = (tuple(v) for v in datasets.normalization(ds.name, split_for_norm))
        logits = train.predict(state, ds.inputs, mean=mean, std=std, dtype=dtype,
                               batch_size=config.eval_batch_size)
        bad = int(np.size(logits) - np.isfinite(logits).sum())
        if bad:  # a diverged model: say so here, not as a metric's complaint about its input
            raise EvaluationRefused(
                f"the {which!r} checkpoint of {workdir} (epoch {meta['epoch']}) gives {bad} NaN "
                f"or infinite logits on {ds.name} ({ds.split}): the run had diverged by then; "
                f"evaluate an earlier checkpoint (--checkpoint EPOCH) or retrain with a changed "
                f"recipe.")
        return logits

    val_logits = logits_of(val, "train")  # val is part of the training images
    test_logits = logits_of(test, "test")
    ood_logits, skipped, ood_sets = {}, {}, {}
    for name in OOD_SETS.get(config.dataset, ()):
        try:
            ood_ds = datasets.load(name, "test", data_dir=data_dir)
        except datasets.DataNotFoundError as e:
            skipped[name] = str(e).splitlines()[0][:300]
            continue
        ood_logits[name] = logits_of(ood_ds, "test")
        ood_sets[name] = ood_ds

    search = calibration.temperature_grid_search(val_logits, val.labels, criterion=criterion)
    search_other = calibration.temperature_grid_search(
        val_logits, val.labels, criterion="nll" if criterion == "ece" else "ece")
    # The NLL-fit temperature is reported beside the grid's, where there is one: a barely
    # trained or diverged model (or every validation prediction right) has none, and the place
    # where the fit stops would read as one.
    nll_optimum = calibration.nll_optimum(val_logits, val.labels)
    nll_fit = (float(calibration.fit_temperature(val_logits, val.labels).temperature)
               if nll_optimum == "finite" else None)
    t = float(search.temperature)
    report = test_report(test_logits, test.labels, t, ood_logits)
    results = {
        "workdir": str(workdir), "checkpoint": which, "epoch": meta["epoch"],
        "config": json.loads(config.to_json()),
        "data": {"val": val.source, "test": test.source, "val_is_test": val.val_is_test,
                 "ood_skipped": skipped,
                 "ood_sources": {name: ds.source for name, ds in ood_sets.items()},
                 # What compare checks before pairing two runs' examples.
                 "fingerprints": {"val": datasets.fingerprint(val),
                                  "test": datasets.fingerprint(test),
                                  "ood": {name: datasets.fingerprint(ds)
                                          for name, ds in ood_sets.items()}}},
        "temperature": {"criterion": criterion, "value": t, "grid_index": int(search.index),
                        f"grid_{'nll' if criterion == 'ece' else 'ece'}":
                            float(search_other.temperature),
                        "nll_fit": nll_fit, **({} if nll_fit is not None else {
                            "nll_fit_none": calibration.NO_FINITE_NLL_OPTIMUM[nll_optimum]})},
        "test": report,
    }
    if bootstrap_resamples:
        results["test_intervals"] = test_intervals(test_logits, test.labels, t,
                                                   num_resamples=bootstrap_resamples,
                                                   seed=bootstrap_seed, ood_logits=ood_logits)
    out = Path(out) if out else workdir / default_out_name(which, criterion)
    # results.json last: the sweep and the tables take a directory holding it as a complete
    # evaluation, so an evaluation stopped while it draws (killed, or a plotting error) must
    # not leave one (a rerun then draws everything again).
    _write_plots(out, test_logits, test.labels, t, search, ood_logits)
    write_logits(out / LOGITS_FILE, val_logits=val_logits, val_labels=val.labels,
                 test_logits=test_logits, test_labels=test.labels, temperature=t,
                 ood_logits=ood_logits)
    atomic_write_text(out / "results.md", markdown_report(results) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


# Library functions named test_*: pytest, given this file (e.g. for its doctests), must not
# collect them as tests.
test_report.__test__ = test_intervals.__test__ = False


#: The checkpoint a run's evaluation reports by default (``config.eval_checkpoint``; defined
#: in :mod:`calib_jax.train`, whose config check needs it too).
table_checkpoint = train.table_checkpoint


#: The evaluation's logits (:func:`write_logits`), beside ``results.json``.
LOGITS_FILE = "logits.npz"


def write_logits(path, *, val_logits, val_labels, test_logits, test_labels, temperature: float,
                 ood_logits: dict) -> None:
    """Saves an evaluation's logits as ``.npz`` (atomically): ``val_logits``, ``val_labels``,
    ``test_logits``, ``test_labels``, ``temperature`` (the chosen T, a scalar) and
    ``ood_logits_<name>`` per OOD set; float32 logits, int32 labels (CIFAR-10: 1.4 MB).
    ``np.load(path)`` reads them."""
    buffer = io.BytesIO()
    np.savez(buffer, val_logits=np.asarray(val_logits, np.float32),
             val_labels=np.asarray(val_labels, np.int32),
             test_logits=np.asarray(test_logits, np.float32),
             test_labels=np.asarray(test_labels, np.int32),
             temperature=np.float64(temperature),
             **{f"ood_logits_{name}": np.asarray(z, np.float32)
                for name, z in ood_logits.items()})
    atomic_write_bytes(path, buffer.getvalue())


def table_evaluation_dir(run_dir) -> Path:
    """``run_dir/eval_<checkpoint>``: the evaluation the tables and :mod:`calib_jax.compare`
    read, of the checkpoint the run's own ``config.json`` names (``eval_checkpoint``;
    ``final`` without one)."""
    config = Path(run_dir) / "config.json"
    which = table_checkpoint(json.loads(config.read_text()) if config.exists() else {})
    return Path(run_dir) / default_out_name(which)


def default_out_name(which: str, criterion: str = "ece") -> str:
    """``eval_<which>`` for the default criterion (ECE), ``eval_<which>_<criterion>`` else."""
    return f"eval_{which}" + ("" if criterion == "ece" else f"_{criterion}")


def _write_plots(out: Path, test_logits, labels, t, search, ood_logits):
    import matplotlib.pyplot as plt

    entries, scaled = [], {}
    for tag, scale in (("T = 1", 1.0), (f"T = {t:.1f}", t)):
        z = calibration.apply_temperature(test_logits, scale)
        scaled[tag] = z
        entries.append((tag, metrics.reliability_bins(z, labels), float(metrics.ece(z, labels))))
    for adaptive, name in ((False, "reliability.png"), (True, "reliability_equal_mass.png")):
        panel = [(f"{title} ({'equal mass' if adaptive else 'equal width'})",
                  metrics.reliability_bins(scaled[title], labels, adaptive=adaptive), ece)
                 for title, _, ece in entries]
        fig = plots.reliability_panel(panel)
        atomic_save_figure(fig, out / name, dpi=130)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3), constrained_layout=True)
    for ax, (tag, z) in zip(axes, scaled.items()):
        conf = np.asarray(ood.confidence(z))
        plots.confidence_histogram(conf, np.argmax(np.asarray(z), 1) == np.asarray(labels),
                                   title=tag, ax=ax)
    atomic_save_figure(fig, out / "confidence_histogram.png", dpi=130)
    plt.close(fig)
    fig = plots.temperature_curves(search, title="validation set")
    atomic_save_figure(fig, out / "temperature_curves.png", dpi=130)
    plt.close(fig)
    for name, o in ood_logits.items():
        curves = {}
        for tag, scale in (("T = 1", 1.0), (f"T = {t:.1f}", t)):
            zi = calibration.apply_temperature(test_logits, scale)
            zo = calibration.apply_temperature(o, scale)
            curves[tag] = (ood.roc_curve(zi, zo, score="entropy"),
                           float(ood.auroc(zi, zo, score="entropy")))
        fig = plots.roc_curves(curves, title=f"OOD: {name} (entropy score)")
        atomic_save_figure(fig, out / f"roc_{name}.png", dpi=130)
        plt.close(fig)


def fixed(value: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, as the tables print it; a zero is never signed.

    (An NLL of exactly confident predictions is ``-0.0``, the mean of ``-log(1)``; a table
    showing ``-0.0000`` reads as a negative NLL.)

    >>> fixed(-0.0, 4), fixed(-0.004), fixed(-0.006), fixed(12.345678, 3)
    ('0.0000', '0.00', '-0.01', '12.346')
    """
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _sweep_interval(intervals, tag) -> str:
    entry = intervals[tag].get("ece_sweep")
    return "" if entry is None else fixed_interval(*(100 * end for end in entry["basic"]))


def fixed_interval(low: float, high: float, digits: int = 2) -> str:
    """An interval's ends as the reports print them: ``"[low, high]"``, each :func:`fixed`.

    >>> fixed_interval(1.234, 5.0)
    '[1.23, 5.00]'
    """
    return f"[{fixed(low, digits)}, {fixed(high, digits)}]"


def nll_fit_phrase(temperature: dict) -> str:
    """The NLL-fit temperature of ``results["temperature"]`` in words: its value, or why there
    is none.

    >>> nll_fit_phrase({"nll_fit": 2.3456})
    'NLL-fit T = 2.346'
    >>> nll_fit_phrase({"nll_fit": None, "nll_fit_none": "every prediction is right: ..."})
    'no NLL-fit T: every prediction is right: ...'
    """
    if temperature.get("nll_fit") is None:
        return f"no NLL-fit T: {temperature.get('nll_fit_none', 'not recorded')}"
    return f"NLL-fit T = {temperature['nll_fit']:.3f}"


def grid_edge_note(temperature: dict) -> str:
    """``""``, or a note that the chosen T of ``results["temperature"]`` is an end of the
    reference's grid (0.1 or 10), where the criterion may keep falling beyond the grid (the
    search keeps the reference's grid; a barely trained, diverged or over-fitted model can
    want a T outside it).

    >>> grid_edge_note({"grid_index": 99, "criterion": "ece"})
    " (the grid's largest T: the ECE may fall further beyond it)"
    >>> grid_edge_note({"grid_index": 40, "criterion": "ece"})
    ''
    """
    last = len(calibration.reference_temperature_grid()) - 1
    index = temperature.get("grid_index")
    if index not in (0, last):
        return ""
    return (f" (the grid's {'smallest' if index == 0 else 'largest'} T: the "
            f"{temperature['criterion'].upper()} may fall further beyond it)")


def markdown_report(results: dict) -> str:
    """The results as a markdown table (percent; NLL as is)."""
    before, after = results["test"]["before"], results["test"]["after"]
    t = results["temperature"]
    intervals = results.get("test_intervals")
    lines = [f"Run `{results['workdir']}`, checkpoint {results['checkpoint']} (epoch "
             f"{results['epoch']}); T = {t['value']:.2f}{grid_edge_note(t)} chosen on the "
             f"validation split by {t['criterion'].upper()} ({nll_fit_phrase(t)}).",
             "", "| metric | before T | after T |", "| --- | --- | --- |"]
    if intervals:
        share = fixed(100 * intervals["confidence"], 0)
        lines[-2:] = [f"| metric | before T | {share} % interval | after T | {share} % interval |",
                      "| --- | --- | --- | --- | --- |"]
    for name in METRIC_NAMES:
        scale, digits = (1.0, 4) if name == "nll" else (100.0, 2)
        cells = []
        for tag, values in (("before", before), ("after", after)):
            cells.append(fixed(scale * values[name], digits))
            if intervals:
                low, high = intervals[tag][name]["basic"]
                cells.append(fixed_interval(scale * low, scale * high, digits))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if "ece_sweep" in before:  # evaluations of an earlier version lack it
        cells = [f"{fixed(100 * values['ece_sweep'])} ({values['sweep_num_bins']} bins)"
                 for values in (before, after)]
        if intervals:  # evaluations of an earlier version have no ece_sweep interval
            cells = [cells[0], _sweep_interval(intervals, "before"),
                     cells[1], _sweep_interval(intervals, "after")]
        lines.append(f"| ece_sweep (not the paper's) | {' | '.join(cells)} |")
    for ood_name, scores in before["ood_auroc"].items():
        for score in ("entropy", "confidence"):
            cells = []
            for tag, values in (("before", before), ("after", after)):
                cells.append(fixed(100 * values["ood_auroc"][ood_name][score]))
                if intervals:
                    # Evaluations of an earlier version have no OOD intervals: empty cells.
                    entry = intervals[tag].get("ood_auroc", {}).get(ood_name, {}).get(score)
                    cells.append(fixed_interval(100 * entry["basic"][0], 100 * entry["basic"][1])
                                 if entry else "")
            lines.append(f"| OOD AUROC {ood_name} ({score}) | {' | '.join(cells)} |")
    if intervals:
        lines.append(f"\nIntervals: basic bootstrap, {intervals['num_resamples']} resamples of the "
                     f"test set (seed {intervals['seed']}; OOD AUROC: and of the OOD set, "
                     f"independently), T fixed; results.json holds the "
                     f"percentile ones and the standard errors. A calibration error's interval "
                     f"is the spread of its estimate, not bounds on the true error (see "
                     f"calib_jax.bootstrap).")
    if results["data"]["val_is_test"]:
        lines.append("\nNote: the validation split is the test split (as in the reference).")
    for name, why in results["data"]["ood_skipped"].items():
        lines.append(f"\nOOD set {name} skipped: {why}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default=None,
                        help="final, best, latest, or an epoch number (default: the run's "
                             "config.eval_checkpoint: final; best for 20 Newsgroups and SST)")
    parser.add_argument("--criterion", default="ece", choices=list(calibration.CRITERIA))
    parser.add_argument("--out", default=None)
    # --data-dir as the demo spells it; --data_dir (the first spelling) still works.
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None)
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="add 95%% bootstrap intervals of the test metrics from N resamples "
                             "(e.g. 1000; default 0: none)")
    parser.add_argument("--bootstrap-seed", type=int, default=0,
                        help="the seed of the resamples (default 0)")
    args = parser.parse_args(argv)
    try:
        bootstrap.check_num_resamples(args.bootstrap, "--bootstrap", zero_allowed=True)
        bootstrap.check_seed(args.bootstrap_seed, "--bootstrap-seed")
    except ValueError as e:
        parser.error(str(e))
    if args.checkpoint not in (None, "final", "best", "latest") and \
            not args.checkpoint.isdigit():
        parser.error("--checkpoint must be final, best, latest or an epoch number")
    run_dirs = member_dirs(args.workdir)
    if args.out and len(run_dirs) > 1:
        parser.error("--out names one directory; a multi-member work directory writes each "
                     "member's results into <member>/eval_<checkpoint>[_nll]")
    refused = []
    for run_dir in run_dirs:
        try:
            with train.concise_warnings():
                results = evaluate_run(run_dir, which=args.checkpoint, criterion=args.criterion,
                                       out=args.out, data_dir=args.data_dir,
                                       bootstrap_resamples=args.bootstrap,
                                       bootstrap_seed=args.bootstrap_seed)
        except (EvaluationRefused, FileNotFoundError, datasets.DamagedDataError) as e:
            # Their messages name the run (or the data file) and what to do instead; a
            # traceback adds nothing. (DataNotFoundError is a FileNotFoundError.) The other
            # members of a group are still evaluated: one diverged member must not cost the
            # rest of the row its results.
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            refused.append(run_dir.name)
            continue
        print(markdown_report(results) + "\n")
    if refused and len(run_dirs) > 1:
        print(f"not evaluated: {', '.join(refused)} (of {len(run_dirs)} members; the reasons "
              f"are above)", file=sys.stderr)
    return 1 if refused else 0


def member_dirs(workdir) -> list[Path]:
    """The run directories under ``workdir``: its members (``members.json``) or itself."""
    workdir = Path(workdir)
    listing = workdir / "members.json"
    if listing.exists() and not (workdir / "config.json").exists():
        return [workdir / name for name in json.loads(listing.read_text())["members"]]
    return [workdir]


if __name__ == "__main__":
    sys.exit(main())
