"""calib_jax.bootstrap: resampled metrics equal the metric on the drawn indices, intervals
equal NumPy's quantiles, paired resampling, chunking, coverage of a known mean, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numpy_reference as ref
from calib_jax import bootstrap, metrics, ood


def data(n=60, c=4, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(scale * rng.standard_normal((n, c)), jnp.float32),
            jnp.asarray(rng.integers(0, c, n)))


def test_each_resample_is_the_metric_on_its_indices_and_the_ends_are_numpys_quantiles():
    logits, labels = data()
    key = jax.random.key(3)
    result = bootstrap.bootstrap(metrics.ece, logits, labels, key=key, num_resamples=50)
    indices = np.asarray(bootstrap.resample_indices(key, 60, 50))
    assert indices.shape == (50, 60) and indices.min() >= 0 and indices.max() < 60
    # Resamples differ from each other and repeat examples (drawn with replacement).
    assert len({tuple(i) for i in indices}) == 50 and len(set(indices[0])) < 60
    def ece(z, y):
        return ref.ece_mce(z, y)[0]

    want = np.array([ece(np.asarray(logits)[i], np.asarray(labels)[i]) for i in indices])
    np.testing.assert_allclose(result.samples, want, atol=2e-6)
    np.testing.assert_allclose(result.value, ece(np.asarray(logits), np.asarray(labels)),
                               atol=2e-6)
    low, high = np.quantile(np.asarray(result.samples, np.float64), [0.025, 0.975])
    np.testing.assert_allclose([result.low, result.high], [low, high], atol=1e-6)
    np.testing.assert_allclose(result.std, np.std(np.asarray(result.samples, np.float64),
                                                  ddof=1), rtol=1e-5)
    basic = bootstrap.bootstrap(metrics.ece, logits, labels, key=key, num_resamples=50,
                                method="basic")
    np.testing.assert_allclose([basic.low, basic.high],
                               [2 * result.value - high, 2 * result.value - low], atol=1e-6)
    np.testing.assert_array_equal(basic.samples, result.samples)


def test_the_chunk_size_and_a_raw_key_change_nothing():
    logits, labels = data()
    results = [bootstrap.bootstrap(metrics.nll, logits, labels, key=jax.random.key(5),
                                   num_resamples=23, chunk_size=chunk) for chunk in (1, 7, 64)]
    for other in results[1:]:
        np.testing.assert_allclose(other.samples, results[0].samples, rtol=1e-6)
    raw = bootstrap.bootstrap(metrics.nll, logits, labels, key=jax.random.PRNGKey(5),
                              num_resamples=23)
    np.testing.assert_allclose(raw.samples, results[0].samples, rtol=1e-6)
    other_key = bootstrap.bootstrap(metrics.nll, logits, labels, key=jax.random.key(6),
                                    num_resamples=23)
    assert not np.allclose(other_key.samples, results[0].samples)


def test_a_pytree_metric_and_paired_arrays():
    logits, labels = data()
    key = jax.random.key(1)
    result = bootstrap.bootstrap(metrics.summary, logits, labels, key=key, num_resamples=20)
    assert set(result.value) == set(result.low) == set(result.std) == set(metrics.summary(
        logits, labels))
    assert result.samples["ece"].shape == (20,)
    one = bootstrap.bootstrap(metrics.adaptive_ece, logits, labels, key=key, num_resamples=20)
    np.testing.assert_allclose(result.samples["adaptive_ece"], one.samples, atol=1e-6)

    # Two models resampled with the same indices: the difference of a model with itself is
    # exactly 0 on every resample, and a paired difference is each resample's difference.
    def gap(a, b, y):
        return metrics.ece(a, y) - metrics.ece(b, y)

    same = bootstrap.bootstrap(gap, logits, logits, labels, key=key, num_resamples=20)
    np.testing.assert_array_equal(same.samples, np.zeros(20))
    scaled = bootstrap.bootstrap(gap, logits, 0.5 * logits, labels, key=key, num_resamples=20)
    full, half = (bootstrap.bootstrap(metrics.ece, z, labels, key=key, num_resamples=20)
                  for z in (logits, 0.5 * logits))
    np.testing.assert_allclose(scaled.samples, full.samples - half.samples, atol=1e-6)


def entropy_auroc(in_logits, out_logits):
    return ood.auroc(in_logits, out_logits, score="entropy")


def test_groups_resample_each_sample_on_its_own_and_group_0_as_without_groups():
    """Two samples of different sizes (test and OOD logits): each resample is the metric on
    each group's own drawn indices; group 0's indices are those of a bootstrap without groups,
    and the groups' indices differ."""
    test_logits, labels = data(n=40)
    out_logits, _ = data(n=25, seed=1, scale=1.0)
    key = jax.random.key(4)
    result = bootstrap.bootstrap(entropy_auroc, test_logits, out_logits, key=key,
                                 num_resamples=30, groups=(0, 1))
    index_in = np.asarray(bootstrap.resample_indices(key, 40, 30))
    index_out = np.asarray(bootstrap.resample_indices(key, 25, 30, group=1))
    assert index_out.shape == (30, 25) and index_out.max() < 25
    assert not np.array_equal(index_out, np.asarray(bootstrap.resample_indices(key, 25, 30)))
    z_in, z_out = np.asarray(test_logits, np.float64), np.asarray(out_logits, np.float64)
    want = [ref.auroc(ref.entropy(z_out[o]), ref.entropy(z_in[i]))
            for i, o in zip(index_in, index_out)]
    np.testing.assert_allclose(result.samples, want, atol=1e-5)
    assert result.value == pytest.approx(ref.auroc(ref.entropy(z_out), ref.entropy(z_in)),
                                         abs=1e-5)
    # Group 0 of a grouped bootstrap draws what an ungrouped one draws: the test set's own
    # metrics and its AUROC are resampled alike.
    alone = bootstrap.bootstrap(metrics.ece, test_logits, labels, key=key, num_resamples=30)
    grouped = bootstrap.bootstrap(lambda z, y, _: metrics.ece(z, y), test_logits, labels,
                                  out_logits, key=key, num_resamples=30, groups=(0, 0, 1))
    np.testing.assert_array_equal(alone.samples, grouped.samples)
    np.testing.assert_array_equal(
        bootstrap.bootstrap(metrics.ece, test_logits, labels, key=key, num_resamples=30,
                            groups=[0, 0]).samples, alone.samples)


