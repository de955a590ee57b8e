"""calib_jax.validation: the shared checks, and checkify under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from calib_jax import metrics, validation


def test_accepts_numpy_and_lists():
    logits, labels = validation.check_logits_and_labels([[0.0, 2.0]], [1])
    assert isinstance(logits, jax.Array) and labels.dtype == jnp.int32


def test_where_restricts_value_checks_to_selected_rows():
    logits = jnp.array([[0.0, 2.0], [jnp.nan, 0.0]])
    labels = jnp.array([1, 5])
    validation.check_logits_and_labels(logits, labels, where=jnp.array([True, False]))
    with pytest.raises(ValueError, match="1 NaN"):
        validation.check_logits_and_labels(logits, labels, where=jnp.array([True, True]))
    validation.check_logits_and_labels(logits, labels, where=jnp.array([False, False]))


def test_compute_dtype():
    assert validation.compute_dtype(jnp.bfloat16) == jnp.float32
    assert validation.compute_dtype(jnp.float16) == jnp.float32
    assert validation.compute_dtype(jnp.float32) == jnp.float32


def test_checks_skip_values_under_tracing_but_keep_shapes():
    seen = []

    @jax.jit
    def f(z, y):
        validation.check_logits_and_labels(z, y)
        seen.append(validation.is_concrete(z))
        return z.sum()

    f(jnp.zeros((2, 3)), jnp.array([0, 7]))  # out of range: not checkable here
    assert seen == [False]
    with pytest.raises(ValueError, match="`labels` must have shape"):
        f(jnp.zeros((2, 3)), jnp.array([0]))


def test_checkify_inputs_reports_bad_labels_and_nan():
    def checked(z, y):
        validation.checkify_inputs(z, y)
        return metrics.ece(z, y)

    f = jax.jit(checkify.checkify(checked))
    err, value = f(jnp.zeros((2, 3)), jnp.array([0, 2]))
    assert err.get() is None and np.isfinite(float(value))
    err, _ = f(jnp.zeros((2, 3)), jnp.array([0, 3]))
    assert "`labels` must lie" in err.get()
    err, _ = f(jnp.zeros((2, 3)).at[0, 0].set(jnp.inf), jnp.array([0, 1]))
    assert "NaN or infinite" in err.get()


def test_check_count_takes_ints_at_or_above_the_minimum():
    validation.check_count(15, "num_bins")
    validation.check_count(np.int64(2), "num_classes", minimum=2)
    for bad in (0, -1, 1.0, 1.5, True, "3", None):
        with pytest.raises(ValueError, match=r"`num_bins` must be a positive Python int, got"):
            validation.check_count(bad, "num_bins")
    with pytest.raises(ValueError, match=r"`num_classes` must be a Python int >= 2, got 1\."):
        validation.check_count(1, "num_classes", minimum=2)
