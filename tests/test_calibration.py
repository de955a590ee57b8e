"""Temperature scaling against the reference's loop, and the continuous fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numpy_reference as ref
from calib_jax import calibration, metrics


def overconfident_problem(n=300, c=10, seed=0, sharpness=4.0):
    """Logits of a classifier that is right ~70% of the time but sure of itself."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n).astype(np.int32)
    logits = rng.standard_normal((n, c))
    logits[np.arange(n), labels] += np.where(rng.random(n) < 0.7, 2.0, 0.0)
    return (sharpness * logits).astype(np.float32), labels


def test_reference_grid():
    grid = calibration.reference_temperature_grid()
    assert grid.shape == (100,) and grid.dtype == np.float64
    assert grid[0] == 0.1 and grid[2] == 0.30000000000000004 and grid[-1] == 9.99999999999998
    assert np.all(np.diff(grid) > 0)


@pytest.mark.parametrize("criterion", ["ece", "nll"])
def test_grid_search_equals_reference_loop(criterion):
    logits, labels = overconfident_problem()
    result = calibration.temperature_grid_search(logits, labels, criterion=criterion)
    want_t, curve = ref.temperature_search(logits, labels, criterion=criterion)
    assert float(result.temperature) == np.float32(want_t)
    assert calibration.reference_temperature_grid()[int(result.index)] == want_t
    np.testing.assert_allclose(result.ece, [e for _, e, _ in curve], atol=2e-6)
    np.testing.assert_allclose(result.nll, [v for _, _, v in curve], rtol=2e-6)
    assert result.temperatures.shape == result.ece.shape == result.nll.shape == (100,)


def test_grid_search_prefers_larger_t_for_overconfident_model_and_reduces_ece():
    logits, labels = overconfident_problem(seed=1)
    result = calibration.temperature_grid_search(logits, labels)
    assert float(result.temperature) > 1.5
    before = float(metrics.ece(logits, labels))
    after = float(metrics.ece(calibration.apply_temperature(logits, result.temperature), labels))
    assert after < before / 2


def test_first_minimum_wins_on_ties():
    # Every sample correct with confidence exactly 1 at all T: ECE is 0 everywhere.
    logits = np.array([[300.0, 0.0], [0.0, 300.0]], np.float32)
    result = calibration.temperature_grid_search(logits, np.array([0, 1], np.int32))
    assert int(result.index) == 0 and np.all(np.asarray(result.ece) == 0.0)


def test_custom_grid_and_jit_vmap():
    logits, labels = overconfident_problem(n=100, seed=2)
    temps = jnp.array([0.5, 1.0, 2.0, 4.0])
    result = calibration.temperature_grid_search(logits, labels, temperatures=temps,
                                                 criterion="nll")
    want = [float(metrics.nll(logits / t, labels)) for t in np.asarray(temps)]
    np.testing.assert_allclose(result.nll, want, rtol=1e-6)
    assert float(result.temperature) == float(temps[int(np.argmin(want))])
    stacked = jnp.stack([logits, 0.5 * logits])
    batched = jax.vmap(lambda z: calibration.temperature_grid_search(
        z, labels, temperatures=temps).temperature)(stacked)
    looped = [calibration.temperature_grid_search(z, labels, temperatures=temps).temperature
              for z in stacked]
    np.testing.assert_array_equal(batched, looped)


def test_grid_search_is_exact_for_saturated_confidences():
    # conf = 1 / sum exp(x - max x) must be exactly 1 when the other terms vanish.
    logits = np.array([[300.0, 0.0], [0.0, 300.0], [0.0, 300.0]], np.float32)
    result = calibration.temperature_grid_search(logits, np.array([0, 1, 0], np.int32))
    # Constant (no ulp drift) and equal to the metric itself.
    np.testing.assert_array_equal(result.ece, float(metrics.ece(logits, np.array([0, 1, 0]))))


