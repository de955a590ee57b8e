"""Out-of-distribution detection scores and AUROC, with the reference's conventions.

Two scores, as in the reference's ``Metrics/ood_test_utils.py``:

* ``"entropy"``: the softmax entropy ``-sum_k p_k log p_k``; the **OOD set is
  the positive class** (high entropy means "out of distribution").
* ``"confidence"``: the max softmax probability; the **in-distribution set is
  the positive class**.

AUROC follows scikit-learn's ``roc_auc_score``: the probability that a random
positive scores above a random negative, **ties counting 1/2**. It is computed
exactly (sorting and counting) and is jittable; :func:`roc_curve` returns the
plotting points on the host.

Bootstrap intervals of AUROC (:func:`bootstrap_aurocs`) resample the test and OOD sets each on
its own and compute each resample's AUROC from how often it draws each example
(:func:`aurocs_from_counts` over :func:`ranked_scores`): one sort of all the scores instead
of one per resample, the same values as resampling the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import bootstrap, validation

__all__ = ["RocCurve", "SCORES", "auroc", "auroc_from_scores", "aurocs", "aurocs_from_counts",
           "bootstrap_aurocs", "confidence", "entropy", "ranked_scores", "roc_curve"]

SCORES = ("entropy", "confidence")


def _probs(logits):
    logits = logits.astype(validation.compute_dtype(logits.dtype))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.exp(log_probs), log_probs


@jax.jit
def _entropy(logits):
    probs, log_probs = _probs(logits)
    # p * log p with the finite log_softmax: an underflowed p = 0 gives 0, not NaN.
    value = -jnp.sum(probs * log_probs, axis=-1)
    return jnp.where(validation.valid_rows(logits), value, jnp.nan)


@jax.jit
def _confidence(logits):
    probs, _ = _probs(logits)
    return jnp.where(validation.valid_rows(logits), jnp.max(probs, axis=-1), jnp.nan)


def entropy(logits):
    """Softmax entropy per example, ``[N, C] -> [N]`` (nats).

    >>> import jax.numpy as jnp
    >>> round(float(entropy(jnp.zeros((1, 4)))[0]), 4)  # log 4
    1.3863
    """
    return _entropy(validation.check_logits(logits))


def confidence(logits):
    """Max softmax probability per example, ``[N, C] -> [N]``.

    >>> import jax.numpy as jnp
    >>> round(float(confidence(jnp.log(jnp.array([[0.2, 0.8]])))[0]), 4)
    0.8
    """
    return _confidence(validation.check_logits(logits))


@jax.jit
def _auroc_from_scores(positive, negative):
    neg_sorted = jnp.sort(negative)
    below = jnp.searchsorted(neg_sorted, positive, side="left")
    not_above = jnp.searchsorted(neg_sorted, positive, side="right")
    # Per positive: (#negatives below + 1/2 #negatives tied) / #negatives.
    wins = (below.astype(jnp.float32) + 0.5 * (not_above - below).astype(jnp.float32))
    value = jnp.mean(wins / negative.shape[0])
    ok = jnp.all(jnp.isfinite(positive)) & jnp.all(jnp.isfinite(negative))
    return jnp.where(ok, value, jnp.nan)


def _check_scores(x, name):
    x = validation._as_array(x, name)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array of scores, got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be floating point, got {x.dtype}.")
    if validation.is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"`{name}` contains NaN or infinite scores.")
    return x


def auroc_from_scores(positive_scores, negative_scores):
    """Area under the ROC curve for "positive scores higher", ties counting 1/2.

    Equals ``sklearn.metrics.roc_auc_score`` on the concatenated scores.

    >>> import jax.numpy as jnp
    >>> float(auroc_from_scores(jnp.array([0.9, 0.5]), jnp.array([0.5, 0.1])))
    0.875
    """
    positive = _check_scores(positive_scores, "positive_scores")
    negative = _check_scores(negative_scores, "negative_scores")
    return _auroc_from_scores(positive, negative)


def _checked_pair(in_logits, out_logits):
    """The test and OOD logits, checked (each, and their class counts against each other)."""
    in_logits = validation.check_logits(in_logits, name="in_logits")
    out_logits = validation.check_logits(out_logits, name="out_logits")
    if in_logits.shape[-1] != out_logits.shape[-1]:
        raise ValueError(
            f"`in_logits` and `out_logits` must have the same number of classes, got "
            f"{in_logits.shape[-1]} and {out_logits.shape[-1]}.")
    return in_logits, out_logits


def _oriented_scores(in_logits, out_logits, score):
    """(positive scores, negative scores) under the reference's orientation."""
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}.")
    in_logits, out_logits = _checked_pair(in_logits, out_logits)
    if score == "entropy":
        return _entropy(out_logits), _entropy(in_logits)
    return _confidence(in_logits), _confidence(out_logits)