def test_a_two_sample_auroc_interval_has_the_sampling_spread_and_covers():
    """Scores N(1, 1) (100 OOD) against N(0, 1) (150 in-distribution): AUROC = Phi(1 /
    sqrt 2) = 0.760. The bootstrap std matches the AUROC's sampling spread (4,000 simulated
    pairs of samples in NumPy: 0.0308) within 12 % (median over 60 pairs; measured 0.99),
    and 95 % intervals hold 0.760 about 95 % of the time (measured 54 of 60). Holding the
    OOD sample fixed (resampling the other alone) held it 41 times: this test fails on it."""
    true_auroc = 0.7602499389065233  # scipy.stats.norm.cdf(1 / np.sqrt(2))
    n_in, n_out, stds, held = 150, 100, [], 0
    rng = np.random.default_rng(12345)

    def numpy_auroc(negative, positive):
        below = np.sort(negative)
        return np.mean(np.searchsorted(below, positive, "left")
                       + np.searchsorted(below, positive, "right")) / 2 / len(negative)

    sampling_std = np.std([numpy_auroc(rng.standard_normal(n_in),
                                       rng.standard_normal(n_out) + 1.0)
                           for _ in range(4000)], ddof=1)

    def score_auroc(negative, positive):
        return ood.auroc_from_scores(positive, negative)

    for trial in range(60):
        rng = np.random.default_rng(500 + trial)
        negative = jnp.asarray(rng.standard_normal(n_in), jnp.float32)
        positive = jnp.asarray(rng.standard_normal(n_out) + 1.0, jnp.float32)
        r = bootstrap.bootstrap(score_auroc, negative, positive, key=jax.random.key(trial),
                                num_resamples=300, groups=(0, 1))
        stds.append(float(r.std))
        held += bool(r.low <= true_auroc <= r.high)
    assert 52 <= held <= 60, held
    assert 0.88 < np.median(stds) / sampling_std < 1.12, (np.median(stds), sampling_std)


