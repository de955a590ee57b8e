"""Losses for calibration-aware training: the focal-loss family and baselines.

Conventions (optax style):

* ``logits`` are unnormalised scores ``[..., C]``; ``labels`` integer class
  indices ``[...]``. Per-example losses return ``[...]``: **the caller
  reduces**. The reference (``torrvision/focal_calibration``) trains with the
  batch *sum* of cross-entropy / focal / FLSD / label smoothing, the batch
  *mean* of Brier, and ``N * (mean CE + 2 * mmce_weighted)`` for MMCE.
* Hyper-parameters are keyword-only.
* Everything is computed in float32 (float64 for float64 input); bfloat16
  logits are promoted first. Gradients flow back in the input dtype.
* Bad input raises eagerly, and poisons the output with NaN under ``jit``
  (see :mod:`calib_jax.validation`).

Numerics of the focal factor: ``(1 - p_t) ** gamma`` is evaluated as
``exp(gamma * log(1 - p_t))`` with ``log(1 - p_t)`` taken from ``log p_t`` by a
stable ``log1mexp``, and its derivative is written by hand (``custom_jvp``) in a
form that stays finite at ``p_t -> 1`` for every ``gamma >= 0``, including
``gamma = 0`` and fractional ``gamma < 1`` where the naive derivative is
``inf * 0``. Values and first derivatives are finite for logits up to +-1e4.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import validation

__all__ = [
    "adaptive_focal_gamma",
    "adaptive_focal_loss",
    "brier_score",
    "cross_entropy",
    "focal_gamma_schedule",
    "focal_loss",
    "label_smoothing_cross_entropy",
    "mmce",
    "mmce_weighted",
]

_LOG2 = float(np.log(2.0))


def _prepare(logits, labels):
    """Validates, promotes to the compute dtype, returns (log_probs, labels, ok)."""
    logits, labels = validation.check_logits_and_labels(logits, labels, rank=None)
    logits = logits.astype(validation.compute_dtype(logits.dtype))
    ok = validation.valid_rows(logits, labels)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return log_probs, labels, ok


def _label_log_prob(log_probs, labels):
    safe = jnp.clip(labels, 0, log_probs.shape[-1] - 1)
    return jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]


def _poison(values, ok):
    return jnp.where(ok, values, jnp.nan)


def _check_nonnegative(value, name):
    if validation.is_concrete(value):
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")


def cross_entropy(logits, labels):
    r"""Per-example softmax cross-entropy with integer labels.

    .. math:: \ell = -\log p_y, \quad p = \mathrm{softmax}(z)

    Args:
      logits: ``[..., C]`` unnormalised scores (any float dtype).
      labels: ``[...]`` integer class indices in ``[0, C)``.

    Returns:
      ``[...]`` float32 losses. The reference trains with their **sum**.

    >>> import jax.numpy as jnp
    >>> loss = cross_entropy(jnp.array([[2.0, 0.0], [0.0, 0.0]]), jnp.array([0, 1]))
    >>> [round(float(v), 4) for v in loss]
    [0.1269, 0.6931]

    References:
      Mukhoti et al., *Calibrating Deep Neural Networks using Focal Loss*,
      NeurIPS 2020.
    """
    log_probs, labels, ok = _prepare(logits, labels)
    return _poison(-_label_log_prob(log_probs, labels), ok)


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler 2012)."""
    return jnp.where(x > -_LOG2, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _focal_factor(log_pt, gamma):
    """(1 - p_t) ** gamma in log space; exactly 1 for gamma == 0 (also at p_t = 1)."""
    return jnp.where(gamma == 0, 1.0, jnp.exp(gamma * _log1mexp(log_pt))).astype(log_pt.dtype)


@jax.custom_jvp
def focal_term(log_pt, gamma):
    r"""Elementwise focal term ``-(1 - p_t)**gamma * log p_t`` from ``log p_t``.

    A building block for custom focal variants: pass ``log p_t <= 0`` (e.g. the
    label entry of ``jax.nn.log_softmax``) and a broadcastable ``gamma >= 0``.
    Its hand-written derivative is finite everywhere, see the module docstring.
    """
    log_pt = jnp.minimum(log_pt, 0.0)
    return -_focal_factor(log_pt, gamma) * log_pt


@focal_term.defjvp
def _focal_term_jvp(primals, tangents):
    log_pt, gamma = primals
    d_log_pt, d_gamma = tangents
    log_pt = jnp.minimum(log_pt, 0.0)
    factor = _focal_factor(log_pt, gamma)
    out = -factor * log_pt
    p_t = jnp.exp(log_pt)
    # ratio = log p_t / (1 - p_t), in (-inf, -1]; its limit at p_t -> 1 is -1.
    # The two-sided `where` keeps both the value and its own gradient finite.
    near_one = log_pt > -1e-4
    safe = jnp.where(near_one, -1.0, log_pt)
    ratio = jnp.where(near_one, -1.0 + 0.5 * log_pt, safe / -jnp.expm1(safe))
    # d/d(log p_t) of -(1-p)^g log p = -(1-p)^g + g p (1-p)^g * log p / (1-p).
    d_out_d_log_pt = -factor + gamma * p_t * factor * ratio
    # d/d(gamma) = -(1-p)^g log(1-p) log p, which is 0 at p_t = 1.
    log_one_minus = _log1mexp(log_pt)
    log_one_minus = jnp.where(jnp.isfinite(log_one_minus), log_one_minus, 0.0)
    d_out_d_gamma = -factor * log_one_minus * log_pt
    tangent = d_out_d_log_pt * d_log_pt + d_out_d_gamma * d_gamma
    return out, jnp.broadcast_to(tangent, jnp.shape(out)).astype(out.dtype)


def focal_loss(logits, labels, *, gamma):
    r"""Per-example softmax focal loss (Lin et al. 2017) with integer labels.

    .. math:: \ell = -(1 - p_y)^\gamma \log p_y

    The gradient flows through both factors, as in the reference. For
    ``gamma = 0`` the factor is the constant 1, so this equals
    :func:`cross_entropy` in value and gradient.

    Args:
      logits: ``[..., C]`` unnormalised scores.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      gamma: focusing parameter ``>= 0``; a float or an array broadcastable to
        ``labels`` (e.g. a per-example gamma or a scheduled traced value).

    Returns:
      ``[...]`` float32 losses. The paper's FL-3 is ``gamma=3`` with a batch sum.

    >>> import jax.numpy as jnp
    >>> loss = focal_loss(jnp.array([[2.0, 0.0], [0.0, 0.0]]), jnp.array([0, 1]), gamma=3.0)
    >>> [round(float(v), 5) for v in loss]  # (1 - p)^3 * CE: 0.1192^3 * 0.1269, 0.5^3 * 0.6931
    [0.00021, 0.08664]

    References:
      Lin et al., *Focal Loss for Dense Object Detection*, ICCV 2017.
      Mukhoti et al., *Calibrating Deep Neural Networks using Focal Loss*,
      NeurIPS 2020.
    """
    _check_nonnegative(gamma, "gamma")
    log_probs, labels, ok = _prepare(logits, labels)
    log_pt = _label_log_prob(log_probs, labels)
    gamma = jnp.asarray(gamma, dtype=log_pt.dtype)
    return _poison(focal_term(log_pt, gamma), ok)


def _check_tiers(thresholds, gammas):
    thresholds = tuple(float(t) for t in thresholds)
    gammas = tuple(float(g) for g in gammas)
    if len(thresholds) != len(gammas):
        raise ValueError(
            f"`thresholds` and `gammas` must have the same length, got {len(thresholds)} "
            f"and {len(gammas)}: gammas[i] applies where p_t < thresholds[i]."
        )
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])) or any(
            not 0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"`thresholds` must be strictly increasing in (0, 1], got {thresholds}.")
    if any(not np.isfinite(g) or g < 0 for g in gammas):
        raise ValueError(f"`gammas` must be finite and >= 0, got {gammas}.")
    return thresholds, gammas


