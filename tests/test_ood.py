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


def tied_logits_pair(n_in=300, n_out=500, seed=3):
    """Test and OOD logits drawn from 30 rows (the first 20 for the test set, the last 20 for
    the OOD set): many examples share a score, across the two sets and within each. (Exact
    copies: rows equal only up to a permutation can differ in their scores' last bit.)"""
    z_in, z_out = logits_pair(20, 10, c=4, seed=seed)
    rows = np.concatenate([z_in, z_out])
    rng = np.random.default_rng(seed)
    return rows[rng.integers(0, 20, n_in)], rows[rng.integers(10, 30, n_out)]


def test_bootstrap_aurocs_are_the_aurocs_of_the_gathered_resamples():
    """The counted resamples (one sort) equal resampling the logits and sorting each: the same
    test / OOD indices (a grouped bootstrap's), the same AUROCs to float32 rounding, ties
    included; the chunking changes nothing; the full-data value is aurocs'."""
    from calib_jax import bootstrap
    z_in, z_out = tied_logits_pair()
    key = jax.random.key(7)
    counted = ood.bootstrap_aurocs(z_in, z_out, key=key, num_resamples=40, chunk_size=16)
    gathered = bootstrap.bootstrap(ood.aurocs, z_in, z_out, key=key, num_resamples=40,
                                   groups=(0, 1))
    index_in = np.asarray(bootstrap.resample_indices(key, len(z_in), 40))
    index_out = np.asarray(bootstrap.resample_indices(key, len(z_out), 40, group=1))
    want = [ref.auroc(ref.entropy(z_out[o]), ref.entropy(z_in[i]))
            for i, o in zip(index_in, index_out)]
    for score in ood.SCORES:
        np.testing.assert_allclose(counted.samples[score], gathered.samples[score], atol=1e-6)
        np.testing.assert_allclose(counted.value[score], ood.aurocs(z_in, z_out)[score],
                                   atol=1e-6)
        np.testing.assert_allclose(counted.low[score], gathered.low[score], atol=1e-6)
        assert float(counted.std[score]) > 0.005  # a real spread, not a constant
    np.testing.assert_allclose(counted.samples["entropy"], want, atol=1e-5)
    assert len(set(np.asarray(ood.entropy(np.concatenate([z_in, z_out]))))) == 30  # ties
    again = ood.bootstrap_aurocs(z_in, z_out, key=key, num_resamples=40, chunk_size=40)
    np.testing.assert_allclose(again.samples["confidence"], counted.samples["confidence"],
                               atol=1e-7)


_POOL = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32) * 2


@jax.jit
def _counted_aurocs(z_in, z_out, in_counts, out_counts):
    return ood.aurocs_from_counts(ood.ranked_scores(z_in, z_out), in_counts, out_counts)


@given(st.integers(0, 10000), st.sampled_from([1, 12]), st.sampled_from([1, 9]))
def test_property_aurocs_from_counts_equal_aurocs_of_the_repeated_examples(seed, n_in, n_out):
    """Any multiplicities (zeros included, at least one example kept per set): the AUROCs of
    the examples repeated that many times (NumPy, pairwise). The examples are copies of six
    rows, so scores tie within and across the sets."""
    rng = np.random.default_rng(seed)
    z_in, z_out = _POOL[rng.integers(0, 6, n_in)], _POOL[rng.integers(0, 6, n_out)]
    in_counts, out_counts = rng.integers(0, 4, n_in), rng.integers(0, 4, n_out)
    in_counts[rng.integers(n_in)] += 1
    out_counts[rng.integers(n_out)] += 1
    got = _counted_aurocs(z_in, z_out, jnp.asarray(in_counts, jnp.int32),
                          jnp.asarray(out_counts, jnp.int32))
    repeated_in, repeated_out = np.repeat(z_in, in_counts, 0), np.repeat(z_out, out_counts, 0)
    want = {"entropy": ref.auroc(ref.entropy(repeated_out), ref.entropy(repeated_in)),
            "confidence": ref.auroc(ref.softmax64(repeated_in).max(1),
                                    ref.softmax64(repeated_out).max(1))}
    for score in ood.SCORES:
        np.testing.assert_allclose(float(got[score]), want[score], atol=1e-6)


def test_counted_aurocs_bad_inputs_and_nan_scores():
    z = jnp.zeros((3, 4)).at[:, 0].set(2.0)
    with pytest.raises(ValueError, match="same number of classes"):
        ood.bootstrap_aurocs(z, jnp.zeros((3, 5)), key=jax.random.key(0), num_resamples=5)
    with pytest.raises(ValueError, match="`out_logits` contains"):
        ood.ranked_scores(z, z.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="`num_resamples` must be an int >= 2"):
        ood.bootstrap_aurocs(z, z, key=jax.random.key(0), num_resamples=1)
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        ood.bootstrap_aurocs(z, z, key=0)
    ranked, ones = ood.ranked_scores(z, z), jnp.ones(3, jnp.int32)
    with pytest.raises(ValueError, match=r"`out_counts` must be integers of shape \[N\]"):
        ood.aurocs_from_counts(ranked, ones, ones.astype(jnp.float32))
    with pytest.raises(ValueError, match="`in_counts` must be >= 0, got a minimum of -1"):
        ood.aurocs_from_counts(ranked, ones.at[1].set(-1), ones)
    with pytest.raises(ValueError, match=r"one multiplicity per test and OOD example of "
                                         r"`ranked` \(6 together\), got 3 and 2"):
        ood.aurocs_from_counts(ranked, ones, ones[:2])
    # Traced (no eager check), a NaN row gives NaN AUROCs, as auroc does.
    nan = jax.jit(lambda a, b: ood.aurocs_from_counts(ood.ranked_scores(a, b), ones, ones))(
        z, z.at[0, 0].set(jnp.nan))
    assert all(np.isnan(float(v)) for v in nan.values())