def auroc(in_logits, out_logits, *, score: str = "entropy"):
    """OOD-detection AUROC of in-distribution vs OOD logits (a fraction).

    Args:
      in_logits: ``[N_in, C]`` logits on the in-distribution test set.
      out_logits: ``[N_out, C]`` logits on the OOD set.
      score: ``"entropy"`` (OOD positive; the paper's tables) or
        ``"confidence"`` (in-distribution positive).

    >>> import jax.numpy as jnp
    >>> sure = jnp.array([[5.0, 0.0], [0.0, 4.0]])
    >>> unsure = jnp.array([[0.1, 0.0], [0.0, 0.2]])
    >>> float(auroc(sure, unsure, score="entropy")), float(auroc(sure, unsure, score="confidence"))
    (1.0, 1.0)
    """
    positive, negative = _oriented_scores(in_logits, out_logits, score)
    return _auroc_from_scores(positive, negative)


def aurocs(in_logits, out_logits) -> dict:
    """:func:`auroc` with every score of :data:`SCORES`, ``{score: AUROC}`` (jittable: e.g. the
    metric of a two-sample :func:`calib_jax.bootstrap.bootstrap`).

    >>> import jax.numpy as jnp
    >>> sure = jnp.array([[5.0, 0.0], [0.0, 4.0]])
    >>> unsure = jnp.array([[0.1, 0.0], [0.0, 0.2]])
    >>> {k: float(v) for k, v in aurocs(sure, unsure).items()}
    {'entropy': 1.0, 'confidence': 1.0}
    """
    return {score: auroc(in_logits, out_logits, score=score) for score in SCORES}


def _joint_order(positive, negative):
    """``(order, start, end, finite)`` of the positive and negative scores together: the
    stable ascending order of ``concatenate([positive, negative])``, and per position of that
    order the first and one-past-last position of its run of equal scores."""
    scores = jnp.concatenate([positive, negative])
    order = jnp.argsort(scores, stable=True)
    ordered = scores[order]
    start = jnp.searchsorted(ordered, ordered, side="left")
    end = jnp.searchsorted(ordered, ordered, side="right")
    return order, start, end, jnp.all(jnp.isfinite(scores))


def _auroc_from_order(joint, positive_counts, negative_counts):
    """AUROC of the multiset that holds each positive ``positive_counts[i]`` times and each
    negative ``negative_counts[j]`` times: per positive, the negatives below it plus half
    those tied, from prefix sums of the negatives' counts along the joint order."""
    order, start, end, finite = joint
    pos = jnp.concatenate([positive_counts, jnp.zeros_like(negative_counts)])[order]
    neg = jnp.concatenate([jnp.zeros_like(positive_counts), negative_counts])[order]
    neg_before = jnp.concatenate([jnp.zeros((1,), neg.dtype), jnp.cumsum(neg)])
    below = neg_before[start]
    tied = neg_before[end] - below
    f32 = jnp.float32
    wins = jnp.sum(pos.astype(f32) * (below.astype(f32) + 0.5 * tied.astype(f32)))
    pairs = jnp.sum(positive_counts).astype(f32) * jnp.sum(negative_counts).astype(f32)
    return jnp.where(finite, wins / pairs, jnp.nan)


@jax.jit
def _ranked_scores(in_logits, out_logits):
    return {"entropy": _joint_order(_entropy(out_logits), _entropy(in_logits)),
            "confidence": _joint_order(_confidence(in_logits), _confidence(out_logits))}


def ranked_scores(in_logits, out_logits) -> dict:
    """Each score of :data:`SCORES` of the test and OOD examples in one order, ``{score:
    (order, start, end, finite)}`` (jittable): what :func:`aurocs_from_counts` needs to give
    the AUROC of any resample of the two sets without sorting again.

    >>> import jax.numpy as jnp
    >>> sure = jnp.array([[5.0, 0.0], [0.0, 4.0]])
    >>> unsure = jnp.array([[0.1, 0.0], [0.0, 0.2]])
    >>> ranked = ranked_scores(sure, unsure)
    >>> ones = jnp.ones(2, jnp.int32)
    >>> {k: float(v) for k, v in aurocs_from_counts(ranked, ones, ones).items()}
    {'entropy': 1.0, 'confidence': 1.0}
    """
    return _ranked_scores(*_checked_pair(in_logits, out_logits))


