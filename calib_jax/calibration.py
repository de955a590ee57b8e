"""Temperature scaling: the reference's grid search and a continuous NLL fit.

``temperature_grid_search`` evaluates ECE and NLL of ``logits / T`` for every
``T`` of a grid **in one compiled call**, and picks the first minimum of the
chosen criterion, as the reference's ``set_temperature_cv`` does. Per
temperature it needs only one fused pass over ``[N, C]`` (a ``lax.map`` over
temperatures, so memory stays ``O(N x C)``); the binning of all temperatures
is one scatter-add. ``fit_temperature`` minimises the NLL
continuously over ``log T`` with optax's L-BFGS.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from calib_jax import metrics, validation

__all__ = [
    "FitTemperatureResult",
    "NLL_OPTIMA",
    "NO_FINITE_NLL_OPTIMUM",
    "TemperatureSearchResult",
    "apply_temperature",
    "fit_temperature",
    "nll_optimum",
    "reference_temperature_grid",
    "temperature_grid_search",
]

CRITERIA = ("ece", "nll")


def reference_temperature_grid() -> np.ndarray:
    """The reference's 100 temperatures, accumulated in Python floats.

    ``T_0 = 0.1``, ``T_{i+1} = T_i + 0.1``, so the values are
    ``0.1, 0.2, 0.30000000000000004, ..., 9.99999999999998`` (float64). Logits
    are divided by ``float32(T)``.

    >>> grid = reference_temperature_grid()
    >>> len(grid), float(grid[2]), float(grid[-1])
    (100, 0.30000000000000004, 9.99999999999998)
    """
    values, t = [], 0.1
    for _ in range(100):
        values.append(t)
        t += 0.1
    return np.array(values, dtype=np.float64)


class TemperatureSearchResult(NamedTuple):
    """Outcome of :func:`temperature_grid_search`.

    Attributes:
      temperature: ``[]`` float32, the chosen temperature.
      index: ``[]`` int32, its position in ``temperatures``.
      temperatures: ``[T]`` float32 grid.
      ece: ``[T]`` ECE at each temperature.
      nll: ``[T]`` NLL at each temperature.
    """
    temperature: jax.Array
    index: jax.Array
    temperatures: jax.Array
    ece: jax.Array
    nll: jax.Array


def apply_temperature(logits, temperature):
    """``logits / temperature`` in the logits' compute dtype (float32 for bf16).

    ``temperature`` is a scalar, or an array whose last axis has size 1 (one temperature per
    row, ``[N, 1]``, or per stacked set of logits, ``[K, 1, 1]``): a temperature that varied
    over the classes would be another method (vector scaling), and an array such as
    ``search.temperatures`` (the whole grid) passed for ``search.temperature`` would
    otherwise divide each class by another T wherever the grid's length equals the class
    count (CIFAR-100), silently.

    >>> import jax.numpy as jnp
    >>> apply_temperature(jnp.array([[2.0, 1.0]]), 2.0).tolist()
    [[1.0, 0.5]]
    """
    logits = validation.check_logits(logits, rank=None)
    shape = np.shape(temperature)
    if shape and shape[-1] != 1:
        raise ValueError(
            f"`temperature` must be a scalar or have a last axis of size 1 (one T per row: "
            f"shape [N, 1]), got shape {shape} for logits of shape {logits.shape}; one T per "
            f"class is not temperature scaling. For a search's result pass "
            f"`search.temperature`, not `search.temperatures` (the grid).")
    if validation.is_concrete(temperature):
        t = np.asarray(temperature, dtype=np.float64)
        if not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise ValueError(f"`temperature` must be finite and > 0, got {temperature!r}.")
    dtype = validation.compute_dtype(logits.dtype)
    return logits.astype(dtype) / jnp.asarray(temperature, dtype)


@functools.partial(jax.jit, static_argnames=("criterion", "num_bins", "convention"))
def _grid_search(logits, labels, temperatures, criterion, num_bins, convention):
    z = logits.astype(validation.compute_dtype(logits.dtype))
    temps = temperatures.astype(z.dtype)
    n = z.shape[0]
    # Per temperature only one fused pass over [N, C] is needed, computing
    # x = z / T, its row max m and s = sum exp(x - m) with the reference's
    # rounding; then max softmax = exp(0) / s = 1 / s and NLL = log s - (x_y - m).
    # The prediction is argmax(z) for every T (the reference's
    # argmax(softmax(z / T)) can differ only where two probabilities tie
    # after rounding).
    z_label = jnp.take_along_axis(z, jnp.clip(labels, 0, z.shape[-1] - 1)[:, None], -1)[:, 0]
    hits = (jnp.argmax(z, axis=-1) == labels).astype(jnp.float32)

    def per_temperature(t):  # ([N], [N]): the only O(N * C) work per temperature
        x = z / t
        m = jnp.max(x, axis=-1)
        s = jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
        return s, jnp.log(s) - (z_label / t - m)

    # A sequential map, not a vmap: a batched division by a vector of
    # temperatures is lowered differently from the row max's (measured: the
    # max term's exp(x - m) became 1 + 2e-5), and it is no faster since the
    # exponentials bind. Memory stays O(N * C) for any grid size.
    sums, nll_each = jax.lax.map(per_temperature, temps)  # [T, N] each
    conf = 1.0 / sums
    nlls = jnp.mean(nll_each, axis=1)
    # Bin all temperatures at once: [N, T] values, T groups of bins.
    edges = jnp.asarray(metrics.bin_edges(num_bins, convention=convention))
    index = metrics._bin_index(conf.T, edges, convention)
    binned = metrics._bin_sums(conf.T, jnp.broadcast_to(hits[:, None], index.shape), index,
                               jnp.ones(index.shape, bool), num_bins)
    eces = jnp.sum(metrics._weighted_gap(binned, n)[0], axis=-1)
    ok = jnp.all(validation.valid_rows(z, labels))
    eces = jnp.where(ok, eces, jnp.nan)
    nlls = jnp.where(ok, nlls, jnp.nan)
    # argmin keeps the first minimum, like the reference's strict `>` update.
    index = jnp.argmin(eces if criterion == "ece" else nlls).astype(jnp.int32)
    return TemperatureSearchResult(temperatures[index], index, temperatures, eces, nlls)


def temperature_grid_search(logits, labels, *, criterion: str = "ece", temperatures=None,
                            num_bins: int = 15, convention: str = "reference"
                            ) -> TemperatureSearchResult:
    """Picks the temperature minimising validation ECE (or NLL) over a grid.

    Args:
      logits: ``[N, C]`` validation logits; labels: ``[N]``.
      criterion: ``"ece"`` (the paper's choice) or ``"nll"``.
      temperatures: ``[T]`` positive grid; default
        :func:`reference_temperature_grid` (0.1 ... 10.0).
      num_bins, convention: passed to the ECE (see :mod:`calib_jax.metrics`).

    Returns:
      :class:`TemperatureSearchResult`: ``.temperature`` and the per-temperature
      ``.ece`` / ``.nll`` curves. Ties keep the first (smallest index) minimum.

    >>> import jax.numpy as jnp
    >>> logits = 3.0 * jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    >>> result = temperature_grid_search(logits, jnp.array([0, 1, 1, 1]), criterion="nll")
    >>> round(float(result.temperature), 1), int(result.index)
    (3.0, 29)
    """
    if criterion not in CRITERIA:
        raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
    metrics._check_options(num_bins, convention)
    logits, labels = validation.check_logits_and_labels(logits, labels)
    if temperatures is None:
        temperatures = reference_temperature_grid()
    if validation.is_concrete(temperatures):
        # Checked in NumPy: jnp's eager ops would compile one small program each on a first call.
        temps = np.asarray(temperatures, dtype=np.float32)
        _check_grid_shape(temps)
        if not np.all(np.isfinite(temps) & (temps > 0)):
            raise ValueError("`temperatures` must all be finite and > 0.")
    else:
        temps = jnp.asarray(temperatures, dtype=jnp.float32)
        _check_grid_shape(temps)
    return _grid_search(logits, labels, temps, criterion, int(num_bins), convention)


def _check_grid_shape(temps):
    if temps.ndim != 1 or temps.shape[0] == 0:
        raise ValueError(f"`temperatures` must be a non-empty 1-D array, got shape {temps.shape}.")


class FitTemperatureResult(NamedTuple):
    """Outcome of :func:`fit_temperature`.

    Attributes:
      temperature: ``[]`` the NLL-optimal temperature.
      nll: ``[]`` the NLL at that temperature.
      num_steps: ``[]`` L-BFGS iterations taken.
      grad_norm: ``[]`` |d NLL / d log T| at the end (convergence measure).
    """
    temperature: jax.Array
    nll: jax.Array
    num_steps: jax.Array
    grad_norm: jax.Array


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _fit(logits, labels, log_t0, max_steps, tol):
    logits = logits.astype(validation.compute_dtype(logits.dtype))

    def nll_of(log_t):
        scaled = logits * jnp.exp(-log_t)
        log_probs = jax.nn.log_softmax(scaled, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(nll_of)

    def step(carry):
        log_t, state = carry
        value, grad = value_and_grad(log_t, state=state)
        updates, state = opt.update(grad, state, log_t, value=value, grad=grad, value_fn=nll_of)
        return optax.apply_updates(log_t, updates), state

    def not_done(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_steps) & (jnp.abs(grad) >= tol))

    init = (log_t0, opt.init(log_t0))
    log_t, state = jax.lax.while_loop(not_done, step, init)
    final_nll, final_grad = jax.value_and_grad(nll_of)(log_t)
    ok = jnp.all(validation.valid_rows(logits, labels))
    nan = jnp.float32(jnp.nan)
    result = FitTemperatureResult(
        jnp.where(ok, jnp.exp(log_t), nan), jnp.where(ok, final_nll, nan),
        optax.tree_utils.tree_get(state, "count"), jnp.abs(final_grad))
    return result, _nll_optimum(logits, labels)


#: :func:`_nll_optimum`'s cases, and :func:`nll_optimum`'s names for them.
_FINITE, _AT_ZERO, _AT_INFINITY = 0, 1, 2
NLL_OPTIMA = ("finite", "zero", "infinity")
#: Why the NLL has no minimum at a finite temperature, per :data:`NLL_OPTIMA` name.
NO_FINITE_NLL_OPTIMUM = {
    "zero": "every prediction is right: the NLL falls as T -> 0",
    "infinity": "the labels' logits are on average no higher than their rows' mean logit "
                "(no better than chance): the NLL falls as T -> infinity"}


def _nll_optimum(logits, labels):
    """Where the NLL of ``logits / T`` has its infimum: ``_FINITE``, ``_AT_ZERO`` or
    ``_AT_INFINITY`` (int32).

    Why these three and no other: the NLL is convex in ``b = 1 / T`` (a log-sum-exp minus a
    linear term), with slope ``mean(E_softmax(b z)[z] - z_label)``. Where every label's logit
    is a maximum of its row (every prediction right, ties allowed) that slope is negative
    for every ``b`` (T -> 0). Else it is positive for large ``b``, and the minimum is finite
    exactly when the slope at ``b = 0`` (uniform softmax), ``mean(mean_c z - z_label)``, is
    negative; at or above 0 the NLL only falls as T grows (T -> infinity). Rows whose
    logits are all equal do not depend on T; where every row is so, the case is ``_FINITE``
    (any T is optimal)."""
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    row_max = jnp.max(logits, axis=-1)
    all_flat = jnp.all(row_max == jnp.min(logits, axis=-1))
    all_right = jnp.all(label_logit >= row_max)
    slope_at_infinite_t = jnp.mean(jnp.mean(logits, axis=-1) - label_logit)
    return jnp.where(all_flat, _FINITE, jnp.where(
        all_right, _AT_ZERO, jnp.where(slope_at_infinite_t >= 0, _AT_INFINITY, _FINITE)))


_nll_optimum_jit = jax.jit(_nll_optimum)


def fit_temperature(logits, labels, *, init: float = 1.0, max_steps: int = 100,
                    tol: float = 1e-6) -> FitTemperatureResult:
    """The NLL-optimal temperature, found continuously (L-BFGS over ``log T``).

    Optimising ``log T`` keeps ``T > 0`` without constraints and makes the
    problem well scaled. The NLL is convex in ``1 / T``, so it has at most one minimum,
    and it has none in two cases, where this function warns (``RuntimeWarning``, when
    called outside ``jit``) and returns the temperature at which the fit stopped, not an
    optimum:

    * every prediction is right (each label's logit a maximum of its row): the NLL falls
      as ``T -> 0``; the fit stops at a small temperature;
    * the labels' logits are on average no higher than their rows' mean logit (a model no
      better than chance, e.g. barely trained or diverged): the NLL falls as
      ``T -> infinity``; the fit stops at a large temperature (e.g. ~5e5 for 8 rows of random
      logits), where the NLL is that of uniform predictions.

    In both cases the fit ends because the gradient vanishes, so ``grad_norm`` does not
    tell them apart from an optimum. :func:`temperature_grid_search` stays within its grid.

    Args:
      logits: ``[N, C]`` validation logits; labels: ``[N]``.
      init: starting temperature (> 0).
      max_steps: L-BFGS iteration limit (static).
      tol: stop when ``|d NLL / d log T| < tol``.

    >>> import jax.numpy as jnp
    >>> logits = 3.0 * jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    >>> round(float(fit_temperature(logits, jnp.array([0, 1, 1, 1])).temperature), 2)
    2.96
    """
    if not (np.isfinite(init) and init > 0):
        raise ValueError(f"`init` must be finite and > 0, got {init!r}.")
    if int(max_steps) < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps!r}.")
    logits, labels = validation.check_logits_and_labels(logits, labels)
    log_t0 = jnp.asarray(np.log(init), jnp.float32)
    result, optimum = _fit(logits, labels, log_t0, int(max_steps), jnp.float32(tol))
    if validation.is_concrete(optimum) and int(optimum) != _FINITE:
        warnings.warn(
            f"fit_temperature: the NLL has no minimum at a finite temperature "
            f"({NO_FINITE_NLL_OPTIMUM[NLL_OPTIMA[int(optimum)]]}); the fit stopped at "
            f"T = {float(result.temperature):.4g}, which is not an optimum. Check that these "
            f"are a trained model's validation logits, or use temperature_grid_search, which "
            f"stays within its grid (calibration.nll_optimum tells this case beforehand).",
            RuntimeWarning, stacklevel=2)
    return result


def nll_optimum(logits, labels) -> str:
    """Where the NLL-optimal temperature of ``logits`` lies: ``"finite"``, ``"zero"`` or
    ``"infinity"`` (see :func:`fit_temperature` for why these are all the cases, and
    :data:`NO_FINITE_NLL_OPTIMUM` for the last two in words).

    For callers that report a fitted temperature (``calib_jax.evaluate`` records none where
    there is no finite optimum, with the reason, instead of where the fit stopped). Not
    jittable: it returns a Python string.

    >>> import jax.numpy as jnp
    >>> nll_optimum(jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), jnp.array([0, 1, 1]))
    'finite'
    >>> nll_optimum(jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1]))
    'zero'
    """
    logits, labels = validation.check_logits_and_labels(logits, labels)
    return NLL_OPTIMA[int(_nll_optimum_jit(
        logits.astype(validation.compute_dtype(logits.dtype)), labels))]
