"""Writes the notebooks from the cell sources below (so that they stay reviewable as code).

Usage: python notebooks/make_notebooks.py    (then run them with Jupyter, or `make test`)

The output is deterministic (cell ids derive from the notebook's name and the cell's
position), so regenerating changes only what the sources changed; the test suite checks that
the committed notebooks hold this script's cells.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

NB01 = [
    ("md", """# 01 — The focal-loss family and calibration metrics

Toy logits only, runs in seconds. We look at

1. loss and gradient magnitude against the probability of the true class `p_t`, for
   cross-entropy, focal loss with gamma 1, 2, 3, and the sample-dependent FLSD-53 (the
   paper's figure on gradient norms);
2. calibration metrics of a toy classifier that is right 70% of the time but too sure of itself;
3. temperature scaling of that classifier."""),
    ("code", """import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from calib_jax import calibration, losses, metrics, plots"""),
    ("md", """## 1. Loss and gradient norm against p_t

Two-class logits `[log p, log(1 - p)]` put exactly `p_t = p` on the label. The gradient
norm with respect to the logits shows focal loss down-weighting confident samples, and
FLSD-53 switching from gamma 5 to gamma 3 at `p_t = 0.2`."""),
    ("code", """p = jnp.linspace(0.01, 0.99, 199)
logits = jnp.stack([jnp.log(p), jnp.log1p(-p)], axis=1)
labels = jnp.zeros(p.shape[0], jnp.int32)
family = {
    "CE": lambda z: losses.cross_entropy(z, labels),
    "FL-1": lambda z: losses.focal_loss(z, labels, gamma=1.0),
    "FL-2": lambda z: losses.focal_loss(z, labels, gamma=2.0),
    "FL-3": lambda z: losses.focal_loss(z, labels, gamma=3.0),
    "FLSD-53": lambda z: losses.adaptive_focal_loss(z, labels),
}
fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
for name, fn in family.items():
    value = fn(logits)
    grad = jax.grad(lambda z: fn(z).sum())(logits)      # rows are independent
    ax_loss.plot(p, value, label=name)
    ax_grad.plot(p, jnp.linalg.norm(grad, axis=1), label=name)
ax_loss.set(xlabel="p_t", ylabel="loss", ylim=(0, 5)); ax_loss.legend()
ax_grad.set(xlabel="p_t", ylabel="|d loss / d logits|"); ax_grad.legend()
grad_norms = {name: np.asarray(jnp.linalg.norm(jax.grad(lambda z: fn(z).sum())(logits), axis=1))
              for name, fn in family.items()}
# Focal loss pushes less than CE on confident samples, but *more* on very wrong ones
# (the paper's g(p, gamma) > 1 region): FLSD's gamma = 5 below p_t = 0.2 uses that.
confident = np.asarray(p) >= 0.3
assert np.all(grad_norms["FL-3"][confident] < grad_norms["CE"][confident])
assert grad_norms["FL-3"][0] > grad_norms["CE"][0]"""),
    ("md", """## 2. Metrics of a toy over-confident classifier"""),
    ("code", """rng = np.random.default_rng(0)
n, c = 5000, 10
y = rng.integers(0, c, n)
z = rng.standard_normal((n, c))
z[np.arange(n), y] += np.where(rng.random(n) < 0.7, 2.5, 0.0)
z = jnp.asarray(4.0 * z, jnp.float32)        # x4: sharper than its accuracy warrants
val, test = (z[:2500], y[:2500]), (z[2500:], y[2500:])
summary = {k: round(float(v), 4) for k, v in metrics.summary(*test).items()}
summary"""),
    ("code", """bins = metrics.reliability_bins(*test)
plots.reliability_diagram(bins, title="toy classifier", ece=summary["ece"]);"""),
    ("md", """## 3. Temperature scaling

The grid search runs all 100 temperatures in one compiled call; the continuous fit finds
the NLL optimum."""),
    ("code", """search = calibration.temperature_grid_search(*val)
fit = calibration.fit_temperature(*val)
print(f"T by ECE grid: {float(search.temperature):.2f}, NLL fit: {float(fit.temperature):.3f}")
scaled = calibration.apply_temperature(test[0], search.temperature)
after = metrics.summary(scaled, test[1])
print(f"test ECE {summary['ece']:.4f} -> {float(after['ece']):.4f}")
assert float(after["ece"]) < summary["ece"]
plots.temperature_curves(search, title="validation half");"""),
    ("code", """plots.reliability_panel([
    ("T = 1", bins, summary["ece"]),
    (f"T = {float(search.temperature):.1f}", metrics.reliability_bins(scaled, test[1]),
     float(after["ece"])),
]);"""),
]

