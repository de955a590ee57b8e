"""Input checks shared by every public function of calib_jax.

Two regimes, because JAX code runs both eagerly and under transformations:

* **Concrete inputs** (NumPy arrays, or ``jax.Array`` outside ``jit``/``vmap``/
  ``grad``): every check runs and a bad input raises a ``TypeError`` or
  ``ValueError`` that names the argument and says how to fix it. Probabilities
  passed where logits are expected only *warn* (``UserWarning``), since a real
  model can, rarely, produce such logits.
* **Traced inputs** (inside ``jit``, ``vmap``, ``grad``, ...): dtype, rank and
  shape checks still raise at trace time. Value checks cannot raise there, so
  the functions **poison their outputs with NaN** instead: a per-example loss
  is NaN on every row whose label is outside ``[0, C)`` or whose logits are not
  finite, and a metric is NaN when any row is bad. A NaN is never a plausible
  number, so nothing is silently wrong. To turn that into an exception inside
  compiled code, call :func:`checkify_inputs` under
  :func:`jax.experimental.checkify.checkify`, or run with ``jax_debug_nans``.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = [
    "check_multiplicities",
    "check_logits",
    "check_logits_and_labels",
    "check_count",
    "checkify_inputs",
    "compute_dtype",
    "is_concrete",
    "valid_rows",
]


def is_concrete(*arrays: Any) -> bool:
    """True when none of ``arrays`` is a JAX tracer (so values can be read)."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def is_int(value) -> bool:
    """Whether ``value`` is a Python / NumPy integer and not a bool (``True`` is an int to
    Python, never a count, seed or index to a user)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_count(value, name: str, *, minimum: int = 1) -> None:
    """Raises ``ValueError`` unless ``value`` is a Python / NumPy int (not a bool) >= ``minimum``:
    a static size (bins, classes) that shapes arrays, so a float or a bool is refused too."""
    if not is_int(value) or value < minimum:
        kind = "a positive Python int" if minimum == 1 else f"a Python int >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


def check_multiplicities(counts, num_examples: int | None, name: str = "counts", *,
                         max_total: int | None = None):
    """``counts`` as an array of each example's multiplicity in a multiset (a bootstrap
    resample's counts): raises ``ValueError`` naming ``name`` unless it holds integers of shape
    ``[num_examples]`` (any length for None) and, when concrete, none negative and (with
    ``max_total``) their sum at most ``max_total``. Traced counts are checked by shape only."""
    counts = jnp.asarray(counts)
    shape = "[N]" if num_examples is None else f"({num_examples},)"
    if counts.ndim != 1 or (num_examples is not None and counts.shape[0] != num_examples) \
            or not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be integers of shape {shape} (one multiplicity per "
                         f"example), got {counts.dtype} {counts.shape}.")
    if is_concrete(counts):
        concrete = np.asarray(counts, np.int64)
        if concrete.size and (concrete.min() < 0 or
                              (max_total is not None and concrete.sum() > max_total)):
            bound = "" if max_total is None else f" and sum to at most {max_total}"
            raise ValueError(f"`{name}` must be >= 0{bound}, got a minimum of {concrete.min()} "
                             f"and a sum of {concrete.sum()}.")
    return counts


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype a function computes in: float32, or float64 for float64 input.

    bfloat16 / float16 inputs are promoted to float32 so that softmax, logs and
    sums keep full single precision (the reference computes in float32).
    """
    return jnp.promote_types(dtype, jnp.float32)


def _as_array(x, name: str):
    if isinstance(x, jax.core.Tracer) or isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}: {e}") from None


def _check_floating(x, name: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array of unnormalised logits, got dtype "
            f"{x.dtype}. If these are class indices, pass them as `labels`; otherwise "
            f"cast with `{name}.astype(jnp.float32)`."
        )


@jax.jit
def _logit_summary(logits, where):
    """(number of non-finite entries, every row looks like a probability vector)."""
    where = where[..., None]
    num_bad = jnp.sum(where & ~jnp.isfinite(logits))
    in_unit = jnp.all(~where | ((logits >= 0) & (logits <= 1)))
    row_sums = jnp.sum(logits.astype(jnp.float32), axis=-1)
    sums_to_one = jnp.all(~where[..., 0] | (jnp.abs(row_sums - 1.0) < 1e-3))
    return num_bad, in_unit & sums_to_one & jnp.any(where)


@jax.jit
def _label_summary(labels, where):
    info = jnp.iinfo(labels.dtype)
    return jnp.min(jnp.where(where, labels, info.max)), jnp.max(jnp.where(where, labels, info.min))


@jax.jit
def _joint_summary(logits, labels, where):
    # One compiled call and one device-to-host transfer for every value check.
    return (*_logit_summary(logits, where), *_label_summary(labels, where))


def _rows(shape, where):
    """The rows to value-check: all of them, or those where ``where`` is True."""
    # NumPy for the default: an eager jnp.ones would compile a program of its own per shape.
    return np.ones(shape, bool) if where is None else jnp.asarray(where, bool)


