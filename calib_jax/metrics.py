"""Calibration metrics: ECE, MCE, AdaECE, classwise ECE, NLL, accuracy, Brier, ECE_sweep.

Every metric maps ``(logits [N, C], labels [N])`` to a float32 scalar
**fraction** (the paper's tables print percentages). All are jittable (the bin
count and convention are static) and vmappable over a leading axis, e.g. many
temperatures or many models: ``jax.vmap(ece, in_axes=(0, None))``.

Binning conventions (``convention=``):

``"reference"`` (default) -- exactly what ``torrvision/focal_calibration``
    reports (see ``shared/docs/reference-conventions.md``):

    * edges are torch's float32 ``linspace(0, 1, num_bins + 1)``; for 15 bins
      these are the tabulated values in :data:`REFERENCE_EDGES_15` (several are
      not ``float32(k / 15)``); other counts reproduce torch's fused
      multiply-add kernel (checked against torch for 1..300 bins);
    * a sample is in bin ``b`` when ``edges[b] < value <= edges[b + 1]``,
      compared in float32, so a value of exactly 0 is in no bin but still
      counts in ``N``;
    * AdaECE edges are ``np.interp(linspace(0, N, B + 1), arange(N),
      sort(conf))`` rounded to float32 (so the minimum confidence is in no bin);
    * classwise ECE averages over ``K = max(label) + 1`` classes.

``"clean"`` -- the textbook variant: edges ``k / B``, every sample counted
    (values at or below the first edge go to the first bin), classwise ECE
    averages over all ``K = C`` classes.

Streaming: :class:`CalibrationStats` is a small pytree of per-bin sums.
:func:`update_stats` folds in a batch (with an optional mask for padding),
:func:`merge_stats` adds two of them, and every leaf is a plain sum, so
``jax.lax.psum(stats, axis_name)`` merges across devices and a host-side
``merge_stats`` across hosts. :func:`metrics_from_stats` then gives ECE, MCE,
classwise ECE, NLL, accuracy and Brier **equal to the whole-array values**
(bin counts exactly; sums up to float32 rounding). AdaECE cannot stream in one
pass, since its edges are quantiles of *all* confidences: collect the ``[N]``
top-label confidences (4 bytes a sample) with :func:`top_label_confidence`,
compute
:func:`adaptive_bin_edges` once, then stream a second pass with
``update_stats(..., edges=those_edges)`` and read ``ece`` off it.

Bootstrap: :func:`bootstrap_summary` gives every :func:`summary` metric an interval from the
resamples :func:`calib_jax.bootstrap.bootstrap` would draw, each computed from how often it
draws each example (:func:`summary_context` once, then :func:`summary_from_counts` per
resample: no softmax, sort or binning per resample).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import bootstrap, validation

__all__ = [
    "CONVENTIONS",
    "REFERENCE_EDGES_15",
    "CalibrationStats",
    "ReliabilityBins",
    "accuracy",
    "adaptive_bin_edges",
    "adaptive_ece",
    "bin_edges",
    "bootstrap_summary",
    "brier",
    "classwise_ece",
    "ece",
    "ece_sweep",
    "init_stats",
    "mce",
    "merge_stats",
    "metrics_from_stats",
    "nll",
    "psum_stats",
    "reliability_bins",
    "summary",
    "summary_context",
    "summary_from_counts",
    "SummaryContext",
    "sweep_num_bins",
    "top_label_confidence",
    "update_stats",
]

CONVENTIONS = ("reference", "clean")

#: torch.linspace(0, 1, 16) in float32, the reference's 15-bin edges.
REFERENCE_EDGES_15 = np.array([
    0.0, 0.06666667014360428, 0.13333334028720856, 0.20000001788139343,
    0.2666666805744171, 0.3333333432674408, 0.40000003576278687, 0.46666669845581055,
    0.5333333015441895, 0.5999999642372131, 0.6666666269302368, 0.7333333492279053,
    0.800000011920929, 0.8666666746139526, 0.9333333373069763, 1.0], dtype=np.float32)


def _check_options(num_bins, convention):
    validation.check_count(num_bins, "num_bins")
    if convention not in CONVENTIONS:
        raise ValueError(f"`convention` must be one of {CONVENTIONS}, got {convention!r}.")


@functools.lru_cache(maxsize=None)
def _edges_cached(num_bins: int, convention: str) -> np.ndarray:
    if convention == "clean":
        return (np.arange(num_bins + 1, dtype=np.float64) / num_bins).astype(np.float32)
    if num_bins == 15:
        return REFERENCE_EDGES_15.copy()
    # torch's CPU linspace: step = float32(1 / B); the first half is
    # fma(step, i, 0), the second half fma(-step, B - i, 1), each rounded once.
    # The product of a float32 and a small int is exact in float64, so a
    # float64 evaluation followed by one rounding reproduces the fma.
    n = num_bins + 1
    step = float(np.float32(1.0) / np.float32(num_bins))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, step * i, 1.0 - step * (n - 1 - i))
    return values.astype(np.float32)


def bin_edges(num_bins: int = 15, *, convention: str = "reference") -> np.ndarray:
    """The ``num_bins + 1`` float32 equal-width bin edges of a convention.

    >>> bin_edges(3, convention="clean").tolist()
    [0.0, 0.3333333432674408, 0.6666666865348816, 1.0]
    >>> float(bin_edges(15)[3])  # torch's float32 linspace, not float32(3 / 15)
    0.20000001788139343
    """
    _check_options(num_bins, convention)
    return _edges_cached(int(num_bins), convention).copy()


def _bin_index(values, edges, convention):
    """Bin of each value under the ``(lo, hi]`` rule; -1 for "in no bin"."""
    num_bins = edges.shape[-1] - 1
    # edges[b] < value <= edges[b+1] exactly when b + 1 edges lie below the value.
    # A broadcast compare over the B + 1 edges vectorises far better on CPU than
    # jnp.searchsorted's default (measured 0.7 ms vs 10 ms for 10^6 values).
    below = values.astype(edges.dtype)[..., None] > edges
    index = jnp.sum(below, axis=-1, dtype=jnp.int32) - 1
    if convention == "clean":
        return jnp.clip(index, 0, num_bins - 1)
    return jnp.where(index < num_bins, index, -1)


class _BinSums(NamedTuple):
    count: jax.Array      # int32 [..., B]
    conf_sum: jax.Array   # float32 [..., B]
    acc_sum: jax.Array    # float32 [..., B]


def _bin_sums(values, hits, index, mask, num_bins, weights=None):
    """Per-bin count / value sum / hit sum over the leading axis of ``values``.

    ``values``, ``hits``, ``index``: ``[N]`` (result ``[B]``) or ``[N, K]``
    (result ``[K, B]``); ``index`` -1 means "in no bin"; ``mask`` broadcasts;
    ``weights`` (optional int ``[N]``): how many times each example counts.
    One scatter-add (``segment_sum``) over ``K * B`` segments plus a drop
    segment: measured 20x faster on CPU than one masked reduction per bin.
    """
    extra = values.shape[1:]
    num_groups = int(np.prod(extra)) if extra else 1
    group = (jnp.arange(num_groups, dtype=jnp.int32).reshape(extra) * num_bins
             if extra else jnp.int32(0))
    dump = num_groups * num_bins
    keep = (index >= 0) & mask
    ids = jnp.where(keep, index + group, dump).reshape(-1)
    data = jnp.stack([values.astype(jnp.float32), hits.astype(jnp.float32)], -1)
    if weights is None:
        each = jnp.ones(ids.shape, jnp.int32)
    else:
        each = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * len(extra)),
                                values.shape).astype(jnp.int32)
        data = data * each[..., None].astype(jnp.float32)
        each = each.reshape(-1)
    sums = jax.ops.segment_sum(data.reshape(-1, 2), ids, num_segments=dump + 1)[:dump]
    # Counts as int32 in their own scatter: exact beyond float32's 2**24.
    count = jax.ops.segment_sum(each, ids, num_segments=dump + 1)[:dump]
    shape = extra + (num_bins,)
    return _BinSums(count.reshape(shape), sums[:, 0].reshape(shape), sums[:, 1].reshape(shape))


def _weighted_gap(sums: _BinSums, num_samples):
    """(n_b / N) |mean conf - mean acc| per bin, 0 for empty bins (reference order)."""
    nonempty = sums.count > 0
    safe = jnp.where(nonempty, sums.count, 1).astype(sums.conf_sum.dtype)
    gap = jnp.abs(sums.conf_sum / safe - sums.acc_sum / safe)
    prop = sums.count.astype(gap.dtype) / jnp.maximum(num_samples, 1).astype(gap.dtype)
    return jnp.where(nonempty, gap * prop, 0.0), jnp.where(nonempty, gap, 0.0)


class CalibrationStats(NamedTuple):
    """Streaming sufficient statistics; every leaf is a sum over samples.

    Attributes:
      count, conf_sum, acc_sum: ``[B]`` top-label bins.
      class_count, class_conf_sum, class_hit_sum: ``[C, B]`` classwise bins.
      label_count: ``[C]`` samples per label (gives the reference's
        ``K = max(label) + 1``).
      num_samples: ``[]`` samples seen (binned or not, mask excluded).
      correct: ``[]`` correct top-1 predictions.
      nll_sum, brier_sum: ``[]`` summed per-sample NLL and Brier score.
      edges: ``[B + 1]`` the top-label edges used (not summed: it is carried
        unchanged by :func:`merge_stats`; psum it only as ``edges`` would be
        multiplied, so use :func:`psum_stats`).
    """
    count: jax.Array
    conf_sum: jax.Array
    acc_sum: jax.Array
    class_count: jax.Array
    class_conf_sum: jax.Array
    class_hit_sum: jax.Array
    label_count: jax.Array
    num_samples: jax.Array
    correct: jax.Array
    nll_sum: jax.Array
    brier_sum: jax.Array
    edges: jax.Array


def init_stats(num_classes: int, num_bins: int = 15, *, convention: str = "reference",
               edges=None) -> CalibrationStats:
    """Empty :class:`CalibrationStats` for ``num_classes`` and ``num_bins``.

    Args:
      edges: optional ``[num_bins + 1]`` top-label edges (e.g. from
        :func:`adaptive_bin_edges` for a streamed AdaECE); classwise bins always
        use the convention's equal-width edges.
    """
    _check_options(num_bins, convention)
    validation.check_count(num_classes, "num_classes", minimum=2)
    if edges is None:
        edges = bin_edges(num_bins, convention=convention)
    edges = jnp.asarray(edges, dtype=jnp.float32)
    if edges.shape != (num_bins + 1,):
        raise ValueError(f"`edges` must have shape ({num_bins + 1},), got {edges.shape}.")
    zeros_b = jnp.zeros((num_bins,), jnp.float32)
    zeros_cb = jnp.zeros((num_classes, num_bins), jnp.float32)
    return CalibrationStats(
        count=jnp.zeros((num_bins,), jnp.int32), conf_sum=zeros_b, acc_sum=zeros_b,
        class_count=jnp.zeros((num_classes, num_bins), jnp.int32),
        class_conf_sum=zeros_cb, class_hit_sum=zeros_cb,
        label_count=jnp.zeros((num_classes,), jnp.int32),
        num_samples=jnp.zeros((), jnp.int32), correct=jnp.zeros((), jnp.int32),
        nll_sum=jnp.zeros((), jnp.float32), brier_sum=jnp.zeros((), jnp.float32),
        edges=edges)


def _softmax_parts(logits, labels, mask=None):
    """Log-probs, probs, top confidence, prediction, and "every (unmasked) row is valid"."""
    logits = logits.astype(validation.compute_dtype(logits.dtype))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    # softmax as torch computes it, exp(z - max) / sum, not exp(log_softmax):
    # the two differ by an ulp, and equal-mass edges sit exactly on confidences.
    probs = jax.nn.softmax(logits, axis=-1)
    # The reference bins max(softmax) and argmax(softmax) (first index on ties).
    pred = jnp.argmax(probs, axis=-1)
    conf = jnp.max(probs, axis=-1)
    row_ok = validation.valid_rows(logits, labels)
    if mask is not None:
        row_ok |= ~mask
    return log_probs, probs, conf, pred, jnp.all(row_ok)


def _top_label_bin_sums(conf, hits, edges, convention, mask, weights=None):
    """Top-label bins of the confidences under ``edges`` (each example ``weights`` times)."""
    return _bin_sums(conf.astype(jnp.float32), hits, _bin_index(conf, edges, convention), mask,
                     edges.shape[-1] - 1, weights)


def _classwise_bin_sums(probs, one_hot, num_bins, convention, mask):
    """``[C, B]`` bins of every class's probability (equal-width edges), ``mask`` ``[N]``."""
    edges = jnp.asarray(bin_edges(num_bins, convention=convention))
    return _bin_sums(probs.astype(jnp.float32), one_hot, _bin_index(probs, edges, convention),
                     mask[:, None], num_bins)


