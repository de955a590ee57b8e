"""A short real experiment on CPU: cross-entropy vs FLSD-53 on the offline CIFAR-10 copy.

Trains a small ResNet (ResNet-8 by default) twice on a subset of the
reference's 45,000-image training split, once with the batch-summed
cross-entropy and once with FLSD-53, with the reference's optimiser (SGD
momentum 0.9, weight decay 5e-4, gradient clipping at 2), then:

* picks the temperature on the 5,000-image validation split (100-point grid, ECE),
* reports error, NLL, ECE, AdaECE, classwise ECE and MCE on the 10,000 test
  images before and after temperature scaling, plus OOD AUROC against
  CIFAR-10-C Gaussian noise (severity 5, generated),
* prints FLSD-53's test ECE minus cross-entropy's, before and after scaling, with 95 %
  intervals from 1,000 paired bootstrap resamples of the test set (``calib_jax.bootstrap``:
  does the difference survive another test set of this size?),
* writes ``results.json``, ``results.md`` and reliability diagrams to ``--out``.

It is a demonstration of the pipeline at a size a 2-core CPU trains in
minutes, not a reproduction of the paper's numbers (those need the 350-epoch
recipe on the full networks; see README).

Usage: python experiments/demo.py [--out runs/demo] [--epochs 6] [--train-size 10000]
[--eval-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from calib_jax import bootstrap, calibration, evaluate, metrics, models, plots, train
from calib_jax.data import datasets, pipeline
from calib_jax.files import atomic_save_figure, atomic_write_text

LOSSES = {"ce": "Cross-entropy", "flsd53": "FLSD-53"}
CIFAR10_TRAIN = 45000  # the reference's training split (50,000 less 5,000 for validation)


def train_one(loss_name, data, args, mean, std):
    model = models.get(args.model, 10)
    steps = pipeline.steps_per_epoch(len(data["train_labels"]), args.batch_size)
    # Short schedule: the reference's x0.1 steps, placed at 50 % and 75 % of training.
    boundaries = (args.epochs // 2, (3 * args.epochs) // 4)
    tx = train.make_optimizer(train.piecewise_lr(args.lr, steps, boundaries=boundaries))
    state = train.create_train_state(jax.random.PRNGKey(args.seed), model, tx, (1, 32, 32, 3))
    images, labels = data["train_images"], data["train_labels_dev"]
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = pipeline.epoch_order(args.seed, epoch, len(data["train_labels"]))
        total_loss, correct = 0.0, 0
        for step in range(steps):
            x, y = pipeline.train_batch(images, labels, order, step, seed=args.seed, epoch=epoch,
                                        batch_size=args.batch_size)
            state, m = train.train_step(state, x, y, epoch, loss_name=loss_name, mean=mean,
                                        std=std)
            m = jax.device_get(m)  # waits for the step: no runaway queue on a 2-core CPU
            total_loss += float(m["loss"])
            correct += int(m["correct"])
        seen = steps * args.batch_size
        if not math.isfinite(total_loss):
            raise train.TrainingDivergedError(
                f"{LOSSES[loss_name]} diverged in epoch {epoch + 1} (training loss not finite); "
                f"try a lower --lr (now {args.lr})")
        elapsed = time.perf_counter() - start
        print(f"  [{LOSSES[loss_name]}] epoch {epoch + 1}/{args.epochs}: loss/img "
              f"{total_loss / seen:.3f}, train acc {correct / seen:.3f}, "
              f"{(epoch + 1) * seen / elapsed:,.0f} img/s", flush=True)
    return state


def evaluate_state(state, data, mean, std):
    logits = {split: train.predict(state, data[f"{split}_images"], mean=mean, std=std)
              for split in ("val", "test", "ood")}
    search = calibration.temperature_grid_search(logits["val"], data["val_labels"])
    t = float(search.temperature)
    rows = evaluate.test_report(logits["test"], data["test_labels"], t,
                                {"cifar10_c": logits["ood"]})
    scaled = {tag: calibration.apply_temperature(logits["test"], s)
              for tag, s in (("before", 1.0), ("after", t))}
    bins = {tag: metrics.reliability_bins(z, data["test_labels"]) for tag, z in scaled.items()}
    return {"temperature": t, "metrics": rows}, bins, scaled


def ece_gap(logits_ce, logits_flsd, labels):
    """FLSD-53's ECE minus cross-entropy's (module level: one compile serves both tags)."""
    return metrics.ece(logits_flsd, labels) - metrics.ece(logits_ce, labels)


def paired_ece_gaps(test_logits, labels, num_resamples: int = 1000) -> dict:
    """``{"num_resamples", tag: {"gap", "basic_95"}}``: FLSD-53's test ECE minus
    cross-entropy's before and after scaling, with the basic 95 % interval of ``num_resamples``
    resamples of the test set shared by both models (paired) and both tags. Basic, not
    percentile: for a difference of ECEs it held the true difference more often
    (calib_jax.bootstrap's measured table)."""
    gaps = {"num_resamples": num_resamples}
    for tag in ("before", "after"):
        r = bootstrap.bootstrap(ece_gap, test_logits["ce"][tag], test_logits["flsd53"][tag],
                                labels, key=jax.random.key(0), num_resamples=num_resamples,
                                method="basic")
        gaps[tag] = {"gap": float(r.value), "basic_95": [float(r.low), float(r.high)]}
    return gaps


def gaps_line(gaps) -> str:
    def one(tag, label):
        g = gaps[tag]
        return (f"{label} {100 * g['gap']:+.2f} [{100 * g['basic_95'][0]:+.2f}, "
                f"{100 * g['basic_95'][1]:+.2f}]")
    return (f"FLSD-53's test ECE minus cross-entropy's, in points: {one('before', 'before T')}; "
            f"{one('after', 'after T')} (95 % intervals: basic bootstrap, "
            f"{gaps['num_resamples']:,} paired resamples of the test set)")


def ood_entropy(values) -> float:
    return values["ood_auroc"]["cifar10_c"]["entropy"]


def table(results) -> str:
    lines = ["| loss | T | error | NLL | ECE | ECE (T) | AdaECE | AdaECE (T) | CW-ECE | "
             "CW-ECE (T) | MCE | MCE (T) | OOD AUROC | OOD AUROC (T) |",
             "|" + "---|" * 14]
    for name, r in results.items():
        b, a = r["metrics"]["before"], r["metrics"]["after"]
        pct = lambda v: evaluate.fixed(100 * v)  # noqa: E731
        lines.append(
            f"| {LOSSES[name]} | {r['temperature']:.1f} | {pct(b['error'])} | "
            f"{evaluate.fixed(b['nll'], 3)} | "
            f"{pct(b['ece'])} | {pct(a['ece'])} | {pct(b['adaptive_ece'])} | "
            f"{pct(a['adaptive_ece'])} | {pct(b['classwise_ece'])} | {pct(a['classwise_ece'])} | "
            f"{pct(b['mce'])} | {pct(a['mce'])} | {pct(ood_entropy(b))} | "
            f"{pct(ood_entropy(a))} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--model", default="resnet8", choices=["resnet8", "resnet20"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=0,
                        help="evaluate on the first N images of the validation, test and OOD "
                             "splits (0 = all: 5,000 / 10,000 / 10,000); fewer is faster and "
                             "noisier")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    # Checked before the data is read (a --train-size above the split trained on the whole
    # split while the report named the larger number).
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not 1 <= args.batch_size <= args.train_size <= CIFAR10_TRAIN:
        parser.error(f"need 1 <= --batch-size <= --train-size <= {CIFAR10_TRAIN:,} (the training "
                     f"split), got --batch-size {args.batch_size}, --train-size {args.train_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.eval_size < 0:
        parser.error(f"--eval-size must be >= 0 (0 = whole splits), got {args.eval_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a directory (results and plots go into it)")
    started = time.perf_counter()
    try:
        splits = {s: datasets.load("cifar10", s, data_dir=args.data_dir)
                  for s in ("train", "val", "test")}
        corrupted = datasets.load("cifar10_c", "test", data_dir=args.data_dir)
    except datasets.DataNotFoundError as e:
        print(f"CIFAR-10 was not found, so the demo cannot run.\n{e}\n\nGet it with TFDS "
              f"(pip install 'calib_jax[tfds]' tensorflow, then tfds.builder('cifar10')"
              f".download_and_prepare()) or point --data-dir / $CALIB_JAX_DATA_DIR at a folder "
              f"holding cifar10/ chunks.", file=sys.stderr)
        return 2
    except datasets.DamagedDataError as e:  # names the file
        print(f"A CIFAR-10 file cannot be read, so the demo cannot run.\n{e}", file=sys.stderr)
        return 2
    mean, std = datasets.normalization("cifar10", "train")
    subset = np.random.default_rng(args.seed).permutation(len(splits["train"]))[:args.train_size]
    train_images, train_labels = splits["train"].inputs[subset], splits["train"].labels[subset]
    images_dev, labels_dev = pipeline.put_on_device(train_images, train_labels)
    first = slice(None, args.eval_size or None)
    data = {"train_images": images_dev, "train_labels": train_labels,
            "train_labels_dev": labels_dev,
            "val_images": splits["val"].inputs[first], "val_labels": splits["val"].labels[first],
            "test_images": splits["test"].inputs[first],
            "test_labels": splits["test"].labels[first], "ood_images": corrupted.inputs[first]}
    print(f"CIFAR-10 from {splits['train'].source} (a lossy JPEG copy: label results as such); "
          f"training {args.model} on {args.train_size} of the {CIFAR10_TRAIN:,} training images "
          f"for {args.epochs} epochs, jax {jax.__version__} on {jax.devices()[0].platform}")
    results, all_bins, test_logits = {}, {}, {}
    for loss_name in LOSSES:
        state = train_one(loss_name, data, args, mean, std)
        results[loss_name], all_bins[loss_name], test_logits[loss_name] = evaluate_state(
            state, data, mean, std)
    gaps = paired_ece_gaps(test_logits, data["test_labels"])
    md = table(results) + "\n\n" + gaps_line(gaps)
    print("\nTest-set calibration (percent; T chosen on the validation split by ECE):\n")
    print(md)
    entries = []
    for name in LOSSES:
        for tag, label in (("before", "T = 1"), ("after", f"T = {results[name]['temperature']:.1f}")):
            entries.append((f"{LOSSES[name]}, {label}", all_bins[name][tag],
                            results[name]["metrics"][tag]["ece"]))
    fig = plots.reliability_panel(entries)
    atomic_save_figure(fig, out / "reliability.png", dpi=130)
    payload = {"config": vars(args), "data_source": splits["train"].source,
               "wall_seconds": time.perf_counter() - started, "results": results,
               "ece_gap_flsd53_minus_ce": gaps}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    atomic_write_text(out / "results.md", md + "\n")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'reliability.png'} "
          f"({payload['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