def adaptive_focal_gamma(p_t, *, gamma=3.0, thresholds: Sequence[float] = (0.2, 0.5),
                         gammas: Sequence[float] = (5.0, 3.0)):
    r"""The sample-dependent gamma of FLSD, as a function of ``p_t``.

    ``gammas[i]`` for the first ``i`` with ``p_t < thresholds[i]``, else
    ``gamma``. The defaults are the reference's tiers: 5 on ``[0, 0.2)``, 3 on
    ``[0.2, 0.5)``, ``gamma`` on ``[0.5, 1]``.

    >>> import jax.numpy as jnp
    >>> adaptive_focal_gamma(jnp.array([0.1, 0.3, 0.9]), gamma=2.0).tolist()
    [5.0, 3.0, 2.0]
    """
    thresholds, gammas = _check_tiers(thresholds, gammas)
    _check_nonnegative(gamma, "gamma")
    p_t = jnp.asarray(p_t)
    result = jnp.broadcast_to(jnp.asarray(gamma, dtype=p_t.dtype), p_t.shape)
    # Walk from the highest tier down so that the lowest matching threshold wins.
    for threshold, tier_gamma in reversed(list(zip(thresholds, gammas))):
        result = jnp.where(p_t < threshold, jnp.asarray(tier_gamma, p_t.dtype), result)
    return result


