"""calib_jax.metrics against float64 NumPy oracles, conventions, streaming, properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numpy_reference as ref
from calib_jax import bootstrap, metrics


def random_problem(n=500, c=10, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, c))).astype(np.float32)
    # Make the classifier better than chance so that bins are populated both ways.
    labels = np.where(rng.random(n) < 0.6, logits.argmax(1), rng.integers(0, c, n)).astype(np.int32)
    return logits, labels


@pytest.mark.parametrize("seed,c", [(0, 10), (1, 2), (2, 100)])
def test_reference_metrics_match_numpy(seed, c):
    logits, labels = random_problem(n=400, c=c, seed=seed)
    want_ece, want_mce = ref.ece_mce(logits, labels)
    np.testing.assert_allclose(float(metrics.ece(logits, labels)), want_ece, atol=1e-6)
    np.testing.assert_allclose(float(metrics.mce(logits, labels)), want_mce, atol=1e-6)
    np.testing.assert_allclose(float(metrics.adaptive_ece(logits, labels)),
                               ref.adaptive_ece(logits, labels), atol=1e-6)
    np.testing.assert_allclose(float(metrics.classwise_ece(logits, labels)),
                               ref.classwise_ece(logits, labels), atol=1e-6)
    np.testing.assert_allclose(float(metrics.nll(logits, labels)), ref.nll(logits, labels),
                               rtol=1e-6)
    np.testing.assert_allclose(float(metrics.accuracy(logits, labels)),
                               ref.accuracy(logits, labels), rtol=1e-7)
    np.testing.assert_allclose(float(metrics.brier(logits, labels)),
                               ref.brier(logits, labels).mean(), rtol=1e-5)


def test_clean_convention_uses_k_over_b_edges():
    logits, labels = random_problem(seed=3)
    edges = np.arange(16) / 15
    want, _ = ref.ece_mce(logits, labels, edges=edges.astype(np.float32))
    np.testing.assert_allclose(float(metrics.ece(logits, labels, convention="clean")), want,
                               atol=1e-6)


def test_reference_edges_are_torch_linspace():
    np.testing.assert_array_equal(metrics.bin_edges(15), ref.EDGES_15)
    # Not float32(k/15) at several places.
    assert np.sum(metrics.bin_edges(15) != (np.arange(16) / 15).astype(np.float32)) >= 3
    # Values produced by torch.linspace(0, 1, B + 1) (torch 2.13, CPU), spot checks.
    assert metrics.bin_edges(10)[3] == np.float32(0.30000001192092896)
    assert metrics.bin_edges(20).tolist()[7] == 0.3499999940395355
    for b in (1, 2, 7, 10, 20, 100):
        e = metrics.bin_edges(b)
        assert e[0] == 0.0 and e[-1] == 1.0 and np.all(np.diff(e) > 0)
        assert np.max(np.abs(e - np.arange(b + 1) / b)) < 1e-6


def test_bin_membership_at_exact_edges():
    edges = jnp.asarray(metrics.bin_edges(15))
    values = jnp.concatenate([edges, jnp.array([np.nextafter(edges[3], 1.0)])])
    ref_idx = np.asarray(metrics._bin_index(values, edges, "reference"))
    # (lo, hi]: 0 is in no bin, edge k (k >= 1) belongs to bin k - 1, 1.0 to the last bin.
    assert ref_idx.tolist() == [-1] + list(range(15)) + [3]
    clean_idx = np.asarray(metrics._bin_index(values, edges, "clean"))
    assert clean_idx.tolist() == [0] + list(range(15)) + [3]


def test_confidence_one_and_underflowed_probabilities():
    # Row 0: softmax is exactly [1, 0] in float32 -> conf 1 in the last bin,
    # and class 1's probability 0 is in no bin for classwise ECE.
    logits = np.array([[200.0, 0.0], [0.0, 0.3], [0.5, 0.0]], np.float32)
    labels = np.array([0, 1, 0], np.int32)
    bins = metrics.reliability_bins(logits, labels)
    assert int(bins.count[-1]) == 1 and int(bins.count.sum()) == 3
    np.testing.assert_allclose(float(metrics.classwise_ece(logits, labels)),
                               ref.classwise_ece(logits, labels), atol=1e-7)
    clean = float(metrics.classwise_ece(logits, labels, convention="clean"))
    assert clean >= 0


def test_adaptive_ece_min_confidence_in_no_bin_and_ties():
    # Duplicated rows give tied confidences; the minimum's copies are all in no bin.
    logits = np.repeat(np.array([[0.1, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32),
                       [3, 2, 2, 1], axis=0)
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0], np.int32)
    got = float(metrics.adaptive_ece(logits, labels))
    np.testing.assert_allclose(got, ref.adaptive_ece(logits, labels), atol=1e-7)
    bins = metrics.reliability_bins(logits, labels, adaptive=True)
    assert int(bins.count.sum()) == 5  # the 3 minimum-confidence rows are unbinned
    clean = metrics.reliability_bins(logits, labels, adaptive=True, convention="clean")
    assert int(clean.count.sum()) == 8
    np.testing.assert_allclose(float(bins.edges[0]), float(jax.nn.softmax(logits[0])[0]))


def test_adaptive_edges_match_numpy_interp():
    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 15, 16, 100, 1001):
        conf = rng.random(n).astype(np.float32)
        want = np.interp(np.linspace(0, n, 16), np.arange(n), np.sort(conf.astype(np.float64)))
        got = np.asarray(metrics.adaptive_bin_edges(jnp.asarray(conf)))
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=2e-7, atol=0)


def test_classwise_reference_k_drops_trailing_absent_classes():
    logits, labels = random_problem(n=300, c=6, seed=6)
    labels = np.minimum(labels, 3)  # classes 4 and 5 never occur as labels
    ref_value = float(metrics.classwise_ece(logits, labels))
    np.testing.assert_allclose(ref_value, ref.classwise_ece(logits, labels), atol=1e-6)
    clean = float(metrics.classwise_ece(logits, labels, convention="clean"))
    assert not np.isclose(ref_value, clean)


def test_edge_cases_single_sample_and_two_classes():
    logits = np.array([[0.3, -0.2]], np.float32)
    for y in (0, 1):
        labels = np.array([y], np.int32)
        np.testing.assert_allclose(float(metrics.ece(logits, labels)),
                                   ref.ece_mce(logits, labels)[0], atol=1e-7)
        # One sample: AdaECE edges are all that sample's confidence; it is in no bin.
        assert float(metrics.adaptive_ece(logits, labels)) == 0.0
        np.testing.assert_allclose(float(metrics.classwise_ece(logits, labels)),
                                   ref.classwise_ece(logits, labels), atol=1e-7)


def test_reliability_bins_agree_with_ece():
    logits, labels = random_problem(seed=7)
    bins = metrics.reliability_bins(logits, labels)
    nonempty = np.asarray(bins.count) > 0
    gaps = np.abs(np.asarray(bins.mean_confidence) - np.asarray(bins.accuracy))[nonempty]
    weights = np.asarray(bins.count)[nonempty] / 500
    np.testing.assert_allclose(np.sum(gaps * weights), float(metrics.ece(logits, labels)),
                               atol=1e-6)
    assert np.all(np.isnan(np.asarray(bins.accuracy)[~nonempty]))


def test_jit_and_vmap_over_leading_axis():
    logits, labels = random_problem(n=200, seed=8)
    stack = jnp.stack([logits, 2 * logits, 0.5 * logits])
    for fn in (metrics.ece, metrics.adaptive_ece, metrics.classwise_ece, metrics.mce,
               metrics.nll):
        batched = jax.vmap(fn, in_axes=(0, None))(stack, labels)
        looped = [fn(x, labels) for x in stack]
        np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(jax.jit(fn)(logits, labels), fn(logits, labels), rtol=1e-6)


def test_bfloat16_logits_are_promoted():
    logits, labels = random_problem(seed=9)
    lo = jnp.asarray(logits, jnp.bfloat16)
    np.testing.assert_allclose(float(metrics.ece(lo, labels)),
                               float(metrics.ece(lo.astype(jnp.float32), labels)), atol=1e-7)


# ---------------------------------------------------------------- streaming


def test_streamed_stats_equal_whole_array_metrics():
    logits, labels = random_problem(n=1000, c=10, seed=10)
    stats = metrics.init_stats(10)
    for start in range(0, 1000, 128):  # last batch is padded + masked, like eval batches
        z, y = logits[start:start + 128], labels[start:start + 128]
        pad = 128 - len(y)
        mask = np.r_[np.ones(len(y), bool), np.zeros(pad, bool)]
        z = np.concatenate([z, np.full((pad, 10), np.nan, np.float32)])
        y = np.concatenate([y, np.full(pad, 99, np.int32)])
        stats = metrics.update_stats(stats, jnp.asarray(z), jnp.asarray(y), mask=jnp.asarray(mask))
    got = metrics.metrics_from_stats(stats)
    assert int(got["num_samples"]) == 1000
    for name, fn in [("ece", metrics.ece), ("mce", metrics.mce),
                     ("classwise_ece", metrics.classwise_ece), ("nll", metrics.nll),
                     ("accuracy", metrics.accuracy), ("brier", metrics.brier)]:
        np.testing.assert_allclose(float(got[name]), float(fn(logits, labels)), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    whole = metrics.update_stats(metrics.init_stats(10), logits, labels)
    np.testing.assert_array_equal(whole.count, stats.count)
    np.testing.assert_array_equal(whole.class_count, stats.class_count)


def test_streamed_adaptive_ece_two_pass():
    logits, labels = random_problem(n=600, c=5, seed=11)
    conf = jnp.concatenate([metrics.top_label_confidence(logits[i:i + 200])
                            for i in range(0, 600, 200)])
    edges = metrics.adaptive_bin_edges(conf)
    stats = metrics.init_stats(5, edges=edges)
    for i in range(0, 600, 200):
        stats = metrics.update_stats(stats, logits[i:i + 200], labels[i:i + 200])
    np.testing.assert_allclose(float(metrics.metrics_from_stats(stats)["ece"]),
                               float(metrics.adaptive_ece(logits, labels)), atol=1e-6)


def test_merge_refuses_stats_that_do_not_add_up_and_empty_stats_give_nan():
    logits, labels = random_problem(n=40, c=4, seed=3)
    stats = metrics.update_stats(metrics.init_stats(4), logits, labels)
    for other in (metrics.init_stats(3), metrics.init_stats(4, num_bins=10)):
        with pytest.raises(ValueError, match="same num_classes and num_bins"):
            metrics.merge_stats(stats, other)
    conf = metrics.top_label_confidence(logits)
    own_edges = metrics.init_stats(4, edges=metrics.adaptive_bin_edges(conf))
    with pytest.raises(ValueError, match="different top-label edges"):  # was merged silently
        metrics.merge_stats(stats, own_edges)
    traced = jax.jit(lambda a, b: metrics.metrics_from_stats(metrics.merge_stats(a, b)))
    merged = traced(stats, own_edges)
    assert np.isnan(merged["ece"]) and np.isnan(merged["mce"])
    assert float(merged["nll"]) == float(metrics.metrics_from_stats(stats)["nll"])
    assert float(traced(stats, stats)["ece"]) >= 0  # same edges: a number
    empty = metrics.metrics_from_stats(metrics.init_stats(4))  # was ECE 0, accuracy 0
    assert int(empty["num_samples"]) == 0
    assert all(np.isnan(v) for k, v in empty.items() if k != "num_samples")
    for bad in (0, 1, -3, 2.0, True, "4"):  # 0 gave stats no logits fit; -3 a shape error
        with pytest.raises(ValueError, match=r"`num_classes` must be a Python int >= 2"):
            metrics.init_stats(bad)


def test_merge_and_psum_stats_across_devices():
    from jax.sharding import PartitionSpec as P
    logits, labels = random_problem(n=64, c=4, seed=12)
    halves = [metrics.update_stats(metrics.init_stats(4), logits[i::2], labels[i::2])
              for i in range(2)]
    merged = metrics.merge_stats(*halves)
    whole = metrics.update_stats(metrics.init_stats(4), logits, labels)
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.conf_sum, whole.conf_sum, rtol=1e-5)
    n_dev = len(jax.devices())
    assert n_dev >= 2, "conftest asks for several CPU devices"
    mesh = jax.make_mesh((n_dev,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, P("data"))

    def per_device(z, y):
        s = metrics.update_stats(metrics.init_stats(4), z, y)
        return metrics.psum_stats(s, "data")

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map
    z, y = jax.device_put(logits, sharding), jax.device_put(labels, sharding)
    summed = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=P()))(z, y)
    summed = jax.block_until_ready(summed)
    np.testing.assert_array_equal(summed.count, whole.count)
    np.testing.assert_array_equal(summed.class_count, whole.class_count)
    np.testing.assert_array_equal(summed.edges, whole.edges)
    got = metrics.metrics_from_stats(summed)
    np.testing.assert_allclose(float(got["ece"]), float(metrics.ece(logits, labels)), atol=1e-6)


def test_update_stats_rejects_mismatches():
    stats = metrics.init_stats(4)
    with pytest.raises(ValueError, match="initialised for 4"):
        metrics.update_stats(stats, jnp.zeros((2, 5)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="`mask`"):
        metrics.update_stats(stats, jnp.zeros((2, 4)), jnp.array([0, 1]), mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="`edges`"):
        metrics.init_stats(4, edges=jnp.zeros(5))


# ---------------------------------------------------------------- properties


# Few distinct shapes: every new shape is a new compilation.
problems = st.tuples(st.sampled_from([1, 7, 40]), st.sampled_from([2, 5]), st.floats(0.1, 8.0),
                     st.integers(0, 2 ** 16))


@given(problems)
def test_property_ece_family_in_unit_interval(p):
    n, c, scale, seed = p
    logits, labels = random_problem(n=n, c=c, scale=scale, seed=seed)
    for conv in metrics.CONVENTIONS:
        e = float(metrics.ece(logits, labels, convention=conv))
        m = float(metrics.mce(logits, labels, convention=conv))
        a = float(metrics.adaptive_ece(logits, labels, convention=conv))
        k = float(metrics.classwise_ece(logits, labels, convention=conv))
        assert 0 <= e <= 1 and 0 <= a <= 1 and 0 <= k <= 1
        assert e <= m + 1e-6 <= 1 + 1e-6


@given(problems, st.randoms(use_true_random=False))
def test_property_invariant_to_row_permutation(p, rnd):
    n, c, scale, seed = p
    logits, labels = random_problem(n=n, c=c, scale=scale, seed=seed)
    perm = list(range(n))
    rnd.shuffle(perm)
    for fn in (metrics.ece, metrics.adaptive_ece, metrics.classwise_ece, metrics.mce):
        np.testing.assert_allclose(float(fn(logits[perm], labels[perm])),
                                   float(fn(logits, labels)), atol=2e-6)


@given(problems, st.sampled_from([3, 16]))
def test_property_streamed_equals_whole(p, batch):
    n, c, scale, seed = p
    logits, labels = random_problem(n=n, c=c, scale=scale, seed=seed)
    stats = metrics.init_stats(c)
    for start in range(0, n, batch):  # fixed batch shape: pad and mask the tail
        z, y = logits[start:start + batch], labels[start:start + batch]
        mask = np.arange(batch) < len(y)
        z = np.pad(z, ((0, batch - len(y)), (0, 0)))
        y = np.pad(y, (0, batch - len(y)))
        stats = metrics.update_stats(stats, z, y, mask=mask)
    got = metrics.metrics_from_stats(stats)
    np.testing.assert_allclose(float(got["ece"]), float(metrics.ece(logits, labels)), atol=2e-6)
    np.testing.assert_allclose(float(got["classwise_ece"]),
                               float(metrics.classwise_ece(logits, labels)), atol=2e-6)
    np.testing.assert_allclose(float(got["mce"]), float(metrics.mce(logits, labels)), atol=2e-6)


@given(problems)
def test_property_matches_numpy_oracle(p):
    n, c, scale, seed = p
    logits, labels = random_problem(n=n, c=c, scale=scale, seed=seed)
    # Allow one sample's worth of disagreement where a confidence sits within an
    # ulp of an edge (float32 softmax vs float64-then-rounded).
    tol = 2.0 / n
    assert abs(float(metrics.ece(logits, labels)) - ref.ece_mce(logits, labels)[0]) <= tol
    assert abs(float(metrics.classwise_ece(logits, labels))
               - ref.classwise_ece(logits, labels)) <= tol
    assert abs(float(metrics.adaptive_ece(logits, labels)) - ref.adaptive_ece(logits, labels)) <= tol


# ---------------------------------------------------------------- monotonic sweep


def _top_label(logits, labels):
    conf = np.asarray(metrics.top_label_confidence(logits))
    hits = np.asarray(jnp.argmax(jax.nn.softmax(jnp.asarray(logits), -1), -1)) == \
        np.asarray(labels)
    return conf, hits


# Logits rounded to integers can be one-hot rows, which the input check rightly warns look like
# probabilities (hypothesis finds such draws at 100 examples per test).
rounded_logits_may_look_like_probabilities = pytest.mark.filterwarnings(
    "ignore:`logits` looks like probabilities:UserWarning")


@rounded_logits_may_look_like_probabilities
@given(problems, st.sampled_from([1.0, 2.0]), st.booleans())
def test_property_ece_sweep_is_the_brute_force_sweep(p, order, coarse):
    """Value and bin count equal Algorithm 1 run in NumPy on the same confidences, also with
    many tied confidences (logits rounded to integers)."""
    n, c, scale, seed = p
    logits, labels = random_problem(n=n, c=c, scale=scale, seed=seed)
    if coarse:
        logits = np.round(logits)
    want, bins = ref.ece_sweep(*_top_label(logits, labels), order=order)
    assert int(metrics.sweep_num_bins(logits, labels)) == bins
    np.testing.assert_allclose(float(metrics.ece_sweep(logits, labels, order=order)), want,
                               atol=2e-6)
    assert 0 <= want <= 1


def _two_class_problem(conf, hits):
    """Logits and labels of a two-class model with top-label confidences ``conf`` (> 0.5)
    whose predictions (class 0) are right where ``hits``."""
    conf = np.asarray(conf, np.float64)
    logits = np.log(np.stack([conf, 1 - conf], 1)).astype(np.float32)
    return logits, np.where(hits, 0, 1).astype(np.int32)


@given(st.sampled_from([9, 70, 300, 700]), st.sampled_from(["wrong", "right"]),
       st.integers(0, 40), st.sampled_from(["extreme", "anywhere"]), st.integers(0, 2 ** 16))
def test_property_ece_sweep_of_a_few_exceptions_is_the_brute_force_sweep(n, minority, count,
                                                                         where, seed):
    """The sweep's stages (checks of every bin pair while the count of bins is small, of the
    pairs around the minority's examples after; 16, 256, then N bins) give Algorithm 1's b*
    where it is large: a few wrong predictions among the least confident (or a few right ones
    among the most confident), which keep the accuracies in order up to hundreds of bins, or
    the exceptions anywhere. Sizes past several stages; bit-equal values to the brute force's
    within float32 rounding."""
    rng = np.random.default_rng(seed)
    conf = np.sort(rng.uniform(0.5, 1.0, n))
    count = min(count, n)
    if where == "extreme":  # near the low end for wrong ones, the high end for right ones
        ranks = np.minimum(rng.geometric(0.2, count) - 1, n - 1)
        at = ranks if minority == "wrong" else n - 1 - ranks
    else:
        at = rng.integers(0, n, count)
    hits = np.full(n, minority == "wrong")
    hits[at] = minority != "wrong"
    logits, labels = _two_class_problem(conf, hits)
    want, bins = ref.ece_sweep(*_top_label(logits, labels))
    value, num_bins = metrics.ece_sweep(logits, labels, return_num_bins=True)
    assert int(num_bins) == bins
    np.testing.assert_allclose(float(value), want, atol=2e-6)


def test_ece_sweep_counts_of_bins_past_the_first_stages():
    # Every prediction right but a few (or wrong but a few right ones): Algorithm 1 (the
    # brute force) settles on counts of bins in each of the sweep's stages (16, 256, 4096,
    # then N), through both of its checks (every pair of bins; the pairs around the minority's
    # examples, once they fit a stage) and its shortcut (wrong ones all below the right ones).
    lowest_16 = list(range(16))
    for n, right, exceptions, b_star in [
            (700, True, [699], 1), (700, True, [20], 34), (700, True, [10], 69),
            (700, True, [5], 139), (700, True, [2], 349), (700, True, [4, 5], 174),
            (700, True, [0, 1, 2], 700), (700, False, [697], 233),
            (700, False, [690, 699], 140),
            # 17 wrong, one more than the first stage holds: every pair in the later stages
            (700, True, lowest_16 + [20], 173), (700, True, lowest_16 + [17], 691),
            # 300 wrong: every pair of up to 714 bins, in the third stage
            (5000, True, list(range(299)) + [308], 714)]:
        conf = np.linspace(0.51, 0.99, n)
        hits = np.full(n, right)
        hits[exceptions] = not right
        logits, labels = _two_class_problem(conf, hits)
        want, bins = ref.ece_sweep(*_top_label(logits, labels))
        assert bins == b_star and int(metrics.sweep_num_bins(logits, labels)) == b_star, exceptions
        np.testing.assert_allclose(float(metrics.ece_sweep(logits, labels)), want, atol=2e-6)


def test_ece_sweep_compares_the_accuracies_exactly():
    # 10,001 examples, one wrong in each half: at two bins the accuracies are 5000/5001 >
    # 4999/5000, which float32 rounds to one value; Algorithm 1 (float64 here) stops at one
    # bin, and so must the sweep.
    conf = np.linspace(0.51, 0.99, 10_001)
    hits = np.ones(10_001, bool)
    hits[[100, 7000]] = False
    assert np.float32(5000) / np.float32(5001) == np.float32(4999) / np.float32(5000)
    logits, labels = _two_class_problem(conf, hits)
    want, bins = ref.ece_sweep(*_top_label(logits, labels))
    assert bins == 1 and int(metrics.sweep_num_bins(logits, labels)) == 1
    np.testing.assert_allclose(float(metrics.ece_sweep(logits, labels)), want, atol=2e-6)


def test_ece_sweep_at_its_extremes():
    # Accuracy rising with confidence at every example: one bin per example, the mean gap.
    conf = np.array([0.55, 0.6, 0.7, 0.8, 0.9, 0.95])
    logits = np.log(np.stack([conf, 1 - conf], 1)).astype(np.float32)
    labels = np.array([1, 1, 0, 0, 0, 0])  # wrong below 0.7, right from there
    assert int(metrics.sweep_num_bins(logits, labels)) == 6
    np.testing.assert_allclose(float(metrics.ece_sweep(logits, labels)),
                               np.mean(np.abs(conf - (labels == 0))), atol=1e-6)
    # The most confident example wrong: two bins already fall; one bin, |mean conf - acc|.
    labels = np.array([0, 0, 0, 0, 0, 1])
    assert int(metrics.sweep_num_bins(logits, labels)) == 1
    np.testing.assert_allclose(float(metrics.ece_sweep(logits, labels)),
                               abs(conf.mean() - 5 / 6), atol=1e-6)
    np.testing.assert_allclose(float(metrics.ece_sweep(logits, labels, order=2)),
                               abs(conf.mean() - 5 / 6), atol=1e-6)


def test_ece_sweep_is_less_biased_than_fixed_bins():
    """Simulated 10-class models whose true calibration error is known from 200,000
    examples: over 20 test sets of 1,000, the sweep's mean error from it is below 15-bin
    ECE's, for a calibrated and an over-confident model (measured: calibrated, ECE 3.61 %
    against 2.78 % for the sweep, population 0.26 %; x1.2, 6.68 % and 6.25 %, population
    5.96 %). A sweep that used too many bins (noise) or too few would not be."""
    def draw(n, seed):
        rng = np.random.default_rng(seed)
        z = 2 * rng.standard_normal((n, 10)).astype(np.float32)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = np.minimum((rng.random((n, 1)) > np.cumsum(p, 1)).sum(1), 9)
        return jnp.asarray(z), jnp.asarray(y)

    population = draw(200_000, 99)
    for scale in (1.0, 1.2):
        truth = float(metrics.ece(scale * population[0], population[1]))
        tests = [draw(1000, k) for k in range(20)]
        fixed = np.mean([float(metrics.ece(scale * z, y)) for z, y in tests]) - truth
        sweep = np.mean([float(metrics.ece_sweep(scale * z, y)) for z, y in tests]) - truth
        assert abs(sweep) < abs(fixed), (scale, sweep, fixed)


def test_ece_sweep_jits_vmaps_and_bootstraps():
    from calib_jax import bootstrap
    logits, labels = random_problem(n=40, c=5, scale=3.0, seed=1)
    scales = jnp.array([0.5, 1.0, 2.0])
    batched = jax.vmap(lambda s: metrics.ece_sweep(s * logits, labels))(scales)
    np.testing.assert_allclose(batched, [metrics.ece_sweep(s * logits, labels) for s in scales],
                               atol=1e-6)
    r = bootstrap.bootstrap(metrics.ece_sweep, logits, labels, key=jax.random.key(0),
                            num_resamples=20)
    assert r.samples.shape == (20,) and np.all(np.isfinite(r.samples))
    value, bins = metrics.ece_sweep(logits, labels, return_num_bins=True)
    assert value == metrics.ece_sweep(logits, labels)
    assert bins == metrics.sweep_num_bins(logits, labels)
    for order in (0.5, True, "2", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="`order` must be a finite number >= 1"):
            metrics.ece_sweep(logits, labels, order=order)


# ---------------------------------------------------------------- counted (bootstrap)


def _resample(logits, labels, index):
    index = np.asarray(index)
    return np.asarray(logits)[index], np.asarray(labels)[index]


# Two shapes only (each shape and convention compiles three programs, ~1.6 s).
counted_problems = st.tuples(st.sampled_from([1, 40]), st.just(5), st.floats(0.1, 8.0),
                             st.integers(0, 2 ** 16))


@rounded_logits_may_look_like_probabilities
@given(counted_problems, st.booleans(), st.sampled_from([1.0, 0.2]),
       st.sampled_from(metrics.CONVENTIONS))
def test_property_counted_summary_is_the_summary_of_the_resample(p, coarse, spread, convention):
    """summary_from_counts of a resample's counts equals summary of the gathered resample,
    every metric, either convention: resamples that repeat a few examples many times
    (``spread`` 0.2) and leave most out, and tied confidences (logits rounded to
    integers), where AdaECE's edges land on repeated values."""
    n, c, scale, seed = p
    logits, labels = random_problem(n=n, c=c, scale=scale, seed=seed)
    if coarse:
        logits = np.round(logits)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, max(1, int(spread * n)), n)
    counts = np.bincount(index, minlength=n).astype(np.int32)
    context = metrics.summary_context(logits, labels, convention=convention)
    got = metrics.summary_from_counts(context, counts)
    want = metrics.summary(*_resample(logits, labels, np.sort(index)), convention=convention)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=2e-6, atol=2e-6,
                                   err_msg=name)