def test_fit_temperature_minimises_nll():
    logits, labels = overconfident_problem(seed=4)
    fit = calibration.fit_temperature(logits, labels)
    t = float(fit.temperature)
    assert float(fit.grad_norm) < 1e-4 and int(fit.num_steps) < 100
    nll = lambda tt: ref.nll(logits / np.float32(tt), labels)
    np.testing.assert_allclose(float(fit.nll), nll(t), rtol=1e-5)
    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02))
    grid = calibration.temperature_grid_search(logits, labels, criterion="nll")
    assert abs(t - float(grid.temperature)) <= 0.1
    # Starting elsewhere converges to the same optimum.
    np.testing.assert_allclose(float(calibration.fit_temperature(logits, labels, init=0.3)
                                     .temperature), t, rtol=1e-3)


def test_fit_temperature_warns_where_the_nll_has_no_finite_minimum():
    # No better than chance: 8 rows of random logits whose labels' logits lie below their
    # rows' mean on average. The NLL falls towards uniform predictions as T grows.
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    assert np.mean(logits.mean(1) - logits[np.arange(8), labels]) > 0
    with pytest.warns(RuntimeWarning, match=r"no minimum at a finite temperature .*no better "
                                            r"than chance\): the NLL falls as T -> infinity\); "
                                            r"the fit stopped at T = 4\.\d+e\+05"):
        fit = calibration.fit_temperature(logits, labels)
    assert float(fit.temperature) > 1e5 and float(fit.grad_norm) < 1e-6  # looks converged
    np.testing.assert_allclose(float(fit.nll), np.log(3), rtol=1e-5)
    # Every prediction right (one row tied at its top): the NLL falls as T -> 0.
    right = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
    with pytest.warns(RuntimeWarning, match=r"every prediction is right: the NLL falls as T -> 0"):
        fit = calibration.fit_temperature(right, np.array([0, 1, 0]))
    assert float(fit.temperature) < 0.2
    # nll_optimum tells both cases beforehand, and the finite one.
    assert calibration.nll_optimum(logits, labels) == "infinity"
    assert calibration.nll_optimum(right, np.array([0, 1, 0])) == "zero"
    assert calibration.nll_optimum(*overconfident_problem(n=50, seed=1)) == "finite"
    with pytest.raises(ValueError, match="NaN"):
        calibration.nll_optimum(np.where(np.eye(3, 2, dtype=bool), np.nan, right), [0, 1, 0])
    # Under jit no warning (nothing concrete to look at), the same temperature.
    jitted = jax.jit(lambda z, y: calibration.fit_temperature(z, y).temperature)
    assert float(jitted(right, np.array([0, 1, 0]))) == float(fit.temperature)
    # A finite minimum, and rows that do not depend on T at all: no warning (setup.cfg turns
    # calib_jax's RuntimeWarnings into errors in the tests).
    logits, labels = overconfident_problem(n=50, seed=1)
    calibration.fit_temperature(logits, labels)
    assert float(calibration.fit_temperature(np.zeros((4, 3), np.float32),
                                             np.array([0, 1, 2, 0])).temperature) == 1.0