def adaptive_focal_loss(logits, labels, *, gamma=3.0, thresholds: Sequence[float] = (0.2, 0.5),
                        gammas: Sequence[float] = (5.0, 3.0)):
    r"""Per-example sample-dependent focal loss (FLSD) with integer labels.

    .. math:: \ell = -(1 - p_y)^{\gamma(p_y)} \log p_y

    with :math:`\gamma(p)` from :func:`adaptive_focal_gamma`, decided on the
    float32 ``p_y`` and treated as a constant (no gradient), as the reference
    does. ``gamma=3`` (default) is **FLSD-53** (5 below 0.2, else 3);
    ``gamma=2`` is **FLSD-52** (5 / 3 / 2 on [0, 0.2) / [0.2, 0.5) / [0.5, 1]).
    The reference's ``nlp`` branch used ``thresholds=(0.19, 0.5)``.

    Args:
      logits: ``[..., C]`` unnormalised scores.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      gamma: gamma above the last threshold.
      thresholds: strictly increasing tier bounds in ``(0, 1]``.
      gammas: gamma of each tier, same length as ``thresholds``.

    Returns:
      ``[...]`` float32 losses; the reference trains with their **sum**.

    >>> import jax.numpy as jnp
    >>> loss = adaptive_focal_loss(jnp.array([[2.0, 0.0], [0.0, 3.0]]), jnp.array([0, 0]))
    >>> [round(float(v), 4) for v in loss]  # p_t = 0.88 -> gamma 3; p_t = 0.047 -> gamma 5
    [0.0002, 2.3911]

    References:
      Mukhoti et al., *Calibrating Deep Neural Networks using Focal Loss*,
      NeurIPS 2020, Sec. 5 (FLSD).
    """
    log_probs, labels, ok = _prepare(logits, labels)
    log_pt = _label_log_prob(log_probs, labels)
    sample_gamma = adaptive_focal_gamma(
        jax.lax.stop_gradient(jnp.exp(log_pt)), gamma=gamma, thresholds=thresholds,
        gammas=gammas)
    return _poison(focal_term(log_pt, jax.lax.stop_gradient(sample_gamma)), ok)


def focal_gamma_schedule(epoch, *, boundaries: Sequence[int] = (100, 250),
                         gammas: Sequence[float] = (5.0, 3.0, 1.0)):
    """Scheduled gamma (FLSc): ``gammas[i]`` for ``boundaries[i-1] <= epoch < boundaries[i]``.

    The default is the paper's **FLSc-531**: gamma 5 for epochs 0-99, 3 for
    100-249, 1 from 250 on (0-based epochs, as the reference's ``train.py``).
    FLSc-532 is ``gammas=(5.0, 3.0, 2.0)``; the reference's SST runs switch at
    ``boundaries=(3, 7)``.

    Args:
      epoch: a Python int (returns a Python float) or an integer array, traced
        or not (returns a float32 array of the same shape).
      boundaries: strictly increasing epochs where gamma changes.
      gammas: ``len(boundaries) + 1`` gammas.

    >>> [focal_gamma_schedule(e) for e in (0, 99, 100, 249, 250)]
    [5.0, 5.0, 3.0, 3.0, 1.0]
    """
    boundaries = tuple(int(b) for b in boundaries)
    gammas = tuple(float(g) for g in gammas)
    if len(gammas) != len(boundaries) + 1:
        raise ValueError(
            f"`gammas` must have len(boundaries) + 1 = {len(boundaries) + 1} entries, "
            f"got {len(gammas)}.")
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"`boundaries` must be strictly increasing, got {boundaries}.")
    if any(not np.isfinite(g) or g < 0 for g in gammas):
        raise ValueError(f"`gammas` must be finite and >= 0, got {gammas}.")
    if validation.is_int(epoch):
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0, got {epoch}.")
        return gammas[bisect.bisect_right(boundaries, int(epoch))]
    epoch = jnp.asarray(epoch)
    index = jnp.searchsorted(jnp.asarray(boundaries, dtype=epoch.dtype), epoch, side="right")
    return jnp.asarray(gammas, dtype=jnp.float32)[index]


def brier_score(logits, labels):
    r"""Per-example multi-class Brier score.

    .. math:: \ell = \sum_k (\mathbb{1}[k = y] - p_k)^2

    Returns ``[...]`` float32; the reference trains with their **mean**.

    >>> import jax.numpy as jnp
    >>> float(brier_score(jnp.array([[0.0, 0.0]]), jnp.array([0]))[0])
    0.5

    References:
      Brier, *Verification of forecasts expressed in terms of probability*,
      Monthly Weather Review, 1950.
    """
    log_probs, labels, ok = _prepare(logits, labels)
    probs = jnp.exp(log_probs)
    one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    return _poison(jnp.sum((one_hot - probs) ** 2, axis=-1), ok)


def label_smoothing_cross_entropy(logits, labels, *, smoothing, form: str = "reference"):
    r"""Per-example cross-entropy against smoothed targets.

    ``form="reference"`` (default, the reference's ``nlp`` branch): target
    ``1 - eps`` on the label and ``eps / (C - 1)`` on every other class.
    ``form="uniform"`` (Szegedy et al.; optax's ``smooth_labels``): target
    ``(1 - eps) * onehot + eps / C``. These are different losses.

    .. math:: \ell = -\sum_k t_k \log p_k

    Args:
      logits: ``[..., C]`` unnormalised scores.
      labels: ``[...]`` integer class indices.
      smoothing: ``eps`` in ``[0, 1)``; the paper's LS-0.05 is ``0.05``.
      form: ``"reference"`` or ``"uniform"``.

    Returns:
      ``[...]`` float32 losses; the reference trains with their **sum**.

    >>> import jax.numpy as jnp
    >>> loss = label_smoothing_cross_entropy(jnp.array([[2.0, 0.0, 0.0]]), jnp.array([0]),
    ...                                      smoothing=0.1)
    >>> round(float(loss[0]), 4)  # 0.9 * 0.2395 + 2 * 0.05 * 2.2395
    0.4395

    References:
      Szegedy et al., *Rethinking the Inception Architecture*, CVPR 2016.
      Mueller et al., *When Does Label Smoothing Help?*, NeurIPS 2019.
    """
    if form not in ("reference", "uniform"):
        raise ValueError(f"`form` must be 'reference' or 'uniform', got {form!r}.")
    if validation.is_concrete(smoothing) and not 0.0 <= float(smoothing) < 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}.")
    log_probs, labels, ok = _prepare(logits, labels)
    num_classes = log_probs.shape[-1]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=log_probs.dtype)
    if form == "reference":
        off = smoothing / (num_classes - 1)
        targets = one_hot * (1.0 - smoothing) + (1.0 - one_hot) * off
    else:
        targets = one_hot * (1.0 - smoothing) + smoothing / num_classes
    return _poison(-jnp.sum(targets * log_probs, axis=-1), ok)


@jax.custom_jvp
def _abs_zero_grad_at_zero(x):
    """abs(x) whose derivative at 0 is 0, as torch's (``jnp.abs`` gives 1)."""
    return jnp.abs(x)


@_abs_zero_grad_at_zero.defjvp
def _abs_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


def _laplacian_kernel(r):
    """exp(-|r_i - r_j| / 0.4), the MMCE kernel, ``[N, N]``."""
    return jnp.exp(-_abs_zero_grad_at_zero(r[:, None] - r[None, :]) / 0.4)


def _top_confidence_and_correct(logits, labels):
    """Max softmax probability (gradient to the first maximal entry) and correctness."""
    logits, labels = validation.check_logits_and_labels(logits, labels, rank=2)
    logits = logits.astype(validation.compute_dtype(logits.dtype))
    probs = jax.nn.softmax(logits, axis=-1)
    pred = jnp.argmax(probs, axis=-1)
    # take_along_axis at argmax sends the gradient to the first maximal entry,
    # like torch.max; jnp.max would split it between ties.
    conf = jnp.take_along_axis(probs, pred[:, None], axis=-1)[:, 0]
    correct = (pred == labels).astype(probs.dtype)
    return conf, correct, validation.valid_rows(logits, labels)