NB02 = [
    ("md", """# 02 — Explore evaluation results

Point `RESULTS_ROOT` at a directory of runs laid out as `<dataset>/<model>/<loss>/` with
`eval_final/results.json` (`eval_best/` for 20 Newsgroups and SST) inside (what
`experiments/sweep.py` writes). Left unset, the
notebook makes its own: two one-epoch runs (CE and FLSD-53) of a ResNet-8 on the generated
`synthetic` task, then the evaluation pass, in about a minute on a laptop CPU. It then
builds the paper-style tables (ours beside the paper's), reliability diagrams and
temperature curves."""),
    ("code", """import os, sys, tempfile
from pathlib import Path
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(REPO / "experiments")); sys.path.insert(0, str(REPO / "experiments" / "configs"))
import build_tables, paper
from calib_jax import evaluate, train

RESULTS_ROOT = os.environ.get("RESULTS_ROOT")"""),
    ("code", """if RESULTS_ROOT is None:
    RESULTS_ROOT = tempfile.mkdtemp(prefix="calib_jax_nb02_")
    for loss in ("ce", "flsd53"):
        workdir = Path(RESULTS_ROOT) / "cifar10" / "resnet50" / loss   # table key, tiny stand-in
        config = paper.get_config(f"cell=cifar10/resnet50/{loss},dataset=synthetic,"
                                  "model=resnet8,num_epochs=1,batch_size=64")
        train.train_and_evaluate(config, workdir)
        evaluate.evaluate_run(workdir, which="final")
root = Path(RESULTS_ROOT)
runs = build_tables.load_results(root)
if not runs:  # e.g. the sweep's parent directory: every table and figure below would be empty
    raise FileNotFoundError(f"no evaluated run under {root}: RESULTS_ROOT must hold "
                            "<dataset>/<model>/<loss>/eval_final/results.json (eval_best/ for "
                            "20 Newsgroups and SST), as experiments/sweep.py writes")
print(f"{len(runs)} evaluated runs under {root}")"""),
    ("md", """## Tables: ours beside the paper's (percent)"""),
    ("code", """text = build_tables.build(root)
display(Markdown(text.split("## Test error")[0]))"""),
    ("md", """## ECE before and after temperature scaling, per cell

Mean over each cell's runs, with the sample standard deviation as error bars where a cell has
several seeds (`experiments/sweep.py --seeds 1,2,3`); `build_tables.cell_summary` gives every
metric this way (and `build_tables.py` writes it as `tables.json`)."""),
    ("code", """summary = build_tables.cell_summary(root)
names = sorted(summary)
fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.4), constrained_layout=True)
for offset, when in ((-0.15, "before"), (0.15, "after")):
    stats = [summary[n]["test"][when]["ece"] for n in names]
    ax.errorbar([i + offset for i in range(len(names))], [100 * s["mean"] for s in stats],
                yerr=[100 * (s["std"] or 0) for s in stats], fmt="o", capsize=4,
                label=f"{when} temperature scaling")
ax.set_xticks(range(len(names)), [f"{n}\\n({summary[n]['runs']} runs)" for n in names], fontsize=8)
ax.set_ylabel("test ECE (%)"); ax.set_ylim(bottom=0); ax.legend(fontsize=8); plt.show()"""),
    ("md", """## How much would these numbers move on another test set?

Each evaluation saves its logits (`logits.npz`), so bootstrap intervals need no model: 1,000
resamples of the test set give each run's ECE a 95 % (basic) interval -- the spread of the
estimate over test sets of this size; `calib_jax.bootstrap`'s docstring says what such an
interval of a calibration error does and does not cover. Two runs of one data set and model
are compared paired, on the same resamples, as `python -m calib_jax.compare` does (every
metric, OOD AUROC included)."""),
    ("code", """import itertools
import jax, numpy as np
from calib_jax import bootstrap, calibration, compare, metrics

key = jax.random.key(0)
for (dataset, model, loss), result in sorted(runs.items()):
    eval_dir = root / dataset / model / loss / evaluate.default_out_name(result["checkpoint"])
    if not (eval_dir / evaluate.LOGITS_FILE).is_file():
        print(f"{dataset}/{model}/{loss}: no {evaluate.LOGITS_FILE} (evaluated before logits were saved)")
        continue
    with np.load(eval_dir / evaluate.LOGITS_FILE) as saved:
        z, y, t = saved["test_logits"], saved["test_labels"], float(saved["temperature"])
    for when, scale in (("before", 1.0), ("after", t)):
        r = bootstrap.bootstrap(metrics.ece, calibration.apply_temperature(z, scale), y, key=key,
                                method="basic")
        print(f"{dataset}/{model}/{loss}: ECE {when} T {100 * r.value:.2f}% "
              f"[{100 * r.low:.2f}, {100 * r.high:.2f}]")"""),
    ("code", """rows = {}
for dataset, model, loss in sorted(runs):
    rows.setdefault((dataset, model), []).append(loss)
pairs = [(row, a, b) for row, losses in rows.items() for a, b in itertools.combinations(losses, 2)]
if not pairs:
    print("Paired comparisons need two evaluated runs of one data set and model (e.g. ce and flsd53).")
for (dataset, model), a, b in pairs[:3]:
    try:
        report = compare.compare(root / dataset / model / a, root / dataset / model / b)
    except compare.ComparisonRefused as refused:
        print(refused)
        continue
    display(Markdown(compare.markdown_comparison(report)))"""),
    ("md", """## Reliability diagrams and temperature curves of each run"""),
    ("code", """for (dataset, model, loss), result in sorted(runs.items()):
    out = root / dataset / model / loss / evaluate.default_out_name(result["checkpoint"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    for ax, name in zip(axes, ("reliability.png", "temperature_curves.png", "confidence_histogram.png")):
        ax.imshow(plt.imread(out / name)); ax.axis("off")
    fig.suptitle(f"{dataset} / {model} / {loss}: ECE {100 * result['test']['before']['ece']:.2f}% -> "
                 f"{100 * result['test']['after']['ece']:.2f}% at T = {result['temperature']['value']:.1f}")
    plt.show()"""),
]

NB03 = [
    ("md", """# 03 — Out-of-distribution detection before and after temperature scaling

A simulated classifier: in-distribution inputs get one dominant logit, OOD inputs flatter
logits. We compute AUROC with the two scores of the reference — entropy (OOD positive) and
max probability (in-distribution positive) — and draw ROC curves at T = 1 and at the T chosen
on a validation split."""),
    ("code", """import jax.numpy as jnp, numpy as np
from calib_jax import calibration, ood, plots

rng = np.random.default_rng(0)
def classifier_logits(n, peak, noise):
    y = rng.integers(0, 10, n)
    z = noise * rng.standard_normal((n, 10))
    z[np.arange(n), y] += peak
    return jnp.asarray(z, jnp.float32), y
val_logits, val_labels = classifier_logits(2000, 6.0, 2.0)
in_logits, _ = classifier_logits(3000, 6.0, 2.0)
out_logits, _ = classifier_logits(3000, 2.0, 2.0)
t = float(calibration.temperature_grid_search(val_logits, val_labels).temperature)
t"""),
    ("code", """rows = []
for tag, scale in (("T = 1", 1.0), (f"T = {t:.1f}", t)):
    zi = calibration.apply_temperature(in_logits, scale)
    zo = calibration.apply_temperature(out_logits, scale)
    rows.append((tag, float(ood.auroc(zi, zo, score="entropy")),
                 float(ood.auroc(zi, zo, score="confidence"))))
for tag, ent, conf in rows:
    print(f"{tag:8s}  AUROC entropy {100 * ent:.2f}%   AUROC confidence {100 * conf:.2f}%")
assert all(0.5 < ent <= 1 for _, ent, _ in rows)"""),
    ("code", """curves = {}
for tag, scale in (("T = 1", 1.0), (f"T = {t:.1f}", t)):
    zi = calibration.apply_temperature(in_logits, scale)
    zo = calibration.apply_temperature(out_logits, scale)
    curves[tag] = (ood.roc_curve(zi, zo, score="entropy"), float(ood.auroc(zi, zo, score="entropy")))
plots.roc_curves(curves, title="simulated OOD, entropy score");"""),
    ("md", """## How sure are these AUROCs?

A two-sample bootstrap: the in-distribution and the OOD logits are resampled, each on its
own (`groups`: the two in-distribution arrays share their indices, as do the two OOD ones),
1,000 times, in one compiled call. The AUROCs at both temperatures and the change that
temperature scaling makes all come from the same resamples, so the change is a paired
difference (what `python -m calib_jax.compare` does for two runs)."""),
    ("code", """import jax
from calib_jax import bootstrap

def aurocs_and_change(in_1, in_t, out_1, out_t):
    at_1, at_t = ood.aurocs(in_1, out_1), ood.aurocs(in_t, out_t)
    return {"T = 1": at_1, "T = t": at_t, "change": {s: at_t[s] - at_1[s] for s in at_1}}

r = bootstrap.bootstrap(aurocs_and_change, in_logits, calibration.apply_temperature(in_logits, t),
                        out_logits, calibration.apply_temperature(out_logits, t),
                        key=jax.random.key(0), groups=(0, 0, 1, 1))
for tag in ("T = 1", "T = t"):
    print(tag.replace("t", f"{t:.1f}"), "  ".join(
        f"{s} {100 * r.value[tag][s]:.2f}% [{100 * r.low[tag][s]:.2f}, {100 * r.high[tag][s]:.2f}]"
        for s in ood.SCORES))
low, high = bootstrap.interval(r.value, r.samples, method="basic")  # basic: for a difference
for s in ood.SCORES:
    print(f"AUROC {s} at T = {t:.1f} minus at T = 1: {100 * r.value['change'][s]:+.2f} points "
          f"[{100 * low['change'][s]:+.2f}, {100 * high['change'][s]:+.2f}]")"""),
]


def build(name, cells):
    nb = new_notebook()
    nb.cells = [(new_markdown_cell if kind == "md" else new_code_cell)(src, id=f"{name[:2]}-{i:02d}")
                for i, (kind, src) in enumerate(cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


NOTEBOOKS = {"01_losses_and_metrics": NB01, "02_explore_results": NB02, "03_ood": NB03}


def main():
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
