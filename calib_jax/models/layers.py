"""Layers shared by the model zoo: PyTorch-matching BatchNorm and initialisers.

PyTorch defaults, which the reference keeps unless a model overrides them:

* ``Conv`` / ``Linear`` weights: ``kaiming_uniform_(a=sqrt(5))``, i.e.
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` = ``variance_scaling(1/3, fan_in, uniform)``;
* biases: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
* ``BatchNorm``: scale 1, bias 0, momentum 0.1 (running = 0.9 running + 0.1 batch),
  eps 1e-5, running variance updated with the **unbiased** batch variance while
  the normalisation uses the biased one;
* ``Embedding``: ``N(0, 1)``.

The initialisers draw their numbers as one flat vector and reshape it (``flat_draw``): the
same numbers as flax's initialisers, which XLA:CPU compiles several times faster.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

def flat_draw(draw, key, shape, dtype, *bounds):
    """``draw(key, shape, dtype, *bounds)`` (``jax.random.uniform`` or ``normal``), drawn as
    one flat vector and reshaped to ``shape``.

    The numbers are the same with jax's default PRNG: threefry numbers an array's elements in
    row-major order in both of its modes (the ``jax_threefry_partitionable`` flag), so element
    ``i`` of the flat draw is element ``unravel(i)`` of the shaped one (``tests/test_models.py``
    checks the initialisers bit for bit against flax's). (Another ``jax_default_prng_impl``
    may arrange its numbers otherwise: the same distribution, other values.) The reason is
    compile time: XLA:CPU compiles a draw of a 4-D shape several times slower than a 1-D one,
    and a model's jitted ``init`` is mostly draws: ResNet-8's compiles in 1.5-2.0 s instead of
    3.6-3.9 s, ResNet-50's in 3.9-5.2 s instead of 7.2-7.7 (benchmarks/NOTES.md), paid by
    every run, evaluation and test process.
    """
    return draw(key, (math.prod(shape),), dtype, *bounds).reshape(shape)


def variance_scaling(scale: float, mode: str, distribution: str):
    """``nn.initializers.variance_scaling(scale, mode, distribution)`` for kernels laid out
    ``[..., inputs, outputs]`` (flax's ``Conv`` and ``Dense``), the same numbers drawn flat
    (``flat_draw``). ``mode``: ``"fan_in"`` or ``"fan_out"``; ``distribution``:
    ``"uniform"`` or ``"normal"``."""
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"`mode` must be 'fan_in' or 'fan_out', got {mode!r}.")
    if distribution not in ("uniform", "normal"):
        raise ValueError(f"`distribution` must be 'uniform' or 'normal', got {distribution!r}.")

    def init(key, shape, dtype=jnp.float32):
        if len(shape) < 2:
            raise ValueError(f"a kernel's shape must be [..., inputs, outputs], got {shape}.")
        # Jax's arithmetic, step for step, so that the scale rounds as it does there.
        receptive_field = math.prod(shape) / shape[-2] / shape[-1]
        fan = (shape[-2] if mode == "fan_in" else shape[-1]) * receptive_field
        variance = jnp.array(scale / fan, dtype=dtype)
        if distribution == "uniform":
            return flat_draw(jax.random.uniform, key, shape, dtype, -1) * jnp.sqrt(3 * variance)
        return flat_draw(jax.random.normal, key, shape, dtype) * jnp.sqrt(variance)

    return init


def normal(stddev: float):
    """``nn.initializers.normal(stddev)``, the same numbers drawn flat (``flat_draw``)."""

    def init(key, shape, dtype=jnp.float32):
        return flat_draw(jax.random.normal, key, shape, dtype) * jnp.array(stddev, dtype)

    return init


torch_kernel_init = variance_scaling(1.0 / 3.0, "fan_in", "uniform")
he_normal_fan_out = variance_scaling(2.0, "fan_out", "normal")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return flat_draw(jax.random.uniform, key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """``nn.Dense`` with PyTorch's default ``Linear`` initialisation."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]))(x)


def _channel_sums(*terms):
    """Per-channel sums (over every axis but the last) of same-shaped ``terms``: on CUDA
    GPUs in two stages written out (:func:`_channel_sums_by_image`), elsewhere one reduction
    each (:func:`_separate_sums`). The choice is made per lowering platform
    (``lax.platform_dependent``), so a program holds one of the two.

    Why per platform (benchmarks/NOTES.md): on an H200 the two-stage sums, with the loop
    over a flat parameter vector (``train.train_steps(flat_params=True)``) and cuDNN's
    convolutions in XLA's CUDA graphs (``train.loop_compiler_options``), ran ResNet-50 at
    batch 128 bfloat16 4.8% faster (medians of 5 interleaved rounds, 17,047 vs 16,260
    img/s; the ranges did not overlap). On CPU they slowed ResNet-8 training by ~6% (batch
    128, float32); TPU is unmeasured and keeps the separate sums.

    Never one reduction over ``jnp.stack(terms)`` of the full terms: each slice of such a
    stack recomputes (and re-reads) the shared inputs; it measured slower on an H200
    (ResNet-50 batch 128 bf16: 13,799 stacked vs 14,882 img/s separate) and on CPU (~20%)."""
    return jax.lax.platform_dependent(*terms, cuda=_channel_sums_by_image,
                                      default=_separate_sums)


def _separate_sums(*terms):
    """One reduction per term: XLA fuses sibling reductions of the same rows into one
    multi-output kernel that reads the shared inputs once (XLA:GPU then adds one small
    second-stage kernel per term)."""
    return tuple(jnp.sum(t, axis=tuple(range(t.ndim - 1))) for t in terms)


def _channel_sums_by_image(*terms):
    """The per-channel sums in two stages written out: each term summed per image
    (``[N, ..., C] -> [N, C]``, the terms' sums in one multi-output kernel), then the
    per-image sums of all terms stacked (tiny: ``[T, N, C]``) and summed over the batch in
    one kernel, where XLA's own two-stage split has one second-stage kernel per term. The
    batch axis stays whole, so a batch sharded over devices stays sharded. Terms of fewer
    than 64 positions per image (or without spatial axes) take :func:`_separate_sums` (the
    per-image sums would be a large share of their traffic)."""
    shape = terms[0].shape
    if len(shape) < 3 or np.prod(shape[1:-1]) < 64:
        return _separate_sums(*terms)
    per_image = [jnp.sum(t.reshape(shape[0], -1, shape[-1]), axis=1) for t in terms]
    return tuple(jnp.sum(jnp.stack(per_image), axis=1))


def _batch_statistics(x32, axis_name):
    """Per-channel mean and biased variance over every axis but the last (and over
    ``axis_name``'s devices), in one pass over ``x``: E[x] and E[x^2]."""
    count = _batch_count(x32, None)
    total, total_sq = _channel_sums(x32, jnp.square(x32))
    mean, mean_sq = total / count, total_sq / count
    if axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _batch_count(x, axis_name):
    count = np.prod([x.shape[a] for a in range(x.ndim - 1)])
    return count if axis_name is None else count * jax.lax.psum(1, axis_name)


def batch_norm_train(x, scale, bias, epsilon, axis_name, dtype, *, residual=None,
                     relu: bool = False):
    """Training-mode batch normalisation over every axis of ``x`` but the last, with an
    optional residual add and ReLU fused in.

    ``y = act((x - mean) / sqrt(var + epsilon) * scale + bias + residual)`` with the
    batch's mean and biased variance (float32 for half-precision ``x``), ``act`` the ReLU
    when ``relu`` (else the identity), ``y`` cast to ``dtype``. Fusing the add and the
    ReLU computes them in float32 before the one rounding to ``dtype``.

    The gradient is the closed form (a custom VJP) instead of autodiff of the forward
    pass (except under ``shard_map``, below): with ``x_hat = (x - mean) * rstd`` and
    the cotangent ``g`` of the pre-activation (``g_y`` where ``y > 0`` with ``relu``, the
    ReLU's derivative at 0 being 0 as ``jax.nn.relu``'s), ``dx = scale * rstd * (g - mean(g)
    - x_hat * mean(g * x_hat))``, ``dscale = sum(g * x_hat)``, ``dbias = sum(g)``,
    ``dresidual = g``. The backward pass is then one fused reduction (``sum g``,
    ``sum g * x_hat``) and one elementwise pass that writes ``dx`` (and ``dresidual``) in
    the inputs' dtypes. The ReLU's mask is recomputed from ``x`` (which both passes read
    anyway) where no shortcut was added, and saved as bits (8 channels to a byte; ``y``
    itself if the channels are not a multiple of 8) where one was (recomputing it would
    read the shortcut); the forward pass writes ``y`` (and those bits) and saves ``x`` and
    two per-channel vectors. Autodiff of the unfused layers saves and
    reads float32 copies of activation-sized tensors and a separate pre-ReLU tensor: on an
    H200 (ResNet-50, batch 128, bfloat16) the BatchNorm and ReLU fusions were over half of
    the step's kernel time (benchmarks/NOTES.md). The two agree to float rounding
    (``tests/test_models.py``), except where the variance is clamped at 0 (a constant
    channel), whose autodiff gradient through the clamp is 0.

    Args:
      x: ``[..., C]`` activations (any float dtype).
      scale, bias: ``[C]`` float32.
      epsilon: added to the variance.
      axis_name: ``shard_map`` / mesh axis whose devices share the batch statistics
        (None under ``jit`` with a sharded batch: the reductions are global there).
      dtype: dtype of ``y``.
      residual: optional array of ``y``'s shape added before the activation (a ResNet
        block's shortcut).
      relu: apply the ReLU.

    Returns:
      ``(y, mean, var)``: the output and the batch statistics (float32 ``[C]``;
      differentiable too).

    With ``axis_name`` (inside ``shard_map``) the gradient is autodiff's: a custom VJP
    there must return the replicated parameters' cotangents typed as ``shard_map``'s
    varying-axis checks expect, which its backward rule cannot see when it is traced.
    ``jax.jit`` over a sharded batch, the training loop's data parallelism, takes the
    closed form.
    """
    _check_residual(x, residual)
    if axis_name is not None:
        y, mean, var, _ = _batch_norm_forward(x, scale, bias, residual, epsilon, axis_name,
                                              dtype, relu)
        return y, mean, var
    return _batch_norm_closed_form(x, scale, bias, residual, epsilon, dtype, bool(relu))


def _check_residual(x, residual):
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"`residual` must have the shape of `x`, {x.shape}; got "
                         f"{residual.shape}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _batch_norm_closed_form(x, scale, bias, residual, epsilon, dtype, relu):
    y, mean, var, _ = _batch_norm_forward(x, scale, bias, residual, epsilon, None, dtype, relu)
    return y, mean, var


def _compute_dtype(x):
    """float32 for half-precision activations (and float32), float64 for float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _normalized(x32, mean, rstd, scale, bias, residual, relu, dtype):
    """``act((x - mean) * rstd * scale + bias + residual)`` cast to ``dtype``: the output of
    training (batch statistics) and evaluation (running statistics) alike."""
    z = (x32 - mean) * rstd * scale + bias
    if residual is not None:
        z = z + _upcast_exactly(residual, z.dtype)
    if relu:
        z = jax.nn.relu(z)
    return z.astype(dtype)


def _upcast_exactly(x, dtype):
    """``x.astype(dtype)``, but for bfloat16 -> float32 written so that XLA keeps it.

    A block's shortcut is the previous block's output: ``y = relu(...).astype(bfloat16)``.
    XLA (``xla_allow_excess_precision``, on by default) folds ``convert(convert(f32 -> bf16)
    -> f32)`` back to the float32 value, and then on GPU it fuses the whole elementwise
    computation of ``y`` into every consumer: each block's output was recomputed from the
    convolution outputs of all earlier blocks of its stage, and some were written in
    float32 besides (ResNet-50, batch 1024, bfloat16, XLA's plan for an H200: 122.6 GB per
    training step read and written; 117.5 GB with this, the same as with excess precision
    off: benchmarks/NOTES.md).
    The exact widening by bits (bfloat16 is float32's upper half) is not a ``convert``, so
    the rounded ``y`` the convolution reads is read here too, as the program says. Its
    derivative is the plain conversion's (a custom JVP: ``bitcast_convert_type`` has none)."""
    if x.dtype == jnp.bfloat16 and dtype == jnp.float32:
        return _bfloat16_to_float32(x)
    return x.astype(dtype)


@jax.custom_jvp
def _bfloat16_to_float32(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@_bfloat16_to_float32.defjvp
def _bfloat16_to_float32_jvp(primals, tangents):
    return _bfloat16_to_float32(primals[0]), tangents[0].astype(jnp.float32)


def _batch_norm_forward(x, scale, bias, residual, epsilon, axis_name, dtype, relu):
    x32 = x.astype(_compute_dtype(x))
    mean, var = _batch_statistics(x32, axis_name)
    rstd = jax.lax.rsqrt(var + epsilon)
    return _normalized(x32, mean, rstd, scale, bias, residual, relu, dtype), mean, var, rstd


def _batch_norm_closed_form_fwd(x, scale, bias, residual, epsilon, dtype, relu):
    y, mean, var, rstd = _batch_norm_forward(x, scale, bias, residual, epsilon, None, dtype,
                                             relu)
    # The residual's dtype, for its cotangent, in an empty array (residuals must be arrays).
    residual_dtype = None if residual is None else jnp.zeros((0,), residual.dtype)
    # The ReLU's mask for the backward pass. Without a shortcut it is recomputed from x,
    # which the backward pass reads anyway (reading y as well cost two more reads of an
    # activation). With one, recomputing would read the shortcut, so the mask is saved: as
    # bits, 8 channels to a byte, written by the kernel that writes y (1/16 of reading y in
    # each backward pass); as y itself when the channels do not split into bytes.
    mask = None
    if relu and residual is not None:
        mask = _pack_mask(y > 0) if y.shape[-1] % 8 == 0 else y
    return (y, mean, var), (x, scale, bias, mean, rstd, mask, residual_dtype)


def _pack_mask(active):
    """``[..., C]`` booleans (``C % 8 == 0``) -> ``[..., C // 8]`` uint8, channel ``8 j + k``
    in bit ``k`` of byte ``j``."""
    bits = active.astype(jnp.uint8).reshape(active.shape[:-1] + (active.shape[-1] // 8, 8))
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def _unpack_mask(packed):
    """Inverse of :func:`_pack_mask`."""
    bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(packed.shape[:-1] + (packed.shape[-1] * 8,)).astype(bool)


def _batch_norm_closed_form_bwd(epsilon, dtype, relu, residuals, cotangents):
    x, scale, bias, mean, rstd, mask, residual_dtype = residuals
    g_y, g_mean, g_var = cotangents
    g = g_y.astype(_compute_dtype(x))
    x_hat = (x.astype(_compute_dtype(x)) - mean) * rstd
    if relu:
        if mask is None:
            # y > 0 where the pre-activation is > 0 (the forward's formula, term by term; only
            # a value within rounding of 0 could fall the other way in another fused kernel).
            active = x_hat * scale + bias > 0
        else:
            active = _unpack_mask(mask) if mask.dtype == jnp.uint8 else mask > 0
        g = jnp.where(active, g, 0.0)
    sum_g, sum_g_x_hat = _channel_sums(g, g * x_hat)
    count = _batch_count(x, None)
    dx = scale * rstd * (g - sum_g / count - x_hat * (sum_g_x_hat / count))
    # Through the returned statistics: d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n.
    dx = dx + (g_mean + 2.0 * g_var * (x_hat / rstd)) / count
    d_residual = None if residual_dtype is None else g.astype(residual_dtype.dtype)
    # Cotangents in their primals' dtypes (float32 parameters here; any float works).
    return (dx.astype(x.dtype), sum_g_x_hat.astype(scale.dtype), sum_g.astype(bias.dtype),
            d_residual)


_batch_norm_closed_form.defvjp(_batch_norm_closed_form_fwd, _batch_norm_closed_form_bwd)


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics, parameters and statistics in float32.

    Training mode normalises with the batch's statistics through
    :func:`batch_norm_train` (closed-form gradient); evaluation mode with the running
    ones.

    Attributes:
      use_running_average: evaluation mode (use the running statistics).
      momentum: PyTorch's momentum (weight of the *new* batch statistic).
      epsilon: added to the variance.
      axis_name: mesh / ``shard_map`` axis to average batch statistics over, so
        that every device normalises with the global batch's statistics. Not
        needed under ``jit`` with a sharded batch, where the mean is global.
      dtype: output dtype (the compute dtype of the model).
      relu: apply a ReLU to the output (``relu(norm(x) + residual)``), fused into the
        normalisation and its gradient (:func:`batch_norm_train`). The parameter and
        statistics names are those of a plain BatchNorm.
    """
    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x, residual=None):
        """``norm(x)``, plus ``residual`` (same shape; e.g. a block's shortcut) if given,
        then the ReLU if ``relu``."""
        _check_residual(x, residual)
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            return _normalized(x.astype(jnp.float32), mean, jax.lax.rsqrt(var + self.epsilon),
                               scale, bias, residual, self.relu, self.dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name, self.dtype,
                                        residual=residual, relu=self.relu)
        if not self.is_initializing():
            # The running variance is the unbiased one (PyTorch); statistics carry no gradient.
            mean, var = jax.lax.stop_gradient((mean, var))
            count = _batch_count(x, self.axis_name)
            unbiased = var * (count / jnp.maximum(count - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y