def mmce(logits, labels):
    r"""Unweighted MMCE (Kumar et al. 2018), a batch-level scalar.

    .. math:: \frac{1}{N^2}\sum_{i,j} (c_i - r_i)(c_j - r_j)\,
              e^{-|r_i - r_j| / 0.4}

    with ``r`` the max softmax probability and ``c`` the 0/1 correctness
    (constant). No square root, as the reference's ``MMCE``.

    Args:
      logits: ``[N, C]``; labels: ``[N]``.

    Returns:
      float32 scalar for the whole batch (compute it on the global batch).

    >>> import jax.numpy as jnp
    >>> round(float(mmce(jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.array([0, 0]))), 4)
    0.1072

    References:
      Kumar, Sarawagi, Jain, *Trainable Calibration Measures for Neural
      Networks from Kernel Mean Embeddings*, ICML 2018.
    """
    conf, correct, ok = _top_confidence_and_correct(logits, labels)
    ok = jnp.all(ok)
    diff = correct - conf
    n = conf.shape[0]
    value = jnp.sum(diff[:, None] * diff[None, :] * _laplacian_kernel(conf)) / (n * n)
    return _poison(value, ok)


def mmce_weighted(logits, labels, *, where=None):
    r"""Weighted MMCE (MMCE_w of Kumar et al. 2018), as the reference computes it.

    With ``r`` the max softmax probability, ``m`` correct and ``n`` incorrect
    samples, and ``K`` the Laplacian kernel ``exp(-|r_i - r_j| / 0.4)``:

    .. math::
       \mathrm{MMD} = \frac{\overline{K (1-r)(1-r)}_{cc}}{m^2 + 10^{-5}}
       + \frac{\overline{K r r}_{ii}}{n^2 + 10^{-5}}
       - \frac{2\,\overline{K (1-r) r}_{ci}}{mn + 10^{-5}},\qquad
       \ell = \sqrt{\mathrm{MMD} + 10^{-10}}

    where a bar is the mean over that block of pairs. It is exactly 0 when all
    predictions are right or all wrong. Differences from a naive port: the
    derivative of ``|x|`` at 0 is 0 (torch's rule), ties in the top probability
    send their gradient to the first maximal class, and a rounding-negative MMD
    is clamped to 0 before the square root (the reference would return NaN).

    The reference's training loss is ``N * (mean(cross_entropy) + 2 * mmce_weighted)``.

    Args:
      logits: ``[N, C]``; labels: ``[N]``.
      where: optional ``[N]`` booleans, the samples that count (the labelled nodes of
        phrase-level training): the others enter neither block, as if absent, and their
        labels are not read.

    Returns:
      float32 scalar for the whole batch.

    >>> import jax.numpy as jnp
    >>> round(float(mmce_weighted(jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.array([0, 0]))), 4)
    0.6548

    References:
      Kumar, Sarawagi, Jain, *Trainable Calibration Measures for Neural
      Networks from Kernel Mean Embeddings*, ICML 2018.
    """
    if where is None:
        conf, correct, ok = _top_confidence_and_correct(logits, labels)
        ok = jnp.all(ok)
        wrong = 1.0 - correct
    else:
        where = jnp.asarray(where, bool)
        if where.shape != jnp.shape(labels):
            raise ValueError(f"`where` must have the labels' shape {jnp.shape(labels)}, got "
                             f"{where.shape}.")
        # Rows that do not count read as zeros: neither their values nor their gradients
        # (a NaN row's would be NaN) reach the result.
        logits = jnp.where(where[:, None], logits, jnp.zeros((), jnp.asarray(logits).dtype))
        conf, correct, ok = _top_confidence_and_correct(logits, jnp.where(where, labels, 0))
        ok = jnp.all(ok | ~where)
        counts = where.astype(conf.dtype)
        wrong = (1.0 - correct) * counts
        correct = correct * counts
    m = jnp.sum(correct)
    n = jnp.sum(wrong)
    both = (m > 0) & (n > 0)
    # Safe block sizes where a block is empty; the result is masked to 0 then.
    m_safe = jnp.where(both, m, 1.0)
    n_safe = jnp.where(both, n, 1.0)
    kernel = _laplacian_kernel(conf)
    w_correct = correct * (1.0 - conf)
    w_wrong = wrong * conf
    cc = w_correct @ kernel @ w_correct / (m_safe * m_safe)
    ii = w_wrong @ kernel @ w_wrong / (n_safe * n_safe)
    ci = w_correct @ kernel @ w_wrong / (m_safe * n_safe)
    mmd = (cc / (m_safe * m_safe + 1e-5) + ii / (n_safe * n_safe + 1e-5)
           - 2.0 * ci / (m_safe * n_safe + 1e-5))
    value = jnp.where(both, jnp.sqrt(jnp.maximum(mmd, 0.0) + 1e-10), 0.0)
    return _poison(value, ok)
