"""calib_jax.models: exact parameter counts, shapes, dtypes, BatchNorm and init semantics."""

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calib_jax import models
from calib_jax.models import densenet, layers, resnet, text, wide_resnet
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
    # Jitted: op by op, every op of every layer compiles on its own (DenseNet: 14 s vs 3.3 s).
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    eval_logits = jax.jit(functools.partial(model.apply, train=False))(
        {**variables, **updates}, x)
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
    def objective(*args):  # (x, scale, bias[, residual])
        y, mean, var = norm(*args)
        return (jnp.sum(y.astype(weights.dtype) * weights) + 3.0 * jnp.sum(mean * jnp.arange(
            mean.shape[0])) - 2.0 * jnp.sum(var))
    return objective


def test_batch_norm_gradient_is_autodiff_of_the_forward_pass():
    with jax.enable_x64(True):  # float64: the closed form and autodiff agree to rounding
        x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(0), (6, 3, 2, 5), jnp.float64)
        fused = _bn_objective(lambda *a: batch_norm_train(*a, 1e-5, None, jnp.float64), w)
        oracle = _bn_objective(lambda *a: _autodiff_batch_norm(*a, dtype=jnp.float64), w)
        got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(x, scale, bias)
        want = jax.jit(jax.grad(oracle, argnums=(0, 1, 2)))(x, scale, bias)
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
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(x16, scale, bias)
    want = jax.jit(jax.grad(oracle, argnums=(0, 1, 2)))(x16, scale, bias)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for g, v in zip(got, want):
        g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
        assert np.linalg.norm(g - v) / np.linalg.norm(v) < 1e-2
    # Half-precision parameters get half-precision gradients (the sums stay float32 inside).
    half = [a.astype(jnp.bfloat16) for a in (x, scale, bias)]
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(*half)
    assert [g.dtype for g in got] == [jnp.bfloat16] * 3


def _autodiff_batch_norm_relu(x, scale, bias, residual, dtype=jnp.float32):
    """The unfused layers, differentiated by JAX: ``relu(norm(x) + residual)``."""
    y, mean, var = _autodiff_batch_norm(x, scale, bias, dtype=jnp.promote_types(x.dtype,
                                                                                 jnp.float32))
    return jax.nn.relu(y + residual.astype(y.dtype)).astype(dtype), mean, var


def test_batch_norm_relu_residual_gradient_is_autodiff_of_the_unfused_layers():
    with jax.enable_x64(True):
        x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(3), (6, 3, 2, 5), jnp.float64)
        residual = jax.random.normal(jax.random.PRNGKey(4), x.shape, jnp.float64)
        fused = _bn_objective(lambda x, s, b, r: batch_norm_train(
            x, s, b, 1e-5, None, jnp.float64, residual=r, relu=True), w)
        oracle = _bn_objective(lambda x, s, b, r: _autodiff_batch_norm_relu(
            x, s, b, r, dtype=jnp.float64), w)
        args = (x, scale, bias, residual)
        y = batch_norm_train(x, scale, bias, 1e-5, None, jnp.float64, residual=residual,
                             relu=True)[0]
        assert 0.2 < float(jnp.mean(y == 0)) < 0.8  # the ReLU's mask matters here
        got = jax.grad(fused, argnums=(0, 1, 2, 3))(*args)
        want = jax.grad(oracle, argnums=(0, 1, 2, 3))(*args)
        for g, v in zip(got, want):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, v, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(fused(*args), oracle(*args), rtol=1e-12)
        from jax.test_util import check_grads
        check_grads(fused, args, order=1, modes=["rev"])
        # ReLU alone (no residual), and the residual alone (no ReLU).
        for residual_arg, relu in ((None, True), (residual, False)):
            got = jax.grad(lambda x, s, b: jnp.sum(batch_norm_train(
                x, s, b, 1e-5, None, jnp.float64, residual=residual_arg, relu=relu)[0] * w),
                argnums=(0, 1, 2))(x, scale, bias)

            def unfused(x, s, b):
                y = _autodiff_batch_norm(x, s, b, dtype=jnp.float64)[0]
                y = y if residual_arg is None else y + residual_arg
                return jnp.sum((jax.nn.relu(y) if relu else y) * w)
            want = jax.grad(unfused, argnums=(0, 1, 2))(x, scale, bias)
            for g, v in zip(got, want):
                np.testing.assert_allclose(g, v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual,channels", [(False, 6), (True, 6), (True, 16)])
def test_batch_norm_relu_gradient_mask_is_where_the_output_is_positive(dtype, with_residual,
                                                                         channels):
    # d sum(y) / d bias counts, per channel, the positions the backward pass lets through:
    # they must be exactly those where the forward output is > 0 (without a shortcut the
    # mask is recomputed from x; with one it is saved as bits, or as y when the channels
    # are not a multiple of 8).
    x, scale, bias, _ = _bn_inputs(jax.random.PRNGKey(8), (32, 5, 5, channels), jnp.float32)
    x = x.astype(dtype)
    residual = (jax.random.normal(jax.random.PRNGKey(9), x.shape).astype(dtype)
                if with_residual else None)

    def total(b):
        y = batch_norm_train(x, scale, b, 1e-5, None, dtype, residual=residual, relu=True)[0]
        return jnp.sum(y.astype(jnp.float32)), y

    for fn in (total, jax.jit(total)):
        count, y = jax.grad(fn, has_aux=True)(bias)
        active = np.sum(np.asarray(y.astype(jnp.float32)) > 0, axis=(0, 1, 2))
        assert 0.2 < active.sum() / y.size < 0.8
        np.testing.assert_array_equal(np.asarray(count), active)


def test_relu_mask_bits_round_trip():
    active = jax.random.bernoulli(jax.random.PRNGKey(10), 0.4, (3, 2, 24))
    packed = layers._pack_mask(active)
    assert packed.shape == (3, 2, 3) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(layers._unpack_mask(packed), active)
    # Channel 8 j + k is bit k of byte j.
    one = jnp.zeros((16,), bool).at[10].set(True)
    np.testing.assert_array_equal(layers._pack_mask(one), np.array([0, 4], np.uint8))


def test_batch_norm_relu_residual_in_bfloat16_keeps_dtypes():
    x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(5), (16, 4, 4, 8), jnp.float32)
    x16 = x.astype(jnp.bfloat16)
    residual = jax.random.normal(jax.random.PRNGKey(6), x.shape).astype(jnp.bfloat16)
    fused = _bn_objective(lambda x, s, b, r: batch_norm_train(
        x, s, b, 1e-5, None, jnp.bfloat16, residual=r, relu=True), w)
    oracle = _bn_objective(lambda x, s, b, r: _autodiff_batch_norm_relu(
        x, s, b, r, dtype=jnp.bfloat16), w)
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3)))(x16, scale, bias, residual)
    want = jax.jit(jax.grad(oracle, argnums=(0, 1, 2, 3)))(x16, scale, bias, residual)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16]
    for g, v in zip(got, want):
        g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
        assert np.linalg.norm(g - v) / np.linalg.norm(v) < 2e-2
    # A float32 shortcut into a bfloat16 layer gets a float32 cotangent.
    got = jax.jit(jax.grad(fused, argnums=3))(x16, scale, bias, residual.astype(jnp.float32))
    assert got.dtype == jnp.float32


def test_shortcut_widening_is_bitwise_the_conversion():
    # Every bfloat16 bit pattern (NaNs, infinities, subnormals, -0 included).
    x = jax.lax.bitcast_convert_type(jnp.arange(2**16, dtype=jnp.uint16), jnp.bfloat16)
    got = np.asarray(layers._upcast_exactly(x, jnp.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32),
                                  np.asarray(x.astype(jnp.float32)).view(np.uint32))
    # Other pairs are the plain conversion.
    h = jnp.array([1.5, -0.0, 6e-8], jnp.float16)
    assert layers._upcast_exactly(h, jnp.float32).dtype == jnp.float32
    np.testing.assert_array_equal(layers._upcast_exactly(h, jnp.float32), h.astype(jnp.float32))


def test_shortcut_widening_differentiates_as_the_conversion():
    # The autodiff path (BatchNorm under shard_map) differentiates through the widening:
    # gradients and tangents must be the plain conversion's, not bitcast's (none).
    x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(7), (8, 3, 3, 4), jnp.float32)
    x16, residual = x.astype(jnp.bfloat16), (x * 0.5 - 0.1).astype(jnp.bfloat16)

    def objective(x, s, b, r):
        y = layers._batch_norm_forward(x, s, b, r, 1e-5, None, jnp.float32, True)[0]
        return jnp.sum(y * w)

    got = jax.grad(objective, argnums=(0, 1, 2, 3))(x16, scale, bias, residual)
    with mock.patch.object(layers, "_upcast_exactly", lambda v, dtype: v.astype(dtype)):
        want = jax.grad(objective, argnums=(0, 1, 2, 3))(x16, scale, bias, residual)
        want_tangent = jax.jvp(lambda r: objective(x16, scale, bias, r), (residual,),
                               (jnp.ones_like(residual),))
    got_tangent = jax.jvp(lambda r: objective(x16, scale, bias, r), (residual,),
                          (jnp.ones_like(residual),))
    assert got[3].dtype == jnp.bfloat16 and float(jnp.abs(got[3]).sum()) > 0
    for g, v in zip(got + got_tangent, want + want_tangent):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(v, np.float32))


def test_batch_norm_residual_of_another_shape_is_refused():
    x = jnp.ones((4, 2, 2, 3))
    with pytest.raises(ValueError, match="`residual` must have the shape of `x`"):
        batch_norm_train(x, jnp.ones(3), jnp.zeros(3), 1e-5, None, jnp.float32,
                         residual=jnp.ones((4, 2, 2, 1)), relu=True)
    with pytest.raises(ValueError, match="`residual` must have the shape of `x`"):
        BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), x, jnp.ones((3,)))


def test_channel_sums_are_separate_reductions_over_all_but_the_channel_axis():
    from calib_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(9), (16, 5, 5, 6))
    terms = (x, jnp.square(x))
    want = [np.sum(np.asarray(t, np.float64), axis=(0, 1, 2)) for t in terms]
    got = jax.jit(layers._channel_sums)(*terms)
    assert len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5)
    # Not one reduction over a stack of the terms (measured slower on GPU and CPU: the
    # stack's slices re-read the shared inputs).
    assert "concatenate" not in jax.jit(layers._channel_sums).lower(*terms).as_text()


@pytest.mark.parametrize("shape", [(4, 9, 9, 8), (4, 3, 3, 8), (50, 8)])
def test_channel_sums_by_image_equal_the_separate_sums(shape):
    from calib_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    terms = (x, jnp.square(x), x * 0.5 - 1)
    want = [np.sum(np.asarray(t, np.float64), axis=tuple(range(len(shape) - 1))) for t in terms]
    got = jax.jit(layers._channel_sums_by_image)(*terms)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == (shape[-1],)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_cuda_lowers_the_sums_by_image_and_cpu_the_separate_sums():
    """The platform choice (measured faster on an H200 with the training loop's GPU
    defaults, slower on CPU): a CUDA lowering holds the per-image sums (``[N, C]``, then
    their stack), a CPU lowering neither. Checked without a GPU by lowering for CUDA."""
    from calib_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(9), (16, 9, 9, 6))
    terms = (x, jnp.square(x))
    traced = jax.jit(layers._channel_sums).trace(*terms)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "tensor<16x6xf32>" in cuda and "concatenate" in cuda
    assert "tensor<16x6xf32>" not in cpu and "concatenate" not in cpu
    # Layers of few positions per image keep one reduction per term on CUDA too.
    small = jnp.ones((16, 4, 4, 6))
    small_cuda = jax.jit(layers._channel_sums).trace(small, small).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "concatenate" not in small_cuda