def _nll_and_brier(log_probs, probs, labels, one_hot):
    """Per-example NLL and Brier score ``([N], [N])``."""
    safe = jnp.clip(labels, 0, log_probs.shape[-1] - 1)
    nll_each = -jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
    return nll_each, jnp.sum((one_hot - probs) ** 2, axis=-1)


@functools.partial(jax.jit, static_argnames=("convention",))
def _update_stats(stats: CalibrationStats, logits, labels, mask, convention):
    num_bins = stats.count.shape[-1]
    num_classes = logits.shape[-1]
    log_probs, probs, conf, pred, ok = _softmax_parts(logits, labels, mask)
    hits = (pred == labels).astype(jnp.float32)
    top = _top_label_bin_sums(conf, hits, stats.edges, convention, mask)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    cls = _classwise_bin_sums(probs, one_hot, num_bins, convention, mask)
    nll_each, brier_each = _nll_and_brier(log_probs, probs, labels, one_hot)
    fmask = mask.astype(jnp.float32)
    poison = jnp.where(ok, 0.0, jnp.nan)  # NaN propagates into every float sum.
    return CalibrationStats(
        count=stats.count + top.count,
        conf_sum=stats.conf_sum + top.conf_sum + poison,
        acc_sum=stats.acc_sum + top.acc_sum,
        class_count=stats.class_count + cls.count,
        class_conf_sum=stats.class_conf_sum + cls.conf_sum + poison,
        class_hit_sum=stats.class_hit_sum + cls.acc_sum,
        label_count=stats.label_count + jnp.sum(one_hot * fmask[:, None], 0).astype(jnp.int32),
        num_samples=stats.num_samples + jnp.sum(mask, dtype=jnp.int32),
        correct=stats.correct + jnp.sum(hits * fmask).astype(jnp.int32),
        nll_sum=stats.nll_sum + jnp.sum(nll_each.astype(jnp.float32) * fmask) + poison,
        brier_sum=stats.brier_sum + jnp.sum(brier_each.astype(jnp.float32) * fmask) + poison,
        edges=stats.edges)


