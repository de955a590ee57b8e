"""Matplotlib figures of calibration results. Functions return the figure and
never call ``show()``; they take the outputs of :mod:`calib_jax.metrics`.

The backend is left to matplotlib (inline in notebooks; Agg without a
display, so scripts and CI save figures headless).
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from calib_jax import metrics, validation

__all__ = ["confidence_histogram", "reliability_diagram", "reliability_panel", "roc_curves",
           "temperature_curves"]


def _figure_and_axes(ax, figsize):
    """``(figure, axes)``: a new figure, or the figure of the axes given."""
    if ax is None:
        return plt.subplots(figsize=figsize, constrained_layout=True)
    return ax.figure, ax


def _finish_axes(ax, xlabel, ylabel, title, legend_loc, ylim=None):
    ax.set_xlim(0, 1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(loc=legend_loc, fontsize=7, frameon=False)


def _draw_reliability(ax, bins: metrics.ReliabilityBins, title: str, ece: float | None):
    edges = np.asarray(bins.edges, np.float64)
    count = np.asarray(bins.count)
    acc = np.asarray(bins.accuracy, np.float64)
    conf = np.asarray(bins.mean_confidence, np.float64)
    filled = count > 0
    widths = np.diff(edges)
    lefts = edges[:-1]
    ax.bar(lefts[filled], acc[filled], widths[filled], align="edge", color="#3b75af",
           edgecolor="black", linewidth=0.6, label="accuracy")
    # The gap between accuracy and mean confidence, hatched.
    gap_bottom = np.minimum(acc, conf)[filled]
    ax.bar(lefts[filled], np.abs(conf - acc)[filled], widths[filled], bottom=gap_bottom,
           align="edge", color="#e8a0a0", alpha=0.7, edgecolor="#b03030", hatch="//",
           linewidth=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    for left, width, c, n in zip(lefts[filled], widths[filled], acc[filled], count[filled]):
        ax.text(left + width / 2, min(c + 0.02, 0.97), str(int(n)), ha="center", va="bottom",
                fontsize=6, rotation=90)
    label = title if ece is None else f"{title}\nECE = {100 * ece:.2f}%"
    _finish_axes(ax, "confidence", "accuracy", label, "upper left", ylim=(0, 1))


def reliability_diagram(bins: metrics.ReliabilityBins, *, title: str = "", ece: float | None = None,
                        ax=None):
    """Per-bin accuracy bars, the gap to mean confidence, and bin counts.

    Args:
      bins: from :func:`calib_jax.metrics.reliability_bins` (equal-width or
        ``adaptive=True`` equal-mass bins).
      title: axes title; ``ece`` (a fraction) is appended when given.
      ax: an existing axes to draw on; a new figure otherwise.

    Returns:
      The matplotlib figure.
    """
    fig, ax = _figure_and_axes(ax, (3.6, 3.6))
    _draw_reliability(ax, bins, title, ece)
    return fig


def reliability_panel(entries: Sequence[tuple[str, metrics.ReliabilityBins, float | None]], *,
                      columns: int | None = None):
    """Several reliability diagrams side by side, e.g. CE vs FLSD-53, before / after T.

    Args:
      entries: ``(title, bins, ece)`` per panel.
      columns: panels per row (default: all in one row).
    """
    if not entries:
        raise ValueError("`entries` is empty; pass at least one (title, bins, ece).")
    columns = columns or len(entries)
    rows = -(-len(entries) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.4 * rows),
                             constrained_layout=True, squeeze=False)
    for ax, (title, bins, ece) in zip(axes.flat, entries):
        _draw_reliability(ax, bins, title, ece)
    for ax in list(axes.flat)[len(entries):]:
        ax.set_visible(False)
    return fig


def confidence_histogram(confidences, correct, *, num_bins: int = 15, title: str = "", ax=None):
    """Histogram of top-label confidences, with the accuracy and mean-confidence lines.

    Args:
      confidences: ``[N]`` max softmax probabilities.
      correct: ``[N]`` booleans (prediction == label).
    """
    conf, hits = np.asarray(confidences, np.float64), np.asarray(correct)
    if conf.ndim != 1 or conf.size == 0 or hits.shape != conf.shape:
        raise ValueError(f"`confidences` and `correct` must be non-empty [N] arrays of one "
                         f"length, got shapes {conf.shape} and {hits.shape}.")
    # Outside [0, 1] a value would fall off the bins while still counting in the fractions.
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("`confidences` must be probabilities in [0, 1] (max softmax "
                         "probabilities, e.g. metrics.top_label_confidence(logits)), not logits.")
    validation.check_count(num_bins, "num_bins")
    acc = float(np.mean(hits.astype(bool)))
    fig, ax = _figure_and_axes(ax, (3.6, 3.0))
    ax.hist(conf, bins=np.linspace(0, 1, num_bins + 1), weights=np.full(conf.shape, 1 / conf.size),
            color="#3b75af", edgecolor="black", linewidth=0.6)
    ax.axvline(acc, color="black", linestyle="--", label=f"accuracy {acc:.3f}")
    ax.axvline(conf.mean(), color="#b03030", linestyle="-",
               label=f"mean confidence {conf.mean():.3f}")
    _finish_axes(ax, "confidence", "fraction of samples", title, "upper left")
    return fig


def roc_curves(curves, *, title: str = "", ax=None):
    """ROC curves from :func:`calib_jax.ood.roc_curve`: ``{label: (RocCurve, auroc)}``."""
    if not curves:
        raise ValueError("`curves` is empty; pass {label: (ood.roc_curve(...), auroc)}.")
    fig, ax = _figure_and_axes(ax, (3.6, 3.6))
    for label, (curve, auroc) in curves.items():
        ax.plot(curve.fpr, curve.tpr, label=f"{label} (AUROC {100 * auroc:.2f}%)", linewidth=1.2)
    ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=1)
    _finish_axes(ax, "false positive rate", "true positive rate", title, "lower right",
                 ylim=(0, 1))
    return fig


def temperature_curves(search, *, title: str = ""):
    """ECE and NLL against temperature from :func:`calib_jax.calibration.temperature_grid_search`."""
    temps = np.asarray(search.temperatures, np.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3), constrained_layout=True)
    for ax, values, name in ((left, search.ece, "ECE"), (right, search.nll, "NLL")):
        values = np.asarray(values, np.float64)
        ax.plot(temps, values, color="#3b75af")
        best = int(np.argmin(values))
        ax.axvline(temps[best], color="#b03030", linestyle="--",
                   label=f"min at T = {temps[best]:.1f}")
        ax.axvline(float(search.temperature), color="black", linestyle=":",
                   label=f"chosen T = {float(search.temperature):.1f}")
        ax.set_xlabel("temperature")
        ax.set_ylabel(name)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig
