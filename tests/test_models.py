"""calib_jax.models: exact parameter counts, shapes, dtypes, BatchNorm and init semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calib_jax import models
from calib_jax.models import densenet, resnet, text, wide_resnet
from calib_jax.models.layers import BatchNorm, batch_norm_train

# The reference's trainable parameter counts (PyTorch, torrvision/focal_calibration).
PARAM_COUNTS = [
    ("resnet50", 10, 23_520_842), ("resnet50", 100, 23_705_252),
    ("resnet110", 10, 45_864_522), ("resnet110", 100, 46_048_932),
    ("wide_resnet_26_10", 10, 36_481_434), ("wide_resnet_26_10", 100, 36_539_124),
    ("densenet121", 10, 6_956_298), ("densenet121", 100, 7_048_548),
    ("resnet50_tiny_imagenet", 200, 25_138_952),
]


@pytest.mark.parametrize("name,num_classes,count", PARAM_COUNTS)
def test_parameter_counts_equal_reference(name, num_classes, count):
    model = models.get(name, num_classes)
    assert models.param_count(model, jnp.zeros(models.input_shape(name))) == count


@pytest.mark.parametrize("name", ["resnet50", "resnet110", "wide_resnet_26_10", "densenet121",
                                  "resnet50_tiny_imagenet"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_big_model_shapes_and_dtypes(name, dtype):
    # Shapes only (no compute): the real forward of these is for benchmarks.
    model = models.get(name, 7, dtype=dtype)
    x = jnp.zeros(models.input_shape(name, batch=2), jnp.uint8)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    out, updates = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves((variables, updates)):
        assert leaf.dtype == jnp.float32  # params and batch stats stay float32


SMALL = {
    "resnet8": lambda c, dtype: resnet.resnet8(c, dtype=dtype),
    "wide_resnet_8_1": lambda c, dtype: wide_resnet.wide_resnet(c, depth=8, width=1, dtype=dtype),
    "densenet_tiny": lambda c, dtype: densenet.DenseNet((1, 1, 1, 1), c, growth_rate=4,
                                                        dtype=dtype),
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_small_models_forward_finite(name, dtype):
    model = SMALL[name](10, dtype)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    eval_logits = model.apply({**variables, **updates}, x, train=False)
    assert np.all(np.isfinite(np.asarray(eval_logits)))
    # Training mode normalises with batch statistics and moves the running ones.
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    after = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_batchnorm_matches_pytorch_semantics():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3, 4)) * 2 + 1
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64).reshape(-1, 4)
    mean, var_biased, var_unbiased = xn.mean(0), xn.var(0), xn.var(0, ddof=1)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4),
                               (xn - mean) / np.sqrt(var_biased + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var_unbiased,
                               rtol=1e-5)
    y_eval = BatchNorm(use_running_average=True).apply({**variables, **updates}, x)
    np.testing.assert_allclose(
        np.asarray(y_eval).reshape(-1, 4),
        (xn - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var_unbiased + 1e-5), rtol=1e-4, atol=1e-5)


def _autodiff_batch_norm(x, scale, bias, epsilon=1e-5, axis_name=None, dtype=jnp.float32):
    """The forward formula, differentiated by JAX: the oracle for the closed-form VJP."""
    x32 = x.astype(jnp.float32 if x.dtype != jnp.float64 else jnp.float64)
    axes = tuple(range(x.ndim - 1))
    mean, mean_sq = jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)
    if axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    var = mean_sq - jnp.square(mean)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
    return y.astype(dtype), mean, var


def _bn_inputs(key, shape, dtype):
    k_x, k_s, k_b, k_w = jax.random.split(key, 4)
    c = shape[-1]
    x = (jax.random.normal(k_x, shape) * 2 + 0.5).astype(dtype)
    scale = (1 + 0.3 * jax.random.normal(k_s, (c,))).astype(dtype)
    bias = (0.2 * jax.random.normal(k_b, (c,))).astype(dtype)
    weights = jax.random.normal(k_w, shape)
    return x, scale, bias, weights


def _bn_objective(norm, weights):
    """A loss that uses the output and both statistics, so every cotangent is nonzero."""
    def objective(x, scale, bias):
        y, mean, var = norm(x, scale, bias)
        return (jnp.sum(y.astype(weights.dtype) * weights) + 3.0 * jnp.sum(mean * jnp.arange(
            mean.shape[0])) - 2.0 * jnp.sum(var))
    return objective


def test_batch_norm_gradient_is_autodiff_of_the_forward_pass():
    with jax.enable_x64(True):  # float64: the closed form and autodiff agree to rounding
        x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(0), (6, 3, 2, 5), jnp.float64)
        fused = _bn_objective(lambda *a: batch_norm_train(*a, 1e-5, None, jnp.float64), w)
        oracle = _bn_objective(lambda *a: _autodiff_batch_norm(*a, dtype=jnp.float64), w)
        got = jax.grad(fused, argnums=(0, 1, 2))(x, scale, bias)
        want = jax.grad(oracle, argnums=(0, 1, 2))(x, scale, bias)
        for g, v in zip(got, want):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, v, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(fused(x, scale, bias), oracle(x, scale, bias), rtol=1e-12)
        from jax.test_util import check_grads  # finite differences, too
        check_grads(fused, (x, scale, bias), order=1, modes=["rev"])


def test_batch_norm_gradient_in_bfloat16_keeps_dtypes():
    x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(1), (16, 4, 4, 8), jnp.float32)
    x16 = x.astype(jnp.bfloat16)
    fused = _bn_objective(lambda *a: batch_norm_train(*a, 1e-5, None, jnp.bfloat16), w)
    oracle = _bn_objective(lambda *a: _autodiff_batch_norm(*a, dtype=jnp.bfloat16), w)
    got = jax.grad(fused, argnums=(0, 1, 2))(x16, scale, bias)
    want = jax.grad(oracle, argnums=(0, 1, 2))(x16, scale, bias)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for g, v in zip(got, want):
        g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
        assert np.linalg.norm(g - v) / np.linalg.norm(v) < 1e-2
    # Half-precision parameters get half-precision gradients (the sums stay float32 inside).
    half = [a.astype(jnp.bfloat16) for a in (x, scale, bias)]
    got = jax.grad(fused, argnums=(0, 1, 2))(*half)
    assert [g.dtype for g in got] == [jnp.bfloat16] * 3


def test_batch_norm_gradient_over_devices_equals_one_device():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map
    x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(2), (8, 3, 3, 4), jnp.float32)

    def objective(axis_name):
        return lambda x, w, s, b: jnp.sum(batch_norm_train(x, s, b, 1e-5, axis_name,
                                                           jnp.float32)[0] * w)

    single = jax.jit(jax.grad(objective(None), argnums=(0, 2, 3)))(x, w, scale, bias)
    # jit over a batch split on 4 devices (the training loop's data parallelism; the
    # closed-form gradient, statistics of the global batch).
    mesh = jax.make_mesh((4,), ("data",))
    rows = NamedSharding(mesh, P("data"))
    split = jax.jit(jax.grad(objective(None), argnums=(0, 2, 3)))(
        jax.device_put(x, rows), jax.device_put(w, rows), scale, bias)
    assert split[0].sharding.spec[0] == "data"  # the gradient stays split by rows
    # shard_map with axis_name (autodiff's gradient; replicated parameters' gradients
    # summed over the devices once, not 4 times).
    plain = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    per_device = shard_map(lambda *a: jax.lax.psum(objective("data")(*a), "data"), mesh=plain,
                           in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
    mapped = jax.jit(jax.grad(per_device, argnums=(0, 2, 3)))(x, w, scale, bias)
    for got in (split, mapped):
        for g, v in zip(got, single):
            np.testing.assert_allclose(g, v, rtol=2e-5, atol=2e-6)


def test_initialisers_follow_reference():
    # ResNet convs: PyTorch default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    v = resnet.resnet8(10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    k = np.asarray(v["params"]["BasicBlock_1"]["Conv_0"]["kernel"])  # 3x3x16x32
    bound = 1 / np.sqrt(3 * 3 * 16)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    # Wide-ResNet convs: N(0, sqrt(2 / (k * k * out))).
    w = wide_resnet.wide_resnet(10, depth=26, width=10)
    v = jax.jit(w.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    k = np.asarray(v["params"]["BasicBlock_11"]["Conv_1"]["kernel"])  # 3x3x640x640
    np.testing.assert_allclose(k.std(), np.sqrt(2 / (9 * 640)), rtol=0.01)
    assert abs(k.mean()) < 1e-4
    fc = v["params"]["TorchDense_0"]["Dense_0"]
    assert np.abs(np.asarray(fc["bias"])).max() <= 1 / np.sqrt(640)


def test_global_pooling_cnn():
    model = models.get("global_pooling_cnn", 20, vocab_size=50, embed_dim=8)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 40), 0, 50)
    v = model.init(jax.random.PRNGKey(1), tokens)
    out = model.apply(v, tokens)
    assert out.shape == (3, 20) and np.all(np.isfinite(np.asarray(out)))
    train_out = model.apply(v, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(out, train_out)
    # Reference size with 20,000 x 100 embeddings.
    big = models.get("global_pooling_cnn", 20)
    assert models.param_count(big, jnp.zeros((1, 1000), jnp.int32)) == 2_247_316
    with pytest.raises(ValueError, match="length >= 21"):
        model.init(jax.random.PRNGKey(1), tokens[:, :20])


def test_embedding_source_is_a_parameter():
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    tokens = jnp.arange(80).reshape(2, 40) % 50
    frozen = models.get("global_pooling_cnn", 20, vocab_size=50, embed_dim=8, embeddings=table,
                        train_embeddings=False)
    v = frozen.init(jax.random.PRNGKey(0), tokens)
    np.testing.assert_array_equal(v["params"]["_Embedding_0"]["embedding"], table)
    g = jax.grad(lambda p: frozen.apply({"params": p}, tokens).sum())(v["params"])
    assert np.all(np.asarray(g["_Embedding_0"]["embedding"]) == 0)
    trainable = models.get("global_pooling_cnn", 20, vocab_size=50, embed_dim=8, embeddings=table)
    g = jax.grad(lambda p: trainable.apply({"params": p}, tokens).sum())(v["params"])
    assert np.any(np.asarray(g["_Embedding_0"]["embedding"]) != 0)
    with pytest.raises(ValueError, match="`embeddings` must have shape"):
        models.get("global_pooling_cnn", 20, vocab_size=49, embed_dim=8,
                   embeddings=table).init(jax.random.PRNGKey(0), tokens)


def _tree_lstm_numpy(params, words_ids, lefts, rights):
    """Recursive float64 evaluation of the reference's constituency Tree-LSTM."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    emb = p["_Embedding_0"]["embedding"]

    def dense(name, x, scope=None):
        d = (p["composer"] if scope else p)[name]["Dense_0"]
        return x @ d["kernel"] + d["bias"]

    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    states = {}
    for k, (w, l, r) in enumerate(zip(words_ids, lefts, rights)):
        if l < 0:
            c = dense("leaf_c", emb[w])
            states[k] = (c, sig(dense("leaf_o", emb[w])) * np.tanh(c))
        else:
            (lc, lh), (rc, rh) = states[l], states[r]
            g = {n: dense(f"{n}_left", lh, 1) + dense(f"{n}_right", rh, 1)
                 for n in ("i", "lf", "rf", "u")}
            c = sig(g["i"]) * np.tanh(g["u"]) + sig(g["lf"]) * lc + sig(g["rf"]) * rc
            states[k] = (c, np.tanh(c))
    return dense("out", states[len(words_ids) - 1][1])