def update_stats(stats: CalibrationStats, logits, labels, *, mask=None,
                 convention: str = "reference") -> CalibrationStats:
    """Folds a batch into ``stats``.

    Args:
      stats: from :func:`init_stats` (or a previous update / merge).
      logits: ``[n, C]``; labels: ``[n]``.
      mask: optional bool ``[n]``; False rows (e.g. padding of the last
        evaluation batch) are ignored entirely, not counted in ``N``.
      convention: must match the one ``stats`` was initialised with.
    """
    _check_options(int(stats.count.shape[-1]), convention)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != np.shape(labels) or mask.dtype != jnp.bool_:
            raise ValueError(f"`mask` must be a bool array of shape {np.shape(labels)}, got "
                             f"{mask.dtype}{tuple(mask.shape)}.")
    # Padding rows (mask False) are not value-checked: they may hold anything.
    logits, labels = validation.check_logits_and_labels(logits, labels, where=mask)
    if logits.shape[-1] != stats.label_count.shape[-1]:
        raise ValueError(
            f"`logits` has {logits.shape[-1]} classes but `stats` was initialised for "
            f"{stats.label_count.shape[-1]}.")
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    return _update_stats(stats, logits, labels, mask, convention)


def merge_stats(a: CalibrationStats, b: CalibrationStats) -> CalibrationStats:
    """Sum of two stats (e.g. from two hosts); both must use the same edges.

    Stats of other shapes (classes, bins) raise ``ValueError``; so do concrete stats binned
    under different edges (e.g. two hosts' own AdaECE edges: compute the edges once from all
    confidences). Under ``jit`` different edges make the top-label sums, hence ECE and MCE,
    NaN: their bins do not add up to any binning.
    """
    shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(a)]
    if shapes != [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(b)]:
        raise ValueError(
            f"`a` and `b` must come from init_stats with the same num_classes and num_bins; got "
            f"{a.class_count.shape[0]} classes x {a.count.shape[0]} bins and "
            f"{b.class_count.shape[0]} classes x {b.count.shape[0]} bins.")
    same_edges = jnp.all(a.edges == b.edges)
    if validation.is_concrete(a.edges, b.edges) and not bool(same_edges):
        raise ValueError("`a` and `b` were binned under different top-label edges; merge only "
                         "stats made with the same init_stats(..., edges=...) edges.")
    merged = jax.tree_util.tree_map(jnp.add, a._replace(edges=None), b._replace(edges=None))
    nan = jnp.float32(jnp.nan)
    return merged._replace(edges=a.edges,
                           conf_sum=jnp.where(same_edges, merged.conf_sum, nan),
                           acc_sum=jnp.where(same_edges, merged.acc_sum, nan))


def psum_stats(stats: CalibrationStats, axis_name) -> CalibrationStats:
    """``lax.psum`` of every sum in ``stats`` over ``axis_name`` (inside shard_map)."""
    summed = jax.lax.psum(stats._replace(edges=None), axis_name)
    return summed._replace(edges=stats.edges)


def _classwise_from_sums(class_sums: _BinSums, label_count, num_samples, convention):
    per_class, _ = _weighted_gap(class_sums, num_samples)
    per_class = jnp.sum(per_class, axis=-1)  # [C]
    num_classes = per_class.shape[0]
    if convention == "clean":
        return jnp.mean(per_class)
    present = jnp.arange(num_classes) * (label_count > 0)
    k = jnp.max(present) + 1  # reference: K = max(label) + 1
    return jnp.sum(jnp.where(jnp.arange(num_classes) < k, per_class, 0.0)) / k


@functools.partial(jax.jit, static_argnames=("convention",))
def metrics_from_stats(stats: CalibrationStats, convention: str = "reference") -> dict:
    """All streamable metrics from :class:`CalibrationStats`, as a dict of scalars.

    Keys: ``ece``, ``mce``, ``classwise_ece``, ``nll``, ``accuracy``,
    ``error``, ``brier``, ``num_samples``. With no sample seen every metric is NaN.
    """
    top = _BinSums(stats.count, stats.conf_sum, stats.acc_sum)
    weighted, gap = _weighted_gap(top, stats.num_samples)
    cls = _BinSums(stats.class_count, stats.class_conf_sum, stats.class_hit_sum)
    n = jnp.maximum(stats.num_samples, 1).astype(jnp.float32)
    acc = stats.correct.astype(jnp.float32) / n
    values = {
        "ece": jnp.sum(weighted),
        "mce": jnp.max(gap),
        "classwise_ece": _classwise_from_sums(cls, stats.label_count, stats.num_samples,
                                              convention),
        "nll": stats.nll_sum / n,
        "accuracy": acc,
        "error": 1.0 - acc,
        "brier": stats.brier_sum / n,
    }
    # No sample seen: every metric is undefined (NaN), not a perfect 0.
    seen = stats.num_samples > 0
    values = {k: jnp.where(seen, v, jnp.float32(jnp.nan)) for k, v in values.items()}
    return {**values, "num_samples": stats.num_samples}


# ----------------------------------------------------------------------------
# Whole-array metrics.


@functools.partial(jax.jit, static_argnames=("num_bins", "convention", "adaptive"))
def _top_label_sums(logits, labels, num_bins, convention, adaptive=False):
    """Top-label bin sums, the edges used, and the validity flag."""
    _, _, conf, pred, ok = _softmax_parts(logits, labels)
    if adaptive:
        edges = adaptive_bin_edges(conf, num_bins)
    else:
        edges = jnp.asarray(bin_edges(num_bins, convention=convention))
    hits = (pred == labels).astype(jnp.float32)
    sums = _top_label_bin_sums(conf, hits, edges, convention, jnp.ones(labels.shape, bool))
    return sums, edges, ok