def aurocs_from_counts(ranked, in_counts, out_counts) -> dict:
    """:func:`aurocs` of the multiset holding test example ``i`` ``in_counts[i]`` times and
    OOD example ``j`` ``out_counts[j]`` times (all ones: :func:`aurocs` itself), from
    :func:`ranked_scores` of the two sets; jittable, ``O(N_in + N_out)``, no sort.

    The by-counts form of :func:`aurocs` for
    :func:`calib_jax.bootstrap.bootstrap_by_counts` (``prepare=ranked_scores``): ties count
    1/2, a non-finite score makes the AUROC NaN, as in :func:`auroc`. Exact up to float32
    rounding of the sum over pairs (within ~2e-7 of :func:`aurocs` of the gathered resamples
    over 10,000 and 26,032 examples, ``tests/test_ood.py``).

    Args:
      ranked: :func:`ranked_scores` ``(in_logits, out_logits)``.
      in_counts, out_counts: ``[N_in]``, ``[N_out]`` non-negative int32 multiplicities
        (refused otherwise, as :func:`calib_jax.metrics.summary_from_counts` refuses them;
        traced counts are checked by shape only).
    """
    in_counts = validation.check_multiplicities(in_counts, None, "in_counts")
    out_counts = validation.check_multiplicities(out_counts, None, "out_counts")
    total = ranked["entropy"][0].shape[0]
    if in_counts.shape[0] + out_counts.shape[0] != total:
        raise ValueError(f"`in_counts` and `out_counts` must hold one multiplicity per test and "
                         f"OOD example of `ranked` ({total} together), got {in_counts.shape[0]} "
                         f"and {out_counts.shape[0]}.")
    return {"entropy": _auroc_from_order(ranked["entropy"], out_counts, in_counts),
            "confidence": _auroc_from_order(ranked["confidence"], in_counts, out_counts)}


def bootstrap_aurocs(in_logits, out_logits, *, key, num_resamples: int = 1000,
                     confidence: float = 0.95, method: str = "percentile",
                     chunk_size: int = 64) -> bootstrap.BootstrapResult:
    """:func:`aurocs` with bootstrap intervals, the test and OOD sets resampled each on its
    own (a two-sample bootstrap).

    The same resamples and values as ``bootstrap.bootstrap(aurocs, in_logits, out_logits,
    key=key, groups=(0, 1))`` (up to float32 rounding), so its test resamples are those of
    a :func:`calib_jax.bootstrap.bootstrap` of the test set's other metrics with ``key``;
    but each resample's AUROC comes from its counts (:func:`aurocs_from_counts`) instead of a
    sort of its scores: 1,000 resamples of 10,000 against 26,032 examples took 1.8 s instead
    of 12.6 s on this project's 2-core CPU (``benchmarks/bootstrap_coverage.py``). Scores
    that differ only in their last bit (rows of equal logits in another order) may compare
    otherwise in the two programs, as in any two programs.

    Args:
      in_logits, out_logits: ``[N_in, C]`` test and ``[N_out, C]`` OOD logits.
      key, num_resamples, confidence, method, chunk_size: as for
        :func:`calib_jax.bootstrap.bootstrap`.

    Returns:
      :class:`calib_jax.bootstrap.BootstrapResult` whose fields are ``{score: ...}`` dicts.

    >>> import jax, jax.numpy as jnp
    >>> sure = jnp.array([[5.0, 0.0], [0.0, 4.0], [3.0, 0.5]])
    >>> unsure = jnp.array([[0.1, 0.0], [0.0, 0.2], [4.0, 0.0]])
    >>> result = bootstrap_aurocs(sure, unsure, key=jax.random.key(0), num_resamples=100)
    >>> [round(float(v), 6) for v in (result.value["entropy"], aurocs(sure, unsure)["entropy"])]
    [0.833333, 0.833333]
    >>> bool(result.low["entropy"] <= result.value["entropy"] <= result.high["entropy"])
    True
    """
    return bootstrap.bootstrap_by_counts(
        ranked_scores, aurocs_from_counts, in_logits, out_logits, key=key,
        num_resamples=num_resamples, confidence=confidence, method=method,
        chunk_size=chunk_size, groups=(0, 1))


class RocCurve(NamedTuple):
    """ROC points, as ``sklearn.metrics.roc_curve(drop_intermediate=False)``.

    Attributes:
      fpr, tpr: ``[P]`` float64, from (0, 0) to (1, 1), one point per distinct
        threshold (tied scores move diagonally).
      thresholds: ``[P]`` score thresholds; the first is ``inf``.
    """
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(in_logits, out_logits, *, score: str = "entropy") -> RocCurve:
    """ROC curve of the OOD detector, for plotting (host-side NumPy; not jittable).

    >>> import jax.numpy as jnp
    >>> curve = roc_curve(jnp.array([[5.0, 0.0]]), jnp.array([[0.1, 0.0]]))
    >>> curve.fpr.tolist(), curve.tpr.tolist()
    ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    positive, negative = (np.asarray(x, dtype=np.float64)
                          for x in _oriented_scores(in_logits, out_logits, score))
    scores = np.concatenate([positive, negative])
    is_pos = np.concatenate([np.ones(positive.shape[0]), np.zeros(negative.shape[0])])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # The last index of each run of equal scores is a threshold.
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.shape[0] - 1]
    tps = np.cumsum(is_pos)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / positive.shape[0]]
    fpr = np.r_[0.0, fps / negative.shape[0]]
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=np.r_[np.inf, scores[last]])