@given(st.integers(0, 10_000), st.integers(2, 12), st.integers(2, 5), st.floats(0.0, 3.0))
def test_property_the_nll_optimum_cases_agree_with_the_nll_over_temperatures(seed, n, c,
                                                                             signal):
    """The case ``_nll_optimum`` names matches the NLL over 1e-3 <= T <= 1e3 (float64):
    falling as T grows where it says T -> infinity (so never below its limit there, the
    uniform prediction's log C), rising where it says T -> 0, and a grid minimum strictly
    inside the range only where it says finite. Where it says finite and some prediction is
    wrong, the NLL dips below log C inside the range, unless the minimum lies beyond T = 1e3
    (the slope at 1 / T = 0 within 1e-2 of 0: skipped)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c))
    logits[np.arange(n), labels] += signal * rng.choice([-1.0, 1.0, 2.0], n)
    logits = logits.astype(np.float32)
    case = int(calibration._nll_optimum(jnp.asarray(logits), jnp.asarray(labels)))
    temperatures = np.geomspace(1e-3, 1e3, 61)
    z = logits.astype(np.float64)
    curve = np.array([ref.nll(z / t, labels) for t in temperatures])
    steps = np.diff(curve)
    tol = 1e-9 * np.maximum(1.0, np.abs(curve[:-1]))
    if case == calibration._AT_INFINITY:
        assert np.all(steps <= tol), curve
    elif case == calibration._AT_ZERO:
        assert np.all(steps >= -tol), curve
    inside = int(np.argmin(curve))
    if 0 < inside < len(curve) - 1 and curve[inside] < min(curve[0], curve[-1]) - 1e-9:
        assert case == calibration._FINITE
    label_logit = z[np.arange(n), labels]
    some_wrong = np.any(label_logit < z.max(1))
    slope_at_zero = np.mean(z.mean(1) - label_logit)
    if case == calibration._AT_INFINITY:
        assert curve.min() >= np.log(c) - 1e-9, curve
    elif case == calibration._FINITE and some_wrong and abs(slope_at_zero) > 1e-2:
        assert curve.min() < np.log(c), curve


@given(st.floats(0.2, 5.0), st.integers(0, 1000))
def test_property_temperature_one_is_identity(scale, seed):
    logits, labels = overconfident_problem(n=40, seed=seed, sharpness=scale)
    scaled = calibration.apply_temperature(logits, 1.0)
    np.testing.assert_array_equal(scaled, logits)
    assert float(metrics.ece(scaled, labels)) == float(metrics.ece(logits, labels))


@given(st.integers(0, 1000), st.sampled_from(["ece", "nll"]))
def test_property_grid_search_equals_python_loop(seed, criterion):
    logits, labels = overconfident_problem(n=40, seed=seed)
    temps = calibration.reference_temperature_grid()[::10]
    result = calibration.temperature_grid_search(logits, labels, criterion=criterion,
                                                 temperatures=temps)
    fn = metrics.ece if criterion == "ece" else metrics.nll
    values = [float(fn(calibration.apply_temperature(logits, np.float32(t)), labels))
              for t in temps]
    np.testing.assert_allclose(result.ece if criterion == "ece" else result.nll, values,
                               rtol=1e-6, atol=1e-7)
    assert int(result.index) == int(np.argmin(values))


def test_bad_inputs():
    z, y = jnp.zeros((3, 4)).at[:, 0].set(2.0), jnp.array([0, 1, 2])
    with pytest.raises(ValueError, match="`criterion`"):
        calibration.temperature_grid_search(z, y, criterion="mce")
    with pytest.raises(ValueError, match="`temperatures`"):
        calibration.temperature_grid_search(z, y, temperatures=[1.0, 0.0])
    with pytest.raises(ValueError, match="`temperatures`"):
        calibration.temperature_grid_search(z, y, temperatures=[])
    with pytest.raises(ValueError, match="`labels` must lie"):
        calibration.temperature_grid_search(z, jnp.array([0, 1, 4]))
    with pytest.raises(ValueError, match="`temperature`"):
        calibration.apply_temperature(z, -1.0)
    # One T per class is refused, also where it would broadcast (the grid passed for the
    # chosen T, 100 temperatures against 100 classes); one T per row or per stack is not.
    logits, labels = overconfident_problem(n=20, c=100)
    search = calibration.temperature_grid_search(logits, labels)
    with pytest.raises(ValueError, match=r"got shape \(100,\) for logits of shape \(20, 100\)"
                                         r".*pass `search.temperature`, not `search.temperatures`"):
        calibration.apply_temperature(logits, search.temperatures)
    with pytest.raises(ValueError, match="last axis of size 1"):
        jax.jit(calibration.apply_temperature)(logits, jnp.ones((20, 100)))
    rows = np.linspace(0.5, 2.0, 20, dtype=np.float32)[:, None]
    np.testing.assert_allclose(calibration.apply_temperature(logits, rows), logits / rows,
                               rtol=1e-6)
    stacked = np.stack([logits, 2 * logits])
    np.testing.assert_allclose(
        calibration.apply_temperature(stacked, np.float32([1.0, 2.0])[:, None, None]),
        np.stack([logits, logits]), rtol=1e-6)
    with pytest.raises(ValueError, match="`init`"):
        calibration.fit_temperature(z, y, init=0.0)
    with pytest.raises(ValueError, match="NaN"):
        calibration.fit_temperature(z.at[0, 0].set(jnp.nan), y)
    out = jax.jit(lambda a, b: calibration.fit_temperature(a, b).temperature)(z, jnp.array([0, 1, 9]))
    assert np.isnan(float(out))