@functools.partial(jax.jit, static_argnames=("num_bins", "convention", "adaptive"))
def _ece_impl(logits, labels, num_bins, convention, adaptive=False):
    sums, _, ok = _top_label_sums(logits, labels, num_bins, convention, adaptive)
    weighted, gap = _weighted_gap(sums, labels.shape[0])
    nan = jnp.float32(jnp.nan)
    return jnp.where(ok, jnp.sum(weighted), nan), jnp.where(ok, jnp.max(gap), nan)


def ece(logits, labels, *, num_bins: int = 15, convention: str = "reference"):
    r"""Expected calibration error of the top-label confidence (equal-width bins).

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{N}\,
              \left|\overline{\mathrm{conf}}_b - \overline{\mathrm{acc}}_b\right|

    Args:
      logits: ``[N, C]`` unnormalised scores; labels: ``[N]`` integers.
      num_bins: static bin count (15 in the paper).
      convention: ``"reference"`` or ``"clean"`` (module docstring).

    Returns:
      float32 scalar in ``[0, 1]``.

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> # three bins: 0.9 right (gap 0.1), 0.6 wrong (0.6), 0.7 right (0.3); each n_b / N = 1/3
    >>> round(float(ece(logits, jnp.array([0, 1, 1]))), 4)
    0.3333

    References:
      Naeini, Cooper, Hauskrecht, *Obtaining Well Calibrated Probabilities
      Using Bayesian Binning*, AAAI 2015. Guo et al., *On Calibration of Modern
      Neural Networks*, ICML 2017.
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _ece_impl(logits, labels, int(num_bins), convention)[0]


def mce(logits, labels, *, num_bins: int = 15, convention: str = "reference"):
    r"""Maximum calibration error: the largest per-bin gap (empty bins count 0).

    .. math:: \mathrm{MCE} = \max_b \left|\overline{\mathrm{conf}}_b -
              \overline{\mathrm{acc}}_b\right|

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> round(float(mce(logits, jnp.array([0, 1, 1]))), 4)
    0.6
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _ece_impl(logits, labels, int(num_bins), convention)[1]


@jax.jit
def _top_label_confidence(logits):
    return _softmax_parts(logits, jnp.zeros(logits.shape[:1], jnp.int32))[2]


def top_label_confidence(logits):
    """Max softmax probability ``[N, C] -> [N]``, computed exactly as the metrics do.

    Use it for the first pass of a streamed AdaECE (see the module docstring):
    equal-mass edges sit exactly on confidences, so both passes must compute
    them identically.
    """
    return _top_label_confidence(validation.check_logits(logits))


def adaptive_bin_edges(confidences, num_bins: int = 15):
    """Equal-mass edges: ``np.interp(linspace(0, N, B+1), arange(N), sort(conf))``.

    The interpolation is done without forming ``k * N / B`` in floating point:
    the integer part and the fraction are taken from exact integer arithmetic,
    so only the final interpolation rounds (in float32, or float64 under
    ``jax_enable_x64``). Under float32 an edge can differ from the reference's
    float64-then-float32 edge by an ulp; it only changes a result when two
    sorted confidences are within a few ulp of each other.

    Args:
      confidences: ``[N]`` top-label confidences (e.g. all of a data set).
      num_bins: static bin count.

    Returns:
      ``[num_bins + 1]`` float32 edges; the first is ``min(conf)``, the last
      ``max(conf)``.
    """
    confidences = jnp.asarray(confidences)
    n = confidences.shape[0]
    if n == 0:
        raise ValueError("`confidences` is empty; AdaECE needs at least one sample.")
    xs = jnp.sort(confidences.astype(validation.compute_dtype(confidences.dtype)))
    return _equal_mass_edges(lambda position: xs[position], n, num_bins, xs.dtype)