def test_counted_summary_of_any_multiset_and_of_all_ones():
    """Counts that do not sum to N (a multiset of another size, AdaECE's edges at its own
    quantiles), unit counts (summary itself), another bin count, zero counts (NaN)."""
    logits, labels = random_problem(n=40, c=5, seed=3)  # the property's shape: its programs
    counts = np.zeros(40, np.int32)
    counts[[0, 5, 9, 30, 39]] = [4, 1, 7, 2, 3]
    for options in ({}, {"num_bins": 10, "convention": "clean"}):
        context = metrics.summary_context(logits, labels, **options)
        got = metrics.summary_from_counts(context, counts)
        want = metrics.summary(*_resample(logits, labels, np.repeat(np.arange(40), counts)),
                               **options)
        ones = metrics.summary_from_counts(context, np.ones(40, np.int32))
        full = metrics.summary(logits, labels, **options)
        for name in want:
            np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=2e-6,
                                       atol=2e-6, err_msg=f"{name} {options}")
            np.testing.assert_allclose(float(ones[name]), float(full[name]), rtol=2e-6,
                                       atol=2e-6, err_msg=f"{name} {options}")
    assert all(np.isnan(float(v)) for v in
               metrics.summary_from_counts(context, np.zeros(40, np.int32)).values())