def test_seed_and_resample_count_checks():
    assert jax.random.key_data(bootstrap.seed_key(7)).tolist() == \
        jax.random.key_data(jax.random.key(7)).tolist()
    for seed in (-1, 2 ** 32, 1.0, True, "3"):
        with pytest.raises(ValueError, match=r"`s` must be an int in \[0, 2\*\*32\)"):
            bootstrap.seed_key(seed, "s")
    bootstrap.check_seed(np.int64(2 ** 32 - 1))
    bootstrap.check_num_resamples(2)
    bootstrap.check_num_resamples(0, zero_allowed=True)
    for value in (0, 1, -3, 2.0, True):
        with pytest.raises(ValueError, match="`n` must be an int >= 2 \\(1000 is customary"):
            bootstrap.check_num_resamples(value, "n")
    with pytest.raises(ValueError, match=r"`n` must be 0 \(no intervals\) or an int >= 2"):
        bootstrap.check_num_resamples(1, "n", zero_allowed=True)
    with pytest.raises(ValueError, match="`group` must be an int >= 0"):
        bootstrap.resample_indices(jax.random.key(0), 5, 2, group=-1)


def test_interval_of_a_mean_covers_and_its_std_is_the_standard_error():
    """Accuracy of a classifier right with probability 0.7: the bootstrap standard error is
    sqrt(p (1 - p) / N) to within 15 %, and 95 % intervals over 60 independent test sets hold
    0.7 about 95 % of the time (a broken resampling, e.g. one index for all, would not)."""
    n, held, ratios = 400, 0, []
    for trial in range(60):
        rng = np.random.default_rng(100 + trial)
        labels = rng.integers(0, 2, n)
        right = rng.random(n) < 0.7
        predicted = np.where(right, labels, 1 - labels)
        logits = jnp.asarray(np.eye(2)[predicted] * 2.0, jnp.float32)
        r = bootstrap.bootstrap(metrics.accuracy, logits, jnp.asarray(labels),
                                key=jax.random.key(trial), num_resamples=300)
        held += bool(r.low <= 0.7 <= r.high)
        ratios.append(float(r.std) / np.sqrt(float(r.value) * (1 - float(r.value)) / n))
    assert 52 <= held <= 60, held
    assert 0.85 < np.median(ratios) < 1.15, np.median(ratios)


@given(confidence=st.floats(0.05, 0.99), seed=st.integers(0, 2 ** 31))
def test_property_the_interval_is_ordered_and_nests_by_confidence(confidence, seed):
    logits, labels = data(n=30, seed=seed % 1000)
    key = jax.random.key(seed)
    wide = bootstrap.bootstrap(metrics.nll, logits, labels, key=key, num_resamples=40,
                               confidence=max(confidence, 0.5))
    narrow_ends = bootstrap.interval(wide.value, wide.samples, confidence=confidence / 2)
    assert wide.low <= narrow_ends[0] <= narrow_ends[1] <= wide.high
    assert float(jnp.min(wide.samples)) <= wide.low and wide.high <= float(jnp.max(wide.samples))


def test_a_metric_undefined_on_some_resamples_warns_and_gives_nan_ends():
    logits, labels = data(n=6)

    def first_class_rate(z, y):  # NaN when a resample holds no example of class 0
        counted = (y == 0)
        return jnp.sum(counted * (jnp.argmax(z, -1) == 0)) / jnp.sum(counted)

    labels = jnp.array([0, 1, 2, 3, 1, 2])
    with pytest.warns(RuntimeWarning, match="NaN or infinite value"):
        result = bootstrap.bootstrap(first_class_rate, logits, labels, key=jax.random.key(0),
                                     num_resamples=50)
    assert np.isnan(result.low) and np.isnan(result.std) and np.isfinite(result.value)