def _equal_mass_edges(sorted_value_at, n, num_bins: int, dtype):
    """:func:`adaptive_bin_edges` of ``n`` sorted values (``n`` an int or a traced int32
    scalar >= 1), read through ``sorted_value_at(positions)``: the value at each 0-based
    position of the sorted order. Position ``k n / B`` is split as ``floor`` and fraction in
    exact integer arithmetic (``k n = k (n // B) B + k (n % B)``: no product beyond
    ``(B + 1) B``, so no int32 overflow), and the fraction ``r / B`` is read from a float64
    table rounded once to ``dtype``, as NumPy's interpolation weights are."""
    k = jnp.arange(num_bins + 1, dtype=jnp.int32)
    whole = k * (n // num_bins) + (k * (n % num_bins)) // num_bins  # floor(k n / B)
    remainder = (k * (n % num_bins)) % num_bins                      # k n mod B
    fractions = jnp.asarray(np.arange(num_bins, dtype=np.float64) / num_bins, dtype)
    frac = jnp.where(whole >= n - 1, jnp.zeros((), dtype), fractions[remainder])
    base = jnp.minimum(whole, n - 1)
    lo = sorted_value_at(base)
    edges = lo + (sorted_value_at(jnp.minimum(base + 1, n - 1)) - lo) * frac
    return edges.astype(jnp.float32)


def adaptive_ece(logits, labels, *, num_bins: int = 15, convention: str = "reference"):
    r"""Adaptive (equal-mass) ECE, "AdaECE" of the paper.

    Same formula as :func:`ece`, with bin edges at the quantiles of the
    top-label confidence (:func:`adaptive_bin_edges`). Under the reference
    convention every sample equal to the minimum confidence is in no bin but
    still counts in ``N``; ``convention="clean"`` puts it in the first bin.

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> # edges [0.6, 0.8, 0.9]: the minimum (0.6) is in no bin but counts in N = 3
    >>> round(float(adaptive_ece(logits, jnp.array([0, 1, 1]), num_bins=2)), 4)
    0.1333

    References:
      Nguyen & O'Connor, *Posterior calibration and exploratory analysis for
      natural language processing models*, EMNLP 2015; Mukhoti et al. 2020.
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _ece_impl(logits, labels, int(num_bins), convention, adaptive=True)[0]


@functools.partial(jax.jit, static_argnames=("num_bins", "convention"))
def _classwise_impl(logits, labels, num_bins, convention):
    _, probs, _, _, ok = _softmax_parts(logits, labels)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    sums = _classwise_bin_sums(probs, one_hot, num_bins, convention,
                               jnp.ones(labels.shape, bool))
    label_count = jnp.sum(one_hot, axis=0)
    value = _classwise_from_sums(sums, label_count, labels.shape[0], convention)
    return jnp.where(ok, value, jnp.nan)


def classwise_ece(logits, labels, *, num_bins: int = 15, convention: str = "reference"):
    r"""Classwise ECE: the ECE of each class's probability, averaged over classes.

    .. math:: \mathrm{CECE} = \frac{1}{K}\sum_{k<K}\sum_b \frac{n_{kb}}{N}
              \left|\overline{p_k}_b - \overline{\mathbb{1}[y=k]}_b\right|

    ``K = max(labels) + 1`` under the reference convention (trailing classes
    that never occur as labels are dropped), ``K = C`` under ``"clean"``.

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> round(float(classwise_ece(logits, jnp.array([0, 1, 1]))), 4)
    0.3333
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _classwise_impl(logits, labels, int(num_bins), convention)


@jax.jit
def _nll_acc_brier(logits, labels):
    log_probs, probs, _, pred, ok = _softmax_parts(logits, labels)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
    nll_each, brier_each = _nll_and_brier(log_probs, probs, labels, one_hot)
    nan = jnp.float32(jnp.nan)
    return (jnp.where(ok, jnp.mean(nll_each), nan),
            jnp.where(ok, jnp.mean((pred == labels).astype(jnp.float32)), nan),
            jnp.where(ok, jnp.mean(brier_each), nan))


def nll(logits, labels):
    r"""Mean negative log-likelihood (cross-entropy) over samples.

    >>> import jax.numpy as jnp
    >>> round(float(nll(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
    1.3863
    """
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _nll_acc_brier(logits, labels)[0]


def accuracy(logits, labels):
    r"""Top-1 accuracy (first index wins ties); the error is ``1 - accuracy``.

    >>> import jax.numpy as jnp
    >>> float(accuracy(jnp.array([[1.0, 0.0], [1.0, 2.0]]), jnp.array([0, 0])))
    0.5
    """
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _nll_acc_brier(logits, labels)[1]


def brier(logits, labels):
    r"""Mean multi-class Brier score, :math:`\frac1N\sum_i\sum_k (\mathbb{1}[k=y_i]-p_{ik})^2`.

    >>> import jax.numpy as jnp
    >>> float(brier(jnp.zeros((1, 2)), jnp.array([0])))
    0.5
    """
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _nll_acc_brier(logits, labels)[2]


def _equal_mass_bin_of(positions, num_samples: int, num_bins):
    """Bin of each sorted position when ``num_samples`` are split into ``num_bins`` (traced,
    ``1 <= num_bins <= num_samples``) equal-mass bins as ``np.array_split`` splits: the
    first ``num_samples % num_bins`` bins hold one more."""
    size, extra = num_samples // num_bins, num_samples % num_bins
    big = extra * (size + 1)  # positions in the larger bins
    return jnp.where(positions < big, positions // (size + 1),
                     extra + (positions - big) // jnp.maximum(size, 1))


def _equal_mass_bin_starts(num_samples: int, num_bins, k):
    """First sorted position of bin ``k`` (``0 <= k <= num_bins``; ``k = num_bins`` gives
    ``num_samples``) of :func:`_equal_mass_bin_of`'s split."""
    size, extra = num_samples // num_bins, num_samples % num_bins
    return k * size + jnp.minimum(k, extra)


def _sweep_capacities(num_samples: int) -> list[int]:
    """Static sizes of the sweep's stages: 16, 256, 4096, ... below N, and N. Each stage
    compiles a loop of its own (~0.3 s on a 2-core CPU), so there are few; up to 256
    examples, one (a check of every pair of bins costs little there)."""
    capacities, k = [], 16
    while k < num_samples and num_samples > 256:
        capacities.append(k)
        k *= 16
    return capacities + [num_samples]


def _sweep_num_bins(correct):
    """``b*`` of the sweep over ``correct`` ([N] bool, in ascending confidence): the most
    equal-mass bins such that every count up to it keeps the bins' accuracies
    non-decreasing (Roelofs et al.'s Algorithm 1, which tries 2, 3, ... bins in turn).

    Each count is checked without a pass over the N examples: a bin's hits are differences
    of the running hit count at its ends (integers: neighbouring bins' accuracies are
    compared exactly), and only some pairs of neighbouring bins are compared. An adjacent pair
    can fall only into a bin that holds a wrong prediction (a bin without one has accuracy
    1), and only out of a bin that holds a right one (accuracy above 0). So the pairs
    compared are all ``b`` pairs while ``b`` is small, or the pairs around the examples of the
    minority (wrong predictions where they are at most half, else right ones), whichever
    fits: the stages have static sizes (:func:`_sweep_capacities`), and a stage runs while
    the next count or the minority fits it. An accurate model's sweep can reach thousands
    of bins; this keeps each of its steps as small as its few wrong predictions. Hits
    already in order (every wrong prediction below every right one) keep every count's
    accuracies in order: ``b* = N`` at once."""
    n = correct.shape[0]
    hits_before = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                   jnp.cumsum(correct.astype(jnp.int32))])
    num_right = hits_before[-1]
    few_wrong = 2 * (n - num_right) <= n
    minority = jnp.where(few_wrong, ~correct, correct)
    num_minority = jnp.where(few_wrong, n - num_right, num_right)

    def in_order(b, first, compared):
        # Bin first's accuracy <= bin first + 1's, wherever compared, exactly: h / (s + 1)
        # <= h' / s' for hits h, h' and sizes s + 1 >= s' (larger bins come first) holds iff
        # h <= h' or both bins are all right. (Divided in float32, 5000 / 5001 and
        # 4999 / 5000 are one float; products of counts would overflow int32 past N = 46,340.)
        first = jnp.clip(first, 0, jnp.maximum(b - 2, 0))
        lo, mid, hi = (_equal_mass_bin_starts(n, b, first + i) for i in range(3))
        hit, next_hit = hits_before[mid] - hits_before[lo], hits_before[hi] - hits_before[mid]
        ordered = (hit <= next_hit) | ((hit == mid - lo) & (next_hit == hi - mid))
        return jnp.all(~compared | ordered)

    def stage(state, capacity):
        k = jnp.arange(capacity)
        positions = jnp.nonzero(minority, size=capacity, fill_value=0)[0]
        listed = k < num_minority

        def fits(b):  # count b can be checked in this stage
            return (b <= capacity) | (num_minority <= capacity)

        def check(b):  # the accuracies of b bins are in order
            every_pair = in_order(b, k, k + 1 < b)
            if capacity == n:  # every count fits: no pairs near the minority needed
                return every_pair
            # Few wrong: the pair into each wrong prediction's bin; few right: the pair out
            # of each right one's bin.
            first = _equal_mass_bin_of(positions, n, b) - few_wrong.astype(jnp.int32)
            near_minority = in_order(b, first, listed & (first >= 0) & (first + 1 < b))
            return jnp.where(b <= capacity, every_pair, near_minority)

        def going(s):
            b, not_failed = s
            return not_failed & (b < n) & fits(b + 1)

        def next_count(s):
            up = check(s[0] + 1)
            return jnp.where(up, s[0] + 1, s[0]), up

        return jax.lax.while_loop(going, next_count, state)

    ordered = jnp.all(correct[1:] >= correct[:-1])
    state = (jnp.where(ordered, jnp.int32(n), jnp.int32(1)), ~ordered)
    for capacity in _sweep_capacities(n):
        state = stage(state, capacity)
    return state[0]