class _UnfusedBasicBlock(nn.Module):
    """The blocks as written before BatchNorm took the ReLU and the shortcut (the oracle
    of the fused blocks: same parameter names, same arithmetic)."""
    planes: int
    stride: int = 1
    bottleneck: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(BatchNorm, use_running_average=not train)
        conv = resnet._conv
        out_planes = self.planes * (4 if self.bottleneck else 1)
        if self.bottleneck:
            out = nn.relu(norm()(conv(self.planes, 1)(x)))
            out = nn.relu(norm()(conv(self.planes, 3, self.stride)(out)))
            out = norm()(conv(out_planes, 1)(out))
        else:
            out = nn.relu(norm()(conv(self.planes, 3, self.stride)(x)))
            out = norm()(conv(self.planes, 3)(out))
        if self.stride != 1 or x.shape[-1] != out_planes:
            x = norm()(conv(out_planes, 1, self.stride)(x))
        return nn.relu(out + x)


def _randomised(variables, key):
    """BatchNorm scales, biases and statistics moved off their initial 1 / 0, so that
    two layers swapped by name would not compute the same."""
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        jnp.abs(leaf + 0.3 * jax.random.normal(k, leaf.shape)) + 0.05
        for leaf, k in zip(leaves, keys)])


@pytest.mark.parametrize("bottleneck,stride,in_planes", [
    (False, 1, 4), (False, 2, 4), (True, 1, 16), (True, 2, 8)])