def test_tree_lstm_matches_recursive_reference():
    sentences = ["(3 (2 a) (4 (2 b) (3 c)))", "(1 (2 (2 x) (1 y)) (0 z))", "(4 (4 w))"]
    parsed = [text.parse_ptb_tree(s) for s in sentences]
    vocab = {w: i + 1 for i, w in enumerate("abcxyzw")}
    trees = text.make_trees(parsed, vocab, max_nodes=7)
    model = models.get("tree_lstm", 5, vocab_size=10, embed_dim=6, mem_dim=4)
    v = model.init(jax.random.PRNGKey(0), trees)
    out = np.asarray(model.apply(v, trees))
    assert out.shape == (3, 5)
    for i, (_, words, lefts, rights) in enumerate(parsed):
        ids = [vocab.get(w, 0) if w is not None else 0 for w in words]
        np.testing.assert_allclose(out[i], _tree_lstm_numpy(v["params"], ids, lefts, rights),
                                   rtol=1e-5, atol=1e-6)
    assert parsed[2][1] == ["w"]  # unary root collapsed onto its leaf
    with pytest.raises(ValueError):
        text.parse_ptb_tree("(3 (2 a) (4 b")


def test_registry_errors():
    assert "resnet50" in models.names() and "tree_lstm" in models.names()
    with pytest.raises(ValueError, match="unknown model 'resnet51'"):
        models.get("resnet51", 10)
    with pytest.raises(ValueError, match="`num_classes`"):
        models.get("resnet50", 1)
    with pytest.raises(ValueError, match="`dtype`"):
        models.get("resnet50", 10, dtype=jnp.int32)
    with pytest.raises(TypeError, match="no extra arguments"):
        models.get("resnet50", 10, vocab_size=3)
    with pytest.raises(ValueError, match="`depth`"):
        wide_resnet.wide_resnet(10, depth=27)