@functools.partial(jax.jit, static_argnames=("order",))
def _ece_sweep_impl(logits, labels, order):
    _, _, conf, pred, ok = _softmax_parts(logits, labels)
    n = labels.shape[0]
    sort = jnp.argsort(conf, stable=True)  # ties keep their input order
    conf = conf[sort].astype(jnp.float32)
    correct = (pred == labels)[sort]
    b_star = _sweep_num_bins(correct)
    ids = _equal_mass_bin_of(jnp.arange(n), n, b_star)
    hits = correct.astype(jnp.float32)
    count = jax.ops.segment_sum(jnp.ones_like(hits), ids, num_segments=n)
    hit = jax.ops.segment_sum(hits, ids, num_segments=n)
    conf_sum = jax.ops.segment_sum(conf, ids, num_segments=n)
    safe = jnp.maximum(count, 1.0)
    gap = jnp.abs(conf_sum / safe - hit / safe) ** order
    value = jnp.sum(count / n * gap) ** (1.0 / order)
    return jnp.where(ok, value, jnp.nan), b_star


def _check_order(order):
    # Finite: p = inf (a max norm) would raise the sum to the power 0, i.e. give 1.
    if isinstance(order, bool) or not isinstance(order, (int, float, np.integer,
                                                         np.floating)) \
            or not 1 <= order < float("inf"):
        raise ValueError(f"`order` must be a finite number >= 1 (1: the mean absolute gap, as "
                         f"ece; 2: the root mean squared gap), got {order!r}.")
    return float(order)


def ece_sweep(logits, labels, *, order: float = 1, return_num_bins: bool = False):
    r"""Monotonic-sweep ECE: the ECE of equal-mass bins, as many as keep the bins'
    accuracies non-decreasing in confidence ("ECE_sweep", Roelofs et al.).

    .. math:: \mathrm{ECE_{sweep}} = \Big(\sum_{b \le b^*} \frac{n_b}{N}
              \left|\overline{\mathrm{conf}}_b - \overline{\mathrm{acc}}_b\right|^p
              \Big)^{1/p}, \quad b^* = \max\{b : \text{every } b' \le b
              \text{ gives } \overline{\mathrm{acc}}_1 \le \dots \le
              \overline{\mathrm{acc}}_{b'}\}

    A fixed bin count measures noise as miscalibration: with 15 bins a calibrated model's
    test ECE is well above 0 (see :mod:`calib_jax.bootstrap`'s table). A true calibration
    curve rises with confidence, so the sweep adds equal-mass bins while the bins'
    accuracies still do, and stops before the first count at which they fall: the finest
    binning the data support. Roelofs et al. measured it the least biased of the binned
    estimators they compared. Measured here (``benchmarks/bootstrap_coverage.py``: 40
    simulated test sets of 2,000 examples, 10 classes): a calibrated model's mean test
    estimate 2.17 % against 15-bin ECE's 2.63 % (population 0.15 %), an over-confident one's
    6.11 % against 6.20 % (population 6.03 %). Not a reference metric (the paper reports
    :func:`ece` and :func:`adaptive_ece`): an extra, for judging a nearly calibrated model.

    Bins: the top-label confidences sorted (ties in input order), split as
    ``np.array_split`` splits (the first ``N % b`` bins one larger). The bins' accuracies
    are compared exactly, as fractions of integers (in float32, two accuracies of large bins
    can round to one float: 5000 / 5001 and 4999 / 5000). :func:`sweep_num_bins` gives
    ``b*``.

    Args:
      logits: ``[N, C]`` unnormalised scores; labels: ``[N]`` integers.
      order: ``p`` of the formula, finite and >= 1 (static): 1 (default) is :func:`ece`'s
        mean absolute gap, 2 the root mean squared gap.
      return_num_bins: also return ``b*`` (as :func:`sweep_num_bins`, from the same sweep).

    Returns:
      float32 scalar in ``[0, 1]`` (NaN for logits that are not finite); with
      ``return_num_bins``, ``(value, b*)``. Jittable and
      vmappable. After one sort, each count of bins the sweep tries costs a few operations
      per bin while the count is small, and per wrong prediction (or right one, whichever
      are fewer) after, not a pass over the ``N`` examples. 2-core CPU, N = 10,000 x 10
      classes: 4-14 ms whether b* is 14, 302, 4,999 or N (it was 6 ms, 38 ms, 0.40 s and
      0.69 s with a pass per count), after a first call of ~2.3 s (0.8 s before: the
      sweep's stages compile a loop each); 1,000 resamples with
      :func:`calib_jax.bootstrap.bootstrap`: 4.4 s for a calibrated model (b* = 14), ~11 s
      for one with two wrong predictions among its least confident (b* = 302, its resamples'
      up to N; 136 s with a pass per count).

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]))
    >>> labels = jnp.array([0, 1, 0, 0])  # by confidence: 0.6 wrong, 0.7, 0.8, 0.9 right
    >>> int(sweep_num_bins(logits, labels)), round(float(ece_sweep(logits, labels)), 4)
    (4, 0.3)
    >>> labels = jnp.array([0, 1, 0, 1])  # 0.8 wrong: three bins' accuracies 0.5, 0, 1
    >>> int(sweep_num_bins(logits, labels)), round(float(ece_sweep(logits, labels)), 4)
    (2, 0.25)

    References:
      Roelofs, Cain, Shlens, Mozer, *Mitigating Bias in Calibration Error Estimation*,
      AISTATS 2022 (Algorithm 1, Eq. 8).
    """
    order = _check_order(order)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    value, num_bins = _ece_sweep_impl(logits, labels, order)
    return (value, num_bins) if return_num_bins else value


def sweep_num_bins(logits, labels):
    """``b*`` of :func:`ece_sweep`: the number of equal-mass bins its sweep settled on (int32;
    1 when two bins already break the accuracies' order)."""
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _ece_sweep_impl(logits, labels, 1.0)[1]


@functools.partial(jax.jit, static_argnames=("num_bins", "convention"))
def _summary_impl(logits, labels, num_bins, convention):
    log_probs, probs, conf, pred, ok = _softmax_parts(logits, labels)
    n = labels.shape[0]
    num_classes = logits.shape[-1]
    hits = (pred == labels).astype(jnp.float32)
    everyone = jnp.ones(labels.shape, bool)
    edges = jnp.asarray(bin_edges(num_bins, convention=convention))
    top = _top_label_bin_sums(conf, hits, edges, convention, everyone)
    weighted, gap = _weighted_gap(top, n)
    ada = _top_label_bin_sums(conf, hits, adaptive_bin_edges(conf, num_bins), convention, everyone)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    cls = _classwise_bin_sums(probs, one_hot, num_bins, convention, everyone)
    nll_each, brier_each = _nll_and_brier(log_probs, probs, labels, one_hot)
    acc = jnp.mean(hits)
    values = {
        "ece": jnp.sum(weighted),
        "adaptive_ece": jnp.sum(_weighted_gap(ada, n)[0]),
        "classwise_ece": _classwise_from_sums(cls, jnp.sum(one_hot, 0), n, convention),
        "mce": jnp.max(gap),
        "nll": jnp.mean(nll_each),
        "accuracy": acc,
        "error": 1.0 - acc,
        "brier": jnp.mean(brier_each),
    }
    return {k: jnp.where(ok, v.astype(jnp.float32), jnp.nan) for k, v in values.items()}