def test_fused_blocks_equal_the_unfused_layers(bottleneck, stride, in_planes):
    block = (resnet.Bottleneck if bottleneck else resnet.BasicBlock)(4, stride)
    oracle = _UnfusedBasicBlock(4, stride, bottleneck)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, in_planes))
    variables = block.init(jax.random.PRNGKey(1), x, train=False)
    # Same names: the oracle's variables have the block's tree.
    assert (jax.tree_util.tree_structure(oracle.init(jax.random.PRNGKey(1), x, train=False))
            == jax.tree_util.tree_structure(variables))
    variables = {"params": variables["params"], "batch_stats": _randomised(
        variables["batch_stats"], jax.random.PRNGKey(2))}
    variables["params"] = {**variables["params"], **{
        name: _randomised(layer, jax.random.PRNGKey(3 + i))
        for i, (name, layer) in enumerate(variables["params"].items())
        if name.startswith("BatchNorm")}}

    def run(module, params):
        out, updates = module.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"])
        return jnp.sum(out * jnp.cos(out)), updates

    (loss, updates), grads = jax.value_and_grad(lambda p: run(block, p), has_aux=True)(
        variables["params"])
    (want_loss, want_updates), want_grads = jax.value_and_grad(
        lambda p: run(oracle, p), has_aux=True)(variables["params"])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for got, want in ((updates, want_updates), (grads, want_grads)):
        for g, v in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(block.apply(variables, x, train=False),
                               oracle.apply(variables, x, train=False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_batch_norm_gradient_over_devices_equals_one_device(fused):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map
    x, scale, bias, w = _bn_inputs(jax.random.PRNGKey(2), (8, 3, 3, 4), jnp.float32)

    def objective(axis_name):
        # fused: relu(norm(x) + w), the weights doubling as the shortcut.
        return lambda x, w, s, b: jnp.sum(batch_norm_train(
            x, s, b, 1e-5, axis_name, jnp.float32, residual=w if fused else None,
            relu=fused)[0] * w)

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
    # Wide-ResNet convs: N(0, sqrt(2 / (k * k * out))). Depth 8 (one block per stage) has
    # WRN-26-10's widest kernel at a fraction of the cost.
    w = wide_resnet.wide_resnet(10, depth=8, width=10)
    v = jax.jit(w.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    k = np.asarray(v["params"]["BasicBlock_2"]["Conv_1"]["kernel"])  # 3x3x640x640
    np.testing.assert_allclose(k.std(), np.sqrt(2 / (9 * 640)), rtol=0.01)
    assert abs(k.mean()) < 1e-4
    fc = v["params"]["TorchDense_0"]["Dense_0"]
    assert np.abs(np.asarray(fc["bias"])).max() <= 1 / np.sqrt(640)


@pytest.mark.parametrize("partitionable", [True, False])
def test_flat_drawn_initialisers_equal_flax(partitionable):
    # The initialisers draw flat and reshape (faster to compile): the numbers must be flax's,
    # bit for bit, in both of jax's threefry modes and in every parameter dtype.
    ours_theirs = [
        (layers.torch_kernel_init, nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")),
        (layers.he_normal_fan_out, nn.initializers.variance_scaling(2.0, "fan_out", "normal")),
        (layers.variance_scaling(0.7, "fan_out", "uniform"),
         nn.initializers.variance_scaling(0.7, "fan_out", "uniform")),
        (layers.normal(1.0), nn.initializers.normal(1.0)),
        (layers.torch_bias_init(48), lambda key, shape, dtype: jax.random.uniform(
            key, shape, dtype, -1 / np.sqrt(48), 1 / np.sqrt(48))),
    ]
    # Shapes: conv kernels (HWIO), a 5-D kernel, dense kernels, bfloat16 on one shape. One
    # jitted program per mode (eagerly, every op of every shape would compile on its own).
    cases = [(shape, jnp.float32) for shape in [(3, 3, 16, 32), (48, 10), (7, 1)]]
    cases += [((1, 1, 7, 5), jnp.float32), ((5, 3, 3, 4, 2), jnp.float32),
              ((3, 3, 16, 32), jnp.bfloat16)]
    pairs = [(ours, theirs, shape, dtype) for i, (shape, dtype) in enumerate(cases)
             for ours, theirs in (ours_theirs[:2] if i >= 3 else ours_theirs)]

    @jax.jit
    def draw_all(key):
        return [(ours(key, shape, dtype), theirs(key, shape, dtype))
                for ours, theirs, shape, dtype in pairs]

    with jax.threefry_partitionable(partitionable):
        drawn = draw_all(jax.random.PRNGKey(3))
    for (got, want), (_, _, shape, dtype) in zip(drawn, pairs):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape == shape
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="`mode`"):
        layers.variance_scaling(1.0, "fan_avg", "uniform")
    with pytest.raises(ValueError, match="`distribution`"):
        layers.variance_scaling(1.0, "fan_in", "truncated_normal")
    with pytest.raises(ValueError, match="inputs, outputs"):
        layers.torch_kernel_init(jax.random.PRNGKey(3), (5,))


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
    for i, (_, words, lefts, rights, _) in enumerate(parsed):
        ids = [vocab.get(w, 0) if w is not None else 0 for w in words]
        np.testing.assert_allclose(out[i], _tree_lstm_numpy(v["params"], ids, lefts, rights),
                                   rtol=1e-5, atol=1e-6)
    assert parsed[2][1] == ["w"]  # unary root collapsed onto its leaf
    with pytest.raises(ValueError):
        text.parse_ptb_tree("(3 (2 a) (4 b")


def test_tree_lstm_phrase_labels_train_every_node_and_read_the_root():
    """The reference's SST model: three phrase classes, every node's logits and targets for
    training; the sentence read from the root's negative and positive outputs."""
    sentences = ["(3 (2 a) (4 (2 b) (3 c)))", "(1 (2 (2 x) (1 y)) (0 z))", "(3 (1 w))"]
    parsed = [text.parse_ptb_tree(s) for s in sentences]
    assert parsed[0][4] == [2, 2, 3, 4, 3]  # post-order: a, b, c, (b c), root
    assert parsed[2][4] == [3]  # a unary chain keeps its outermost (the sentence's) label
    classes = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2}
    vocab = {w: i + 1 for i, w in enumerate("abcxyzw")}
    trees = text.make_trees(parsed, vocab, max_nodes=7, node_classes=classes)
    assert trees.labels[1].tolist() == [1, 0, 1, 0, 0, -1, -1]
    packed = text.pack_trees(trees)
    assert packed.shape == (3, 4, 7)
    np.testing.assert_array_equal(text.unpack_trees(jnp.asarray(packed)).labels, trees.labels)
    model = models.get("tree_lstm", 3, vocab_size=10, embed_dim=6, mem_dim=4,
                       root_classes=(0, 2), phrase_labels=True)
    v = model.init(jax.random.PRNGKey(0), packed)
    nodes = np.asarray(model.apply(v, packed, all_nodes=True))
    root = np.asarray(trees.root)
    sentence = np.asarray(model.apply(v, packed))
    np.testing.assert_allclose(sentence, nodes[np.arange(3), root][:, [0, 2]], rtol=1e-6)
    # The two-output reading is the plain model's, on the same parameters.
    plain = models.get("tree_lstm", 3, vocab_size=10, embed_dim=6, mem_dim=4)
    np.testing.assert_allclose(sentence, np.asarray(plain.apply(v, trees))[:, [0, 2]],
                               rtol=1e-6)
    no_dropout = models.get("tree_lstm", 3, vocab_size=10, embed_dim=6, mem_dim=4,
                            root_classes=(0, 2), phrase_labels=True, dropout=0.0)
    out = no_dropout.apply(v, packed, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert isinstance(out, models.NodeLogits)
    np.testing.assert_allclose(out.node_logits, nodes, rtol=1e-6)
    np.testing.assert_allclose(out.logits, sentence, rtol=1e-6)
    np.testing.assert_array_equal(out.node_labels, trees.labels)
    with pytest.raises(ValueError, match="`phrase_labels=True` trains on node labels"):
        model.apply(v, packed[:, :3], train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    with pytest.raises(ValueError, match="`root_classes` must name two or more"):
        models.get("tree_lstm", 3, vocab_size=10, embed_dim=6, mem_dim=4,
                   root_classes=(0, 3)).init(jax.random.PRNGKey(0), packed)
    with pytest.raises(ValueError, match=r"shape \[batch, 3 or 4, nodes\]"):
        text.unpack_trees(jnp.zeros((2, 5, 7), jnp.int32))


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


def test_fused_batch_norm_gradient_under_vmap_equals_each_member():
    # K members as one vmapped program (train.multi_train_steps' vmap mode) go through the
    # custom VJP's batching rule: each member's gradient is its own.
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    members = [_bn_inputs(k, (8, 3, 3, 4), jnp.float32) for k in keys]
    x, scale, bias, w = (jnp.stack(parts) for parts in zip(*members))
    residual = jax.random.normal(jax.random.PRNGKey(8), x.shape)

    def objective(x, scale, bias, residual, w):
        y, mean, var = batch_norm_train(x, scale, bias, 1e-5, None, jnp.float32,
                                        residual=residual, relu=True)
        return jnp.sum(y * w) + jnp.sum(mean) - jnp.sum(var)

    grad = jax.grad(objective, argnums=(0, 1, 2, 3))
    batched = jax.jit(jax.vmap(grad))(x, scale, bias, residual, w)
    for k in range(len(keys)):
        single = grad(x[k], scale[k], bias[k], residual[k], w[k])
        for g, v in zip(batched, single):
            np.testing.assert_allclose(g[k], v, rtol=1e-5, atol=1e-6)


def test_the_parameter_table_command_says_when_a_count_differs(capsys, monkeypatch):
    from calib_jax.models import __main__ as table
    # Two of the models (the counts of all are tested above): one as the reference, one not.
    monkeypatch.setattr(table, "REFERENCE", {("resnet50", 10): 23_520_842,
                                             ("densenet121", 10): 1})
    assert table.main([]) == 1
    out = capsys.readouterr()
    assert "| resnet50 | 10 | 23,520,842 | 23,520,842 | yes |" in out.out
    assert "| densenet121 | 10 | 6,956,298 | 1 | NO |" in out.out
    assert "differ from the reference's: densenet121 (10 classes)" in out.err
    monkeypatch.setitem(table.REFERENCE, ("densenet121", 10), 6_956_298)
    assert table.main([]) == 0 and not capsys.readouterr().err
    with pytest.raises(SystemExit):  # no arguments: a stray one is refused, not ignored
        table.main(["resnet51"])
