"""OOD scores and AUROC against brute force and scikit-learn's conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numpy_reference as ref
from calib_jax import ood


def logits_pair(n_in=200, n_out=150, c=10, seed=0):
    rng = np.random.default_rng(seed)
    z_in = rng.standard_normal((n_in, c)) * 3
    z_in[np.arange(n_in), rng.integers(0, c, n_in)] += 4  # confident in-distribution
    z_out = rng.standard_normal((n_out, c)) * 0.7  # flat: uncertain
    return z_in.astype(np.float32), z_out.astype(np.float32)


def test_scores_match_numpy():
    z_in, _ = logits_pair()
    np.testing.assert_allclose(ood.entropy(z_in), ref.entropy(z_in), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ood.confidence(z_in), ref.softmax64(z_in).max(1), rtol=1e-6)
    # Underflowed probabilities contribute 0 entropy, not NaN.
    assert float(ood.entropy(jnp.array([[1e4, -1e4]]))[0]) == 0.0


@pytest.mark.parametrize("score", ["entropy", "confidence"])
def test_auroc_matches_brute_force_with_reference_orientation(score):
    z_in, z_out = logits_pair()
    got = float(ood.auroc(z_in, z_out, score=score))
    if score == "entropy":  # OOD is the positive class
        want = ref.auroc(ref.entropy(z_out), ref.entropy(z_in))
    else:  # in-distribution is the positive class
        want = ref.auroc(ref.softmax64(z_in).max(1), ref.softmax64(z_out).max(1))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got > 0.8


def test_auroc_ties_count_half_and_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    pos = np.array([0.5, 0.5, 0.9, 0.1], np.float32)
    neg = np.array([0.5, 0.1, 0.1], np.float32)
    got = float(ood.auroc_from_scores(pos, neg))
    want = sklearn.roc_auc_score(np.r_[np.ones(4), np.zeros(3)], np.r_[pos, neg])
    assert got == pytest.approx(want, abs=1e-7)
    assert float(ood.auroc_from_scores(np.ones(3, np.float32), np.ones(5, np.float32))) == 0.5


def test_roc_curve_matches_sklearn_and_integrates_to_auroc():
    z_in, z_out = logits_pair(seed=1)
    curve = ood.roc_curve(z_in, z_out, score="entropy")
    assert curve.fpr[0] == 0 and curve.tpr[0] == 0 and curve.fpr[-1] == 1 and curve.tpr[-1] == 1
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    np.testing.assert_allclose(np.trapezoid(curve.tpr, curve.fpr),
                               float(ood.auroc(z_in, z_out)), atol=1e-6)
    sklearn = pytest.importorskip("sklearn.metrics")
    pos, neg = np.asarray(ood.entropy(z_out)), np.asarray(ood.entropy(z_in))
    fpr, tpr, _ = sklearn.roc_curve(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg],
                                    drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)


def test_jit_vmap():
    z_in, z_out = logits_pair(n_in=64, n_out=64)
    f = jax.jit(lambda a, b: ood.auroc(a, b))
    np.testing.assert_allclose(float(f(z_in, z_out)), float(ood.auroc(z_in, z_out)), atol=1e-7)
    temps = jnp.array([0.5, 1.0, 2.0])
    batched = jax.vmap(lambda t: ood.auroc(z_in / t, z_out / t))(temps)
    looped = [float(ood.auroc(z_in / t, z_out / t)) for t in temps]
    np.testing.assert_allclose(batched, looped, atol=1e-7)


@given(st.integers(0, 10000), st.sampled_from([3, 17]), st.sampled_from([2, 9]))
def test_property_auroc_equals_pairwise_count(seed, n_pos, n_neg):
    rng = np.random.default_rng(seed)
    # Few distinct values, so that ties are common.
    pos = rng.integers(0, 4, n_pos).astype(np.float32)
    neg = rng.integers(0, 4, n_neg).astype(np.float32)
    got = float(ood.auroc_from_scores(pos, neg))
    np.testing.assert_allclose(got, ref.auroc(pos, neg), atol=1e-6)
    np.testing.assert_allclose(float(ood.auroc_from_scores(neg, pos)), 1 - got, atol=1e-6)


def test_bad_inputs():
    z = jnp.zeros((3, 4)).at[:, 0].set(2.0)
    with pytest.raises(ValueError, match="`score`"):
        ood.auroc(z, z, score="energy")
    with pytest.raises(ValueError, match="same number of classes"):
        ood.auroc(z, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="`out_logits` contains"):
        ood.auroc(z, z.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="`in_logits` is empty"):
        ood.auroc(jnp.zeros((0, 4)), z)
    with pytest.raises(ValueError, match="`positive_scores`"):
        ood.auroc_from_scores(jnp.zeros((2, 2)), jnp.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        ood.auroc_from_scores(jnp.array([jnp.nan]), jnp.zeros(2))
    with pytest.warns(UserWarning, match="probabilities"):
        ood.entropy(jnp.full((2, 4), 0.25))
    assert np.isnan(float(jax.jit(ood.auroc)(z, z.at[0, 0].set(jnp.nan))))