def test_bootstrap_summary_has_bootstraps_resamples_and_values():
    """The same resamples as bootstrap(summary) (group 0's indices), whatever the chunking;
    the highest class absent (classwise ECE's K from each resample's labels)."""
    logits, labels = random_problem(n=40, c=5, seed=4)
    labels = np.where(labels == 4, 0, labels).astype(np.int32)
    key = jax.random.key(5)
    counted = metrics.bootstrap_summary(logits, labels, key=key, num_resamples=12,
                                        chunk_size=5)
    gathered = bootstrap.bootstrap(metrics.summary, logits, labels, key=key, num_resamples=12)
    for name in gathered.value:
        np.testing.assert_allclose(counted.samples[name], gathered.samples[name], rtol=2e-6,
                                   atol=2e-6, err_msg=name)
        np.testing.assert_allclose(float(counted.value[name]), float(gathered.value[name]),
                                   rtol=2e-6, atol=2e-6)
    assert float(jnp.std(counted.samples["ece"])) > 0


def test_counted_summary_bad_rows_and_bad_input(monkeypatch):
    """Under jit a bad row makes NaN exactly the resamples that draw it; on concrete arrays
    summary_context raises as summary does; a set too large to count exactly is refused."""
    logits, labels = random_problem(n=40, c=5, seed=6)
    bad = jnp.asarray(logits).at[3, 1].set(jnp.nan)
    context = jax.jit(metrics.summary_context)(bad, labels)
    without, drawn = np.ones(40, np.int32), np.ones(40, np.int32)
    without[3] = 0
    clean = metrics.summary_from_counts(context, without)
    keep = np.arange(40) != 3
    want = metrics.summary(logits[keep], labels[keep])
    np.testing.assert_allclose(float(clean["ece"]), float(want["ece"]), atol=2e-6)
    assert np.isnan(float(metrics.summary_from_counts(context, drawn)["ece"]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.summary_context(bad, labels)
    with pytest.raises(ValueError, match="`num_bins`"):
        metrics.bootstrap_summary(logits, labels, key=jax.random.key(0), num_bins=0)
    with pytest.raises(TypeError, match="`context` must be a metrics.SummaryContext"):
        metrics.summary_from_counts({"order": None}, without)
    with pytest.raises(ValueError, match=r"`counts` must be integers of shape \(40,\)"):
        metrics.summary_from_counts(context, without[:5])
    with pytest.raises(ValueError, match="`counts` must be integers"):
        metrics.summary_from_counts(context, without.astype(np.float32))
    negative = without.copy()
    negative[5] = -1  # the bad row 3 not drawn: NaN for the negative count alone
    with pytest.raises(ValueError, match="`counts` must be >= 0 .* a minimum of -1"):
        metrics.summary_from_counts(context, negative)
    assert np.isnan(float(jax.jit(metrics.summary_from_counts)(context, negative)["ece"]))
    monkeypatch.setattr(metrics, "MAX_COUNTED_EXAMPLES", 10)
    with pytest.raises(ValueError, match="40 examples; counted metrics .* exact up to 10"):
        metrics.summary_context(logits, labels)


# ---------------------------------------------------------------- bad input

METRIC_FNS = [metrics.ece, metrics.mce, metrics.adaptive_ece, metrics.classwise_ece,
              metrics.nll, metrics.accuracy, metrics.brier, metrics.ece_sweep,
              metrics.reliability_bins, metrics.sweep_num_bins]


@pytest.mark.parametrize("fn", METRIC_FNS)
def test_metric_bad_inputs(fn):
    z = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="`labels` must lie"):
        fn(z, jnp.array([0, 1, 4]))
    with pytest.raises(TypeError, match="integer"):
        fn(z, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[num_examples, num_classes\]"):
        fn(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="empty"):
        fn(jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(z.at[0, 0].set(jnp.inf), jnp.array([0, 1, 2]))
    with pytest.warns(UserWarning, match="probabilities"):
        fn(jnp.full((3, 4), 0.25), jnp.array([0, 1, 2]))


@pytest.mark.parametrize("fn", METRIC_FNS[:8])
def test_metric_under_jit_is_nan_on_bad_values(fn):
    z = jnp.zeros((3, 4))
    assert np.isnan(float(jax.jit(fn)(z, jnp.array([0, 1, 7]))))
    assert np.isnan(float(jax.jit(fn)(z.at[1, 1].set(jnp.nan), jnp.array([0, 1, 2]))))


def test_bad_options():
    z, y = jnp.zeros((3, 4)), jnp.array([0, 1, 2])
    with pytest.raises(ValueError, match="`num_bins`"):
        metrics.ece(z, y, num_bins=0)
    with pytest.raises(ValueError, match="`num_bins`"):
        metrics.ece(z, y, num_bins=2.5)
    with pytest.raises(ValueError, match="`convention`"):
        metrics.ece(z, y, convention="torch")