@pytest.mark.parametrize("kwargs,args,error,match", [
    (dict(key=0), None, TypeError, "`key` must be a JAX PRNG key, e.g. jax.random.key"),
    (dict(key=jnp.zeros(3, jnp.uint32)), None, TypeError, "got dtype uint32 shape"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), None, ValueError, "a single key"),
    (dict(num_resamples=1), None, ValueError,
     r"`num_resamples` must be an int >= 2 \(1000 is customary\), got 1\."),
    (dict(num_resamples=10.0), None, ValueError, "`num_resamples`"),
    (dict(chunk_size=0), None, ValueError, "`chunk_size` must be a positive Python int"),
    (dict(confidence=95), None, ValueError, r"`confidence` must be a number in \(0, 1\)"),
    (dict(confidence=True), None, ValueError, "`confidence`"),
    (dict(method="bca"), None, ValueError, "`method` must be one of"),
    ({}, "short", ValueError, r"the arrays have \[60, 5\] examples"),
    ({}, "scalar", ValueError, r"`arrays\[1\]` is a scalar"),
    ({}, "none", TypeError, "at least one array"),
    # A tuple of the arrays instead of the arrays: refused, also where their lengths agree
    # (NumPy would read two [N] arrays as one [2, N] array: 2 examples, silently).
    ({}, "tuple", TypeError, r"`arrays\[0\]` is a tuple of 2 arrays; pass each array as an "
                             r"argument of its own"),
    ({}, "list", TypeError, r"`arrays\[0\]` is a list of 2 arrays"),
    ({}, "empty", ValueError, "the arrays are empty"),
    (dict(groups=(0,)), None, ValueError, "`groups` must give each of the 2 arrays"),
    (dict(groups=(0, -1)), None, ValueError, "`groups` must give each"),
    (dict(groups="01"), None, ValueError, "`groups` must give each"),
    (dict(groups=(0, 2)), None, ValueError, "`groups` must number the samples 0, 1, ... "),
    (dict(groups=(1, 1)), None, ValueError, "without gaps"),
    (dict(groups=(0, 1, 1)), "grouped", ValueError,
     r"the arrays of group 1 have \[60, 5\] examples .* need `groups=`"),
    (dict(groups=(0, 1)), "empty_group", ValueError, "the arrays of group 1 are empty"),
])
def test_bad_input_names_the_argument(kwargs, args, error, match):
    logits, labels = data()
    arrays = {None: (logits, labels), "short": (logits, labels[:5]),
              "scalar": (logits, jnp.float32(1.0)), "none": (),
              "tuple": ((logits, labels),), "list": ([labels, labels],),
              "empty": (logits[:0], labels[:0]), "grouped": (logits, logits, labels[:5]),
              "empty_group": (logits, logits[:0])}[args]
    options = {"key": jax.random.key(0), "num_resamples": 10, **kwargs}
    with pytest.raises(error, match=match):
        bootstrap.bootstrap(metrics.ece, *arrays, **options)


def test_bad_metric_fn_and_the_metrics_own_checks():
    logits, labels = data()
    with pytest.raises(TypeError, match="`metric_fn` must be a function"):
        bootstrap.bootstrap("ece", logits, labels, key=jax.random.key(0))
    # The full-data value is computed eagerly, so the metric's own checks run on it.
    with pytest.raises(ValueError, match="`labels` must lie in"):
        bootstrap.bootstrap(metrics.ece, logits, labels + 4, key=jax.random.key(0),
                            num_resamples=10)
    with pytest.raises(ValueError, match="`method` must be one of"):
        bootstrap.interval(jnp.float32(0.1), jnp.zeros(5), method="bca")