def summary(logits, labels, *, num_bins: int = 15, convention: str = "reference") -> dict:
    """Every metric of this module in one compiled pass (one softmax).

    Returns a dict of float32 scalars: ``ece``, ``adaptive_ece``,
    ``classwise_ece``, ``mce``, ``nll``, ``accuracy``, ``error``, ``brier``;
    each equals the corresponding single-metric function.

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> values = summary(logits, jnp.array([0, 1, 1]))
    >>> {k: round(float(values[k]), 4) for k in ("ece", "adaptive_ece", "mce", "nll", "brier")}
    {'ece': 0.3333, 'adaptive_ece': 0.1333, 'mce': 0.6, 'nll': 0.4594, 'brier': 0.3067}
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _summary_impl(logits, labels, int(num_bins), convention)


# ----------------------------------------------------------------------------
# Every metric of a resample from its counts (bootstrap without gathering).

#: Bin counts are summed in float32 (one matrix product per resample chunk): exact for
#: integers up to 2**24, so a multiset of more examples is refused.
MAX_COUNTED_EXAMPLES = 2 ** 24


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["per_example", "class_probs", "class_bins", "class_labels",
                                "order", "sorted_conf", "sorted_hit", "row_ok"],
                   meta_fields=["num_bins", "convention"])
@dataclasses.dataclass(frozen=True)
class SummaryContext:
    """What :func:`summary_from_counts` needs of ``(logits [N, C], labels [N])``, computed
    once by :func:`summary_context` (a pytree; ``num_bins`` and ``convention`` are static).

    Attributes:
      per_example: ``[N, 3 B + 3]`` float32: each example's equal-width top-label bin as
        one-hot rows of its count (1), confidence and hit, and its NLL, Brier score and hit (a
        resample's sums are one product with its counts).
      class_probs, class_labels: ``[N, C]`` float32 probabilities and one-hot labels (the
        labels' product with the counts is each class's count).
      class_bins: ``[N, C]`` int32 classwise bin of each probability (-1: in no bin).
      order: ``[N]`` int32 examples by ascending top-label confidence (stable).
      sorted_conf, sorted_hit: ``[N]`` confidences (compute dtype) and hits in that order.
      row_ok: ``[N]`` bool, the row's logits are finite and its label in range (the
        features of other rows are zeroed; a resample that draws one is NaN).
    """
    per_example: jax.Array
    class_probs: jax.Array
    class_bins: jax.Array
    class_labels: jax.Array
    order: jax.Array
    sorted_conf: jax.Array
    sorted_hit: jax.Array
    row_ok: jax.Array
    num_bins: int
    convention: str


@functools.partial(jax.jit, static_argnames=("num_bins", "convention"))
def _summary_context_impl(logits, labels, num_bins, convention):
    log_probs, probs, conf, pred, _ = _softmax_parts(logits, labels)
    num_classes = logits.shape[-1]
    row_ok = validation.valid_rows(logits, labels)
    hits = (pred == labels).astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    nll_each, brier_each = _nll_and_brier(log_probs, probs, labels, one_hot)
    edges = jnp.asarray(bin_edges(num_bins, convention=convention))
    top = jax.nn.one_hot(_bin_index(conf, edges, convention), num_bins, dtype=jnp.float32)
    conf32 = conf.astype(jnp.float32)
    per_example = jnp.concatenate(
        [top, top * conf32[:, None], top * hits[:, None],
         jnp.stack([nll_each, brier_each, hits], -1).astype(jnp.float32)], axis=1)
    # A bad row's features are zeroed (0 x NaN would poison every resample, drawn or not);
    # its confidence becomes 0, so it sorts first and lies below every edge.
    conf = jnp.where(row_ok, conf, 0)
    order = jnp.argsort(conf, stable=True).astype(jnp.int32)
    class_probs = jnp.where(row_ok[:, None], probs, 0).astype(jnp.float32)
    return SummaryContext(
        per_example=jnp.where(row_ok[:, None], per_example, 0),
        class_probs=class_probs,
        class_bins=_bin_index(class_probs, edges, convention),
        class_labels=jnp.where(row_ok[:, None], one_hot, 0),
        order=order, sorted_conf=conf[order], sorted_hit=jnp.where(row_ok, hits, 0)[order],
        row_ok=row_ok, num_bins=num_bins, convention=convention)


def summary_context(logits, labels, *, num_bins: int = 15,
                    convention: str = "reference") -> SummaryContext:
    """:class:`SummaryContext` of ``(logits [N, C], labels [N])``: the ``prepare`` of
    :func:`summary_from_counts` (one softmax, one sort), for
    :func:`calib_jax.bootstrap.bootstrap_by_counts` (:func:`bootstrap_summary` uses it).

    Memory ``O(N (C + B))``. ``N`` is at most :data:`MAX_COUNTED_EXAMPLES` (2**24).
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    if labels.shape[0] > MAX_COUNTED_EXAMPLES:
        raise ValueError(f"`logits` has {labels.shape[0]} examples; counted metrics sum bin "
                         f"counts in float32, exact up to {MAX_COUNTED_EXAMPLES} (2**24): use "
                         f"bootstrap.bootstrap(metrics.summary, ...) for more.")
    return _summary_context_impl(logits, labels, int(num_bins), convention)


def _counted_classwise_sums(context: SummaryContext, weights):
    """``[C, B]`` classwise bin sums: per bin one product of the weights with the
    probabilities (and labels) in that bin; memory ``O(N C)`` whatever ``B``."""
    def one_bin(b):
        inside = (context.class_bins == b).astype(jnp.float32)
        features = jnp.concatenate([inside, inside * context.class_probs,
                                    inside * context.class_labels], axis=1)
        return jnp.dot(weights, features, precision=jax.lax.Precision.HIGHEST)

    per_bin = jax.lax.map(one_bin, jnp.arange(context.num_bins)).T  # [3C, B]
    count, conf_sum, hit_sum = jnp.split(per_bin, 3)
    return _BinSums(jnp.round(count).astype(jnp.int32), conf_sum, hit_sum)


