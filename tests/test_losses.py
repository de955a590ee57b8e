"""calib_jax.losses against float64 NumPy oracles, plus gradients and numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import numpy_reference as ref
from calib_jax import losses

RNG = np.random.default_rng(0)


def random_problem(n=64, c=10, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, c))).astype(np.float32)
    labels = rng.integers(0, c, size=n).astype(np.int32)
    return logits, labels


PER_EXAMPLE = {
    "cross_entropy": (losses.cross_entropy, ref.cross_entropy),
    "focal_1": (lambda z, y: losses.focal_loss(z, y, gamma=1.0), lambda z, y: ref.focal(z, y, 1.0)),
    "focal_3": (lambda z, y: losses.focal_loss(z, y, gamma=3.0), lambda z, y: ref.focal(z, y, 3.0)),
    "focal_0.5": (lambda z, y: losses.focal_loss(z, y, gamma=0.5),
                  lambda z, y: ref.focal(z, y, 0.5)),
    "flsd53": (losses.adaptive_focal_loss, ref.adaptive_focal),
    "flsd52": (lambda z, y: losses.adaptive_focal_loss(z, y, gamma=2.0),
               lambda z, y: ref.adaptive_focal(z, y, gamma=2.0)),
    "brier": (losses.brier_score, ref.brier),
    "label_smoothing": (lambda z, y: losses.label_smoothing_cross_entropy(z, y, smoothing=0.05),
                        lambda z, y: ref.label_smoothing(z, y, 0.05)),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_per_example_losses_match_numpy(name):
    ours, oracle = PER_EXAMPLE[name]
    logits, labels = random_problem()
    got = np.asarray(ours(logits, labels))
    assert got.shape == labels.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, oracle(logits, labels), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_per_example_losses_have_correct_gradients(name):
    ours, _ = PER_EXAMPLE[name]
    logits, labels = random_problem(n=6, c=4, scale=1.5, seed=1)
    with jax.enable_x64(True):
        z = jnp.asarray(logits, jnp.float64)
        check_grads(lambda x: ours(x, labels), (z,), order=1, modes=("fwd", "rev"),
                    atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [losses.mmce, losses.mmce_weighted])
def test_batch_losses_match_numpy_and_gradients(fn):
    logits, labels = random_problem(n=24, c=5, scale=2.0, seed=2)
    oracle = ref.mmce if fn is losses.mmce else ref.mmce_weighted
    np.testing.assert_allclose(float(fn(logits, labels)), oracle(logits, labels), rtol=1e-5)
    with jax.enable_x64(True):
        z = jnp.asarray(logits[:8], jnp.float64)
        check_grads(lambda x: fn(x, labels[:8]), (z,), order=1, modes=("rev",),
                    atol=1e-5, rtol=1e-5)


def test_mmce_weighted_where_is_the_counted_rows_alone_in_value_and_gradient():
    logits, labels = random_problem(n=20, c=3, scale=2.0, seed=6)
    where = np.random.default_rng(6).random(20) < 0.6
    # Rows that do not count may hold anything, even NaN logits and labels out of range.
    junk_logits = np.where(where[:, None], logits, np.nan).astype(np.float32)
    junk_labels = np.where(where, labels, -1).astype(np.int32)

    def masked(z):
        return losses.mmce_weighted(z, junk_labels, where=where)

    def kept(z):
        return losses.mmce_weighted(z, labels[where])

    np.testing.assert_allclose(float(masked(junk_logits)), ref.mmce_weighted(
        logits[where], labels[where]), rtol=1e-5)
    g = jax.grad(masked)(junk_logits)
    np.testing.assert_allclose(g[where], jax.grad(kept)(logits[where]), rtol=1e-5, atol=1e-7)
    assert np.all(g[~where] == 0)
    bad = junk_logits.copy()
    bad[np.flatnonzero(where)[0], 0] = np.nan  # a counted row is still refused / poisons
    with pytest.raises(ValueError, match="contains 1 NaN"):
        masked(bad)
    assert np.isnan(float(jax.jit(masked)(bad)))
    with pytest.raises(ValueError, match="`where` must have the labels' shape"):
        losses.mmce_weighted(logits, labels, where=where[:5])


def test_focal_gamma_zero_is_cross_entropy_in_value_and_gradient():
    logits, labels = random_problem(seed=3)
    np.testing.assert_allclose(losses.focal_loss(logits, labels, gamma=0.0),
                               losses.cross_entropy(logits, labels), rtol=1e-6)
    g_focal = jax.grad(lambda z: losses.focal_loss(z, labels, gamma=0.0).sum())(logits)
    g_ce = jax.grad(lambda z: losses.cross_entropy(z, labels).sum())(logits)
    np.testing.assert_allclose(g_focal, g_ce, rtol=1e-6, atol=1e-7)


def test_focal_gradient_matches_closed_form():
    # dL/dz = dL/dlogp * (onehot - p), dL/dlogp = -(1-p)^g + g p (1-p)^(g-1) log p.
    logits, labels = random_problem(n=16, c=6, seed=4)
    gamma = 2.5
    g = jax.grad(lambda z: losses.focal_loss(z, labels, gamma=gamma).sum())(logits)
    p = ref.softmax64(logits)
    pt = p[np.arange(16), labels]
    dl = -(1 - pt) ** gamma + gamma * pt * (1 - pt) ** (gamma - 1) * np.log(pt)
    onehot = np.eye(6)[labels]
    np.testing.assert_allclose(g, dl[:, None] * (onehot - p), rtol=1e-4, atol=1e-6)


EXTREME_LOGITS = [
    [1e4, -1e4, 0.0],    # p_t == 1 exactly (label 0)
    [-1e4, 1e4, 0.0],    # p_t == 0 exactly (label 0)
    [30.0, 0.0, 0.0],    # p_t rounds to 1 in float32
    [0.0, 0.0, 0.0],
    [1e4, 1e4, -1e4],    # tie at the top
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0, 3.0, 4.2, 5.0])
def test_focal_values_and_gradients_finite_at_extremes(dtype, gamma):
    logits = jnp.asarray(EXTREME_LOGITS, dtype)
    labels = jnp.zeros(len(EXTREME_LOGITS), jnp.int32)
    value, grad = jax.value_and_grad(
        lambda z: losses.focal_loss(z, labels, gamma=gamma).sum())(logits)
    assert value.dtype == jnp.float32
    assert np.isfinite(float(value))
    grad = np.asarray(grad, np.float32)
    assert grad.dtype == np.float32 and np.all(np.isfinite(grad)), grad
    # p_t == 1: a confident right answer has zero gradient for gamma > 0 (and CE's too).
    np.testing.assert_allclose(grad[0], 0.0, atol=1e-6)
    # p_t == 0: the label logit gets -1, like cross-entropy.
    np.testing.assert_allclose(grad[1], [-1.0, 1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_focal_gradient_wrt_gamma_is_finite(gamma):
    logits = jnp.asarray(EXTREME_LOGITS, jnp.float32)
    labels = jnp.zeros(len(EXTREME_LOGITS), jnp.int32)
    dg = jax.grad(lambda g: losses.focal_loss(logits, labels, gamma=g).sum())(gamma)
    assert np.isfinite(float(dg))


def test_naive_focal_has_nan_gradient_where_ours_does_not():
    # The motivating corner: fractional gamma at p_t = 1.
    logits = jnp.array([[1e4, 0.0]])
    labels = jnp.array([0])

    def naive(z):
        logp = jax.nn.log_softmax(z)[0, 0]
        return -((1 - jnp.exp(logp)) ** 0.5) * logp

    assert np.isnan(np.asarray(jax.grad(naive)(logits))).any()
    ours = jax.grad(lambda z: losses.focal_loss(z, labels, gamma=0.5).sum())(logits)
    assert np.all(np.isfinite(ours))


def test_focal_bfloat16_close_to_float32():
    logits, labels = random_problem(seed=5)
    lo = losses.focal_loss(jnp.asarray(logits, jnp.bfloat16), labels, gamma=3.0)
    hi = losses.focal_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), labels,
                           gamma=3.0)
    np.testing.assert_allclose(lo, hi, rtol=1e-6)  # computed in float32 after the cast


def test_focal_accepts_per_example_and_traced_gamma():
    logits, labels = random_problem(n=4, c=3, seed=6)
    gammas = jnp.array([0.0, 1.0, 2.0, 3.0])
    got = losses.focal_loss(logits, labels, gamma=gammas)
    want = [ref.focal(logits[i:i + 1], labels[i:i + 1], float(g))[0] for i, g in enumerate(gammas)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jitted = jax.jit(lambda g: losses.focal_loss(logits, labels, gamma=g))
    np.testing.assert_allclose(jitted(3.0), ref.focal(logits, labels, 3.0), rtol=1e-5)


def test_losses_support_leading_batch_dims():
    logits, labels = random_problem(n=12, c=5, seed=7)
    got = losses.focal_loss(logits.reshape(3, 4, 5), labels.reshape(3, 4), gamma=2.0)
    np.testing.assert_allclose(got.reshape(-1), losses.focal_loss(logits, labels, gamma=2.0),
                               rtol=1e-6)


def test_flsd_tiers_and_no_gradient_through_gamma():
    # Two-class logits chosen to hit each tier: p_t = 0.1, 0.3, 0.7.
    p = np.array([0.1, 0.3, 0.7])
    logits = jnp.asarray(np.stack([np.log(p), np.log(1 - p)], 1), jnp.float32)
    labels = jnp.zeros(3, jnp.int32)
    for gamma, tiers in [(3.0, [5.0, 3.0, 3.0]), (2.0, [5.0, 3.0, 2.0])]:
        got = losses.adaptive_focal_loss(logits, labels, gamma=gamma)
        want = [float(losses.focal_loss(logits[i:i + 1], labels[i:i + 1], gamma=g)[0])
                for i, g in enumerate(tiers)]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        g_ad = jax.grad(lambda z: losses.adaptive_focal_loss(z, labels, gamma=gamma).sum())(logits)
        g_fixed = jax.grad(lambda z: losses.focal_loss(z, labels, gamma=jnp.array(tiers)).sum())(
            logits)
        np.testing.assert_allclose(g_ad, g_fixed, rtol=1e-6)


def test_flsd_threshold_boundaries_follow_reference_rule():
    gamma = losses.adaptive_focal_gamma(
        jnp.array([0.0, np.nextafter(np.float32(0.2), 0), 0.2, 0.49999997, 0.5, 1.0],
                  jnp.float32), gamma=2.0)
    assert gamma.tolist() == [5.0, 5.0, 3.0, 3.0, 2.0, 2.0]
    for p32 in [0.0, 0.19999999, 0.2, 0.3, 0.5, 0.9]:
        want = ref.flsd_gamma(float(np.float32(p32)), gamma=2.0)
        assert float(losses.adaptive_focal_gamma(jnp.float32(p32), gamma=2.0)) == want


def test_flsd_custom_tiers():
    p = jnp.array([0.05, 0.15, 0.5, 0.95])
    got = losses.adaptive_focal_gamma(p, gamma=1.0, thresholds=(0.1, 0.3, 0.9),
                                      gammas=(6.0, 4.0, 2.0))
    assert got.tolist() == [6.0, 4.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="same length"):
        losses.adaptive_focal_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), thresholds=(0.2,),
                                   gammas=(5.0, 3.0))
    with pytest.raises(ValueError, match="increasing"):
        losses.adaptive_focal_gamma(p, thresholds=(0.5, 0.2), gammas=(5.0, 3.0))


def test_focal_gamma_schedule():
    assert [losses.focal_gamma_schedule(e) for e in (0, 99, 100, 249, 250, 349)] == [
        5.0, 5.0, 3.0, 3.0, 1.0, 1.0]
    assert losses.focal_gamma_schedule(250, gammas=(5.0, 3.0, 2.0)) == 2.0
    traced = jax.jit(losses.focal_gamma_schedule)(jnp.array([0, 100, 300]))
    assert traced.tolist() == [5.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="epoch"):
        losses.focal_gamma_schedule(-1)
    with pytest.raises(ValueError, match="gammas"):
        losses.focal_gamma_schedule(3, gammas=(5.0, 3.0))


def test_label_smoothing_forms_differ_and_uniform_matches_optax():
    import optax
    logits, labels = random_problem(seed=8)
    ref_form = losses.label_smoothing_cross_entropy(logits, labels, smoothing=0.1)
    uniform = losses.label_smoothing_cross_entropy(logits, labels, smoothing=0.1, form="uniform")
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.1)
    np.testing.assert_allclose(uniform, optax.softmax_cross_entropy(logits, targets), rtol=1e-5)
    assert not np.allclose(ref_form, uniform)
    np.testing.assert_allclose(
        losses.label_smoothing_cross_entropy(logits, labels, smoothing=0.0),
        losses.cross_entropy(logits, labels), rtol=1e-6)


def test_mmce_weighted_zero_when_all_right_or_all_wrong():
    logits = jnp.array([[3.0, 0.0], [0.0, 2.0]])
    assert float(losses.mmce_weighted(logits, jnp.array([0, 1]))) == 0.0
    assert float(losses.mmce_weighted(logits, jnp.array([1, 0]))) == 0.0
    g = jax.grad(lambda z: losses.mmce_weighted(z, jnp.array([0, 1])))(logits)
    assert np.all(np.asarray(g) == 0.0)


def test_mmce_gradient_rules_follow_torch():
    # Identical rows: every |r_i - r_j| is 0, whose torch derivative is 0, so only
    # the (c - r) factors carry gradient. jnp.abs would add sign(0) = 1 terms.
    logits = jnp.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    labels = jnp.array([0, 0, 1])
    g = np.asarray(jax.grad(lambda z: losses.mmce(z, labels))(logits))
    r = float(jax.nn.softmax(logits[0])[0])
    c = np.array([1.0, 1.0, 0.0])
    # d/dr_k of sum_ij (c_i - r_i)(c_j - r_j) / N^2 with K = 1 is -2 sum_j (c_j - r_j) / N^2.
    d_r = -2 * np.sum(c - r) / 9
    want_row = d_r * r * (1 - r) * np.array([1.0, -1.0])
    np.testing.assert_allclose(g, np.tile(want_row, (3, 1)), rtol=1e-5)
    # Tied top probabilities: the gradient of r goes to the first maximal entry only.
    tie = jnp.array([[1.0, 1.0, -1.0], [0.0, 2.0, 0.0]])
    gt = np.asarray(jax.grad(lambda z: losses.mmce(z, jnp.array([2, 1])))(tie))
    p = np.asarray(jax.nn.softmax(tie[0]))
    # d r / d z = p_0 (onehot_0 - p) when r is taken at index 0.
    direction = p[0] * (np.eye(3)[0] - p)
    cosine = gt[0] @ direction / (np.linalg.norm(gt[0]) * np.linalg.norm(direction))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


@given(st.sampled_from([2, 6]), st.sampled_from([1, 8]), st.floats(0.0, 5.0), st.integers(0, 2 ** 16))
def test_focal_property_bounded_by_cross_entropy(c, n, gamma, seed):
    logits, labels = random_problem(n=n, c=c, scale=4.0, seed=seed)
    focal = np.asarray(losses.focal_loss(logits, labels, gamma=gamma))
    ce = np.asarray(losses.cross_entropy(logits, labels))
    assert np.all(focal >= 0) and np.all(focal <= ce * (1 + 1e-6) + 1e-7)


@given(st.sampled_from([2, 6]), st.sampled_from([1, 8]), st.integers(0, 2 ** 16))
def test_brier_property_range(c, n, seed):
    logits, labels = random_problem(n=n, c=c, scale=4.0, seed=seed)
    b = np.asarray(losses.brier_score(logits, labels))
    assert np.all(b >= 0) and np.all(b <= 2 + 1e-6)


# ---------------------------------------------------------------- bad input

BAD_INPUT_FNS = [
    losses.cross_entropy, losses.brier_score, losses.mmce, losses.mmce_weighted,
    losses.adaptive_focal_loss, lambda z, y: losses.focal_loss(z, y, gamma=2.0),
    lambda z, y: losses.label_smoothing_cross_entropy(z, y, smoothing=0.1),
]


@pytest.mark.parametrize("fn", BAD_INPUT_FNS)
def test_bad_inputs_raise_clear_errors(fn):
    logits = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        fn(logits, jnp.array([0, 4, 1]))
    with pytest.raises(ValueError, match="`labels` must lie"):
        fn(logits, jnp.array([0, -1, 1]))
    with pytest.raises(TypeError, match="`labels` must hold integer"):
        fn(logits, jnp.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="One-hot"):
        fn(logits, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="`labels` must have shape"):
        fn(logits, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(logits.at[1, 2].set(jnp.nan), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(logits.at[1, 2].set(-jnp.inf), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        fn(jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fn(jnp.zeros((3, 1)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="`logits` must be a floating-point"):
        fn(jnp.zeros((3, 4), jnp.int32), jnp.array([0, 1, 2]))
    with pytest.warns(UserWarning, match="looks like probabilities"):
        fn(jnp.full((3, 4), 0.25), jnp.array([0, 1, 2]))


def test_bad_hyperparameters_raise():
    z, y = jnp.zeros((2, 3)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="`gamma`"):
        losses.focal_loss(z, y, gamma=-1.0)
    with pytest.raises(ValueError, match="`gamma`"):
        losses.focal_loss(z, y, gamma=float("nan"))
    with pytest.raises(ValueError, match="`smoothing`"):
        losses.label_smoothing_cross_entropy(z, y, smoothing=1.0)
    with pytest.raises(ValueError, match="`form`"):
        losses.label_smoothing_cross_entropy(z, y, smoothing=0.1, form="optax")


@pytest.mark.parametrize("fn", BAD_INPUT_FNS[:2] + BAD_INPUT_FNS[4:])
def test_bad_values_under_jit_poison_only_their_rows(fn):
    logits = jnp.zeros((3, 4)).at[2, 0].set(jnp.nan)
    labels = jnp.array([0, 7, 1])
    out = np.asarray(jax.jit(fn)(logits, labels))
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


@pytest.mark.parametrize("fn", [losses.mmce, losses.mmce_weighted])
def test_batch_losses_under_jit_are_nan_on_bad_values(fn):
    assert np.isnan(float(jax.jit(fn)(jnp.zeros((3, 4)), jnp.array([0, 9, 1]))))