def _correct(logits, labels):
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def _accuracy_from_counts(correct, counts):
    return jnp.sum(correct * counts) / jnp.sum(counts)


def _nll_gap(test_logits, test_labels, out_logits):
    # Per-example NLL of the test set and max log-probability of the other sample.
    nll = -jnp.take_along_axis(jax.nn.log_softmax(test_logits), test_labels[:, None], 1)[:, 0]
    return nll, jnp.max(jax.nn.log_softmax(out_logits), -1)


def _nll_gap_from_counts(per_example, test_counts, out_counts):
    nll, top = per_example
    return {"nll": jnp.sum(nll * test_counts) / jnp.sum(test_counts),
            "gap": jnp.sum(top * out_counts) / jnp.sum(out_counts)
            - jnp.sum(nll * test_counts) / jnp.sum(test_counts)}


def test_by_counts_draws_bootstraps_resamples_and_gives_its_metric():
    """bootstrap_by_counts counts the very indices bootstrap gathers: the same samples of the
    same metric (one group; two groups of different sizes, the arrays of group 0 paired),
    the counts summing to each group's size; the full-data value is the metric with unit
    counts."""
    logits, labels = data(n=50)
    key = jax.random.key(11)
    counted = bootstrap.bootstrap_by_counts(_correct, _accuracy_from_counts, logits, labels,
                                            key=key, num_resamples=25, chunk_size=7)
    gathered = bootstrap.bootstrap(metrics.accuracy, logits, labels, key=key,
                                   num_resamples=25)
    np.testing.assert_allclose(counted.samples, gathered.samples, atol=1e-6)
    assert float(counted.value) == pytest.approx(float(metrics.accuracy(logits, labels)))
    assert float(jnp.std(counted.samples)) > 0

    out_logits, _ = data(n=33, seed=2, scale=1.0)
    counted = bootstrap.bootstrap_by_counts(_nll_gap, _nll_gap_from_counts, logits, labels,
                                            out_logits, key=key, num_resamples=20,
                                            groups=(0, 0, 1))

    def nll_gap(z, y, o):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1)[:, 0]
        return {"nll": jnp.mean(nll), "gap": jnp.mean(jnp.max(jax.nn.log_softmax(o), -1))
                - jnp.mean(nll)}

    gathered = bootstrap.bootstrap(nll_gap, logits, labels, out_logits, key=key,
                                   num_resamples=20, groups=(0, 0, 1))
    for name in ("nll", "gap"):
        np.testing.assert_allclose(counted.samples[name], gathered.samples[name], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(counted.high[name], gathered.high[name], rtol=1e-5)


def test_by_counts_bad_input_and_nan_warning():
    logits, labels = data(n=8)
    with pytest.raises(TypeError, match="`prepare` must be a function"):
        bootstrap.bootstrap_by_counts(None, _accuracy_from_counts, logits, labels,
                                      key=jax.random.key(0))
    with pytest.raises(TypeError, match="`metric_from_counts` must be a function"):
        bootstrap.bootstrap_by_counts(_correct, "accuracy", logits, labels,
                                      key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"the arrays have \[8, 5\] examples"):
        bootstrap.bootstrap_by_counts(_correct, _accuracy_from_counts, logits, labels[:5],
                                      key=jax.random.key(0))
    with pytest.raises(ValueError, match="`groups` must number the samples"):
        bootstrap.bootstrap_by_counts(_correct, _accuracy_from_counts, logits, labels,
                                      key=jax.random.key(0), groups=(0, 2))

    def first_example_share(correct, counts):  # NaN where a resample misses example 0
        return jnp.where(counts[0] > 0, jnp.sum(correct * counts) / counts[0], jnp.nan)

    with pytest.warns(RuntimeWarning, match="`metric_from_counts` gave .* NaN or infinite"):
        result = bootstrap.bootstrap_by_counts(
            _correct, first_example_share, logits, jnp.argmax(logits, -1),
            key=jax.random.key(0), num_resamples=30)
    assert np.isnan(result.low) and np.isfinite(result.value)