def _check_logit_values(logits, name: str, where=None, summary=None):
    if summary is None:
        summary = _logit_summary(logits, _rows(logits.shape[:-1], where))
    bad, looks_like_probs = int(summary[0]), bool(summary[1])
    if bad:
        raise ValueError(
            f"`{name}` contains {bad} NaN or infinite value(s); calibration metrics and "
            f"losses are undefined there. Remove those rows or fix the model output."
        )
    if looks_like_probs:
        warnings.warn(
            f"`{name}` looks like probabilities (every row lies in [0, 1] and sums to 1), "
            f"but calib_jax expects unnormalised logits. Pass `jnp.log(probs)` instead; "
            f"softmax of probabilities gives wrong confidences.",
            UserWarning,
            stacklevel=4,
        )


def check_logits(logits, *, name: str = "logits", rank: int | None = 2, where=None,
                 _check_values: bool = True):
    """Validates a logits array and returns it as an array.

    Args:
      logits: ``[N, C]`` (``rank=2``) or ``[..., C]`` (``rank=None``) floats.
      name: the argument name used in error messages.
      rank: the required rank, or None for "at least 1".
      where: optional bool ``[...]``; only these rows are value-checked (the
        others are padding).

    Raises:
      TypeError: non-floating dtype.
      ValueError: wrong rank, no rows, fewer than 2 classes, or (concrete input
        only) NaN / infinite entries.
    """
    logits = _as_array(logits, name)
    _check_floating(logits, name)
    if rank is not None and logits.ndim != rank:
        want = "[num_examples, num_classes]" if rank == 2 else f"rank {rank}"
        raise ValueError(f"`{name}` must have shape {want}, got shape {tuple(logits.shape)}.")
    if logits.ndim < 1:
        raise ValueError(f"`{name}` must have a trailing class axis, got a scalar.")
    if logits.shape[-1] < 2:
        raise ValueError(
            f"`{name}` must have at least 2 classes on its last axis, got shape "
            f"{tuple(logits.shape)}."
        )
    if logits.size == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(logits.shape)}); pass at least one example.")
    if _check_values and is_concrete(logits, where):
        _check_logit_values(logits, name, where)
    return logits


def check_logits_and_labels(logits, labels, *, rank: int | None = 2,
                            logits_name: str = "logits", labels_name: str = "labels",
                            where=None):
    """Validates ``(logits [..., C], labels [...])`` and returns them as arrays.

    ``where`` (optional bool ``[...]``) restricts the value checks to those rows.

    Raises:
      TypeError: logits not floating, or labels not integer (one-hot or float
        labels are a common mistake and are refused rather than guessed at).
      ValueError: rank/shape mismatch, empty input, fewer than two classes, or,
        for concrete values, labels outside ``[0, C)`` or non-finite logits.
    """
    labels = _as_array(labels, labels_name)
    logits = check_logits(logits, name=logits_name, rank=rank, where=where, _check_values=False)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        hint = (f"`{labels_name}.argmax(-1)`" if labels.ndim == logits.ndim
                else f"`{labels_name}.astype(jnp.int32)`")
        raise TypeError(
            f"`{labels_name}` must hold integer class indices, got dtype {labels.dtype}; "
            f"pass {hint}."
        )
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        extra = ""
        if tuple(labels.shape) == tuple(logits.shape):
            extra = f" One-hot labels? Pass `{labels_name}.argmax(-1)`."
        raise ValueError(
            f"`{labels_name}` must have shape {tuple(logits.shape[:-1])} (logits' shape "
            f"without the class axis), got {tuple(labels.shape)}.{extra}"
        )
    if is_concrete(logits, labels, where):
        summary = jax.device_get(_joint_summary(logits, labels, _rows(labels.shape, where)))
        _check_logit_values(logits, logits_name, summary=summary[:2])
        lo, hi = int(summary[2]), int(summary[3])
        num_classes = logits.shape[-1]
        if lo <= hi and (lo < 0 or hi >= num_classes):  # lo > hi: no row selected
            raise ValueError(
                f"`{labels_name}` must lie in [0, {num_classes}) for logits with "
                f"{num_classes} classes, got values in [{lo}, {hi}]."
            )
    return logits, labels


def valid_rows(logits, labels=None):
    """Boolean ``[...]``: the row's logits are finite and its label is in range.

    Used under tracing to poison outputs with NaN (see the module docstring).
    """
    ok = jnp.all(jnp.isfinite(logits), axis=-1)
    if labels is not None:
        ok &= (labels >= 0) & (labels < logits.shape[-1])
    return ok


def checkify_inputs(logits, labels=None) -> None:
    """Raises through ``checkify`` on bad values, for use inside compiled code.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> from calib_jax import metrics, validation
    >>> def checked_ece(logits, labels):
    ...   validation.checkify_inputs(logits, labels)
    ...   return metrics.ece(logits, labels)
    >>> f = jax.jit(checkify.checkify(checked_ece))
    >>> err, _ = f(jnp.zeros((4, 3)), jnp.array([0, 1, 2, 3]))
    >>> print(err.get())  # doctest: +ELLIPSIS
    `labels` must lie in [0, num_classes) ...
    """
    checkify.check(jnp.all(jnp.isfinite(logits)), "`logits` contains NaN or infinite values")
    if labels is not None:
        num_classes = logits.shape[-1]
        checkify.check(
            jnp.all((labels >= 0) & (labels < num_classes)),
            "`labels` must lie in [0, num_classes) (num_classes = {n}); got min {lo}, max {hi}",
            n=jnp.asarray(num_classes), lo=jnp.min(labels), hi=jnp.max(labels),
        )