def summary_from_counts(context: SummaryContext, counts) -> dict:
    """:func:`summary` of the multiset that holds example ``i`` ``counts[i]`` times (all
    ones: :func:`summary` itself, up to float32 rounding), from :func:`summary_context`;
    jittable, no softmax and no sort per call.

    The by-counts form of :func:`summary` for :func:`calib_jax.bootstrap.bootstrap_by_counts`
    (``prepare=summary_context``). The equal-width bins of every example are fixed, so a
    resample's bin sums are products of its counts with the context's features (float32 at
    full precision: ``Precision.HIGHEST``, not a GPU's TF32); AdaECE's equal-mass edges are
    read from the sorted confidences through the counts' running sum, exactly the edges of
    the resample's own sort. The values equal :func:`summary` of the gathered resample within
    float32 rounding (bin counts exactly; ``tests/test_metrics.py``).

    Args:
      context: :func:`summary_context` ``(logits, labels)``.
      counts: ``[N]`` non-negative int32 multiplicities, summing to at most 2**24.

    Returns:
      :func:`summary`'s dict; NaN everywhere when the counts draw a row with non-finite
      logits or a label out of range, or sum to 0 (under tracing also when a count is
      negative or they sum beyond 2**24, which concrete counts raise for).

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> labels = jnp.array([0, 1, 1])
    >>> context = summary_context(logits, labels)
    >>> twice_first = summary_from_counts(context, jnp.array([2, 0, 1]))
    >>> gathered = summary(logits[jnp.array([0, 0, 2])], labels[jnp.array([0, 0, 2])])
    >>> [round(float(v[k]), 4) for v in (twice_first, gathered) for k in ("ece", "nll")]
    [0.1667, 0.1891, 0.1667, 0.1891]
    """
    if not isinstance(context, SummaryContext):
        raise TypeError(f"`context` must be a metrics.SummaryContext (from "
                        f"metrics.summary_context(logits, labels)), got "
                        f"{type(context).__name__}.")
    counts = validation.check_multiplicities(counts, context.order.shape[0],
                                             max_total=MAX_COUNTED_EXAMPLES)
    return _summary_from_counts_impl(context, counts)


@jax.jit
def _summary_from_counts_impl(context: SummaryContext, counts) -> dict:
    num_bins, convention = context.num_bins, context.convention
    n = jnp.sum(counts)
    weights = counts.astype(jnp.float32)
    sums = jnp.dot(weights, context.per_example, precision=jax.lax.Precision.HIGHEST)
    top = _BinSums(jnp.round(sums[:num_bins]).astype(jnp.int32),
                   sums[num_bins:2 * num_bins], sums[2 * num_bins:3 * num_bins])
    label_count = jnp.dot(weights, context.class_labels, precision=jax.lax.Precision.HIGHEST)
    nll_sum, brier_sum, hit_sum = sums[-3], sums[-2], sums[-1]
    weighted, gap = _weighted_gap(top, n)
    # AdaECE: position p of the resample's sorted confidences is the first example (in
    # confidence order) whose running count exceeds p.
    sorted_counts = counts[context.order]
    running = jnp.cumsum(sorted_counts)
    edges = _equal_mass_edges(
        lambda p: context.sorted_conf[jnp.searchsorted(running, p, side="right")],
        jnp.maximum(n, 1), num_bins, context.sorted_conf.dtype)
    ada = _top_label_bin_sums(context.sorted_conf, context.sorted_hit, edges, convention, True,
                              sorted_counts)
    cls = _counted_classwise_sums(context, weights)
    total = jnp.maximum(n, 1).astype(jnp.float32)
    acc = hit_sum / total
    values = {
        "ece": jnp.sum(weighted),
        "adaptive_ece": jnp.sum(_weighted_gap(ada, n)[0]),
        "classwise_ece": _classwise_from_sums(cls, label_count, n, convention),
        "mce": jnp.max(gap),
        "nll": nll_sum / total,
        "accuracy": acc,
        "error": 1.0 - acc,
        "brier": brier_sum / total,
    }
    # Under tracing, counts that could not be checked poison the result instead.
    ok = (jnp.all(context.row_ok | (counts == 0)) & (n > 0) & jnp.all(counts >= 0)
          & (n <= MAX_COUNTED_EXAMPLES))
    return {k: jnp.where(ok, v.astype(jnp.float32), jnp.nan) for k, v in values.items()}


def bootstrap_summary(logits, labels, *, key, num_resamples: int = 1000,
                      confidence: float = 0.95, method: str = "percentile",
                      chunk_size: int = 64, num_bins: int = 15,
                      convention: str = "reference"):
    """Every :func:`summary` metric with bootstrap intervals, the resamples counted.

    The same resamples as ``bootstrap.bootstrap(summary, logits, labels, key=key)`` (and the
    same values, up to float32 rounding), but each resample's metrics come from how often it
    draws each example (:func:`summary_from_counts` over :func:`summary_context`): one
    softmax, one sort and the bins of every example once, instead of per resample. 1,000
    resamples of 10,000 test examples on this project's 2-core CPU: see
    ``benchmarks/bootstrap_coverage.py``'s timing rows and ``benchmarks/NOTES.md``.

    Args:
      logits, labels: ``[N, C]`` and ``[N]``.
      key, num_resamples, confidence, method, chunk_size: as for
        :func:`calib_jax.bootstrap.bootstrap`.
      num_bins, convention: as for :func:`summary`.

    Returns:
      :class:`calib_jax.bootstrap.BootstrapResult` whose fields are :func:`summary`'s dicts.

    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]))
    >>> result = bootstrap_summary(logits, jnp.array([0, 1, 1, 0]), key=jax.random.key(0),
    ...                            num_resamples=200)
    >>> float(result.value["accuracy"]), bool(result.low["ece"] <= result.high["ece"])
    (0.75, True)
    """
    _check_options(num_bins, convention)
    prepare = functools.partial(summary_context, num_bins=int(num_bins), convention=convention)
    return bootstrap.bootstrap_by_counts(
        prepare, summary_from_counts, logits, labels, key=key, num_resamples=num_resamples,
        confidence=confidence, method=method, chunk_size=chunk_size)


class ReliabilityBins(NamedTuple):
    """What a reliability diagram draws.

    Attributes:
      edges: ``[B + 1]`` float32 bin edges.
      count: ``[B]`` int32 samples per bin.
      mean_confidence: ``[B]`` mean top-label confidence (NaN for empty bins).
      accuracy: ``[B]`` fraction correct (NaN for empty bins).
      num_samples: ``[]`` N, including samples in no bin.
    """
    edges: jax.Array
    count: jax.Array
    mean_confidence: jax.Array
    accuracy: jax.Array
    num_samples: jax.Array


@functools.partial(jax.jit, static_argnames=("num_bins", "convention", "adaptive"))
def _reliability_impl(logits, labels, num_bins, convention, adaptive):
    sums, edges, ok = _top_label_sums(logits, labels, num_bins, convention, adaptive)
    empty = sums.count == 0
    safe = jnp.where(empty, 1, sums.count).astype(jnp.float32)
    mean_conf = jnp.where(empty | ~ok, jnp.nan, sums.conf_sum / safe)
    acc = jnp.where(empty | ~ok, jnp.nan, sums.acc_sum / safe)
    return ReliabilityBins(edges, sums.count, mean_conf, acc, jnp.int32(labels.shape[0]))


def reliability_bins(logits, labels, *, num_bins: int = 15, convention: str = "reference",
                     adaptive: bool = False) -> ReliabilityBins:
    """Per-bin count, mean confidence and accuracy (equal-width or equal-mass bins).

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    >>> bins = reliability_bins(logits, jnp.array([0, 1, 1]), num_bins=5)
    >>> bins.count.tolist()
    [0, 0, 1, 1, 1]
    >>> bins.accuracy.tolist()
    [nan, nan, 0.0, 1.0, 1.0]
    """
    _check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return _reliability_impl(logits, labels, int(num_bins), convention, bool(adaptive))
