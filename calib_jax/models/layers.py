"""Layers shared by the model zoo: PyTorch-matching BatchNorm and initialisers.

PyTorch defaults, which the reference keeps unless a model overrides them:

* ``Conv`` / ``Linear`` weights: ``kaiming_uniform_(a=sqrt(5))``, i.e.
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` = ``variance_scaling(1/3, fan_in, uniform)``;
* biases: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
* ``BatchNorm``: scale 1, bias 0, momentum 0.1 (running = 0.9 running + 0.1 batch),
  eps 1e-5, running variance updated with the **unbiased** batch variance while
  the normalisation uses the biased one;
* ``Embedding``: ``N(0, 1)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

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


def _batch_statistics(x32, axis_name):
    """Per-channel mean and biased variance over every axis but the last (and over
    ``axis_name``'s devices), in one pass over ``x``: E[x] and E[x^2]."""
    axes = tuple(range(x32.ndim - 1))
    mean = jnp.mean(x32, axis=axes)
    mean_sq = jnp.mean(jnp.square(x32), axis=axes)
    if axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _batch_count(x, axis_name):
    count = np.prod([x.shape[a] for a in range(x.ndim - 1)])
    return count if axis_name is None else count * jax.lax.psum(1, axis_name)


def batch_norm_train(x, scale, bias, epsilon, axis_name, dtype):
    """Training-mode batch normalisation over every axis of ``x`` but the last.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with the batch's mean and
    biased variance (float32 for half-precision ``x``), ``y`` cast to ``dtype``.

    The gradient is the closed form (a custom VJP) instead of autodiff of the forward
    pass (except under ``shard_map``, below): with ``x_hat = (x - mean) * rstd`` and
    the cotangent ``g`` of ``y``, ``dx = scale * rstd * (g - mean(g) - x_hat * mean(g * x_hat))``,
    ``dscale = sum(g * x_hat)``, ``dbias = sum(g)``. The backward pass is then one fused
    reduction (``sum g``, ``sum g * x_hat``) and one elementwise pass that writes ``dx``
    in ``x``'s dtype, and the forward pass saves only ``x`` and two per-channel vectors.
    Autodiff of the forward formula saves and reads float32 copies of activation-sized
    tensors: on an H200 (ResNet-50, batch 128, bfloat16) the BatchNorm reductions and
    elementwise fusions were over half of the step's kernel time (benchmarks/NOTES.md).
    The two agree to float rounding (``tests/test_models.py``), except where the variance
    is clamped at 0 (a constant channel), whose autodiff gradient through the clamp is 0.

    Args:
      x: ``[..., C]`` activations (any float dtype).
      scale, bias: ``[C]`` float32.
      epsilon: added to the variance.
      axis_name: ``shard_map`` / mesh axis whose devices share the batch statistics
        (None under ``jit`` with a sharded batch: the reductions are global there).
      dtype: dtype of ``y``.

    Returns:
      ``(y, mean, var)``: the normalised activations and the batch statistics (float32
      ``[C]``; differentiable too).

    With ``axis_name`` (inside ``shard_map``) the gradient is autodiff's: a custom VJP
    there must return the replicated parameters' cotangents typed as ``shard_map``'s
    varying-axis checks expect, which its backward rule cannot see when it is traced.
    ``jax.jit`` over a sharded batch, the training loop's data parallelism, takes the
    closed form.
    """
    if axis_name is not None:
        y, mean, var, _ = _batch_norm_forward(x, scale, bias, epsilon, axis_name, dtype)
        return y, mean, var
    return _batch_norm_closed_form(x, scale, bias, epsilon, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_closed_form(x, scale, bias, epsilon, dtype):
    y, mean, var, _ = _batch_norm_forward(x, scale, bias, epsilon, None, dtype)
    return y, mean, var


def _compute_dtype(x):
    """float32 for half-precision activations (and float32), float64 for float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _batch_norm_forward(x, scale, bias, epsilon, axis_name, dtype):
    x32 = x.astype(_compute_dtype(x))
    mean, var = _batch_statistics(x32, axis_name)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * rstd * scale + bias).astype(dtype)
    return y, mean, var, rstd


def _batch_norm_closed_form_fwd(x, scale, bias, epsilon, dtype):
    y, mean, var, rstd = _batch_norm_forward(x, scale, bias, epsilon, None, dtype)
    return (y, mean, var), (x, scale, bias, mean, rstd)


def _batch_norm_closed_form_bwd(epsilon, dtype, residuals, cotangents):
    x, scale, bias, mean, rstd = residuals
    g_y, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    g = g_y.astype(_compute_dtype(x))
    x_hat = (x.astype(_compute_dtype(x)) - mean) * rstd
    sum_g = jnp.sum(g, axis=axes)
    sum_g_x_hat = jnp.sum(g * x_hat, axis=axes)
    count = _batch_count(x, None)
    dx = scale * rstd * (g - sum_g / count - x_hat * (sum_g_x_hat / count))
    # Through the returned statistics: d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n.
    dx = dx + (g_mean + 2.0 * g_var * (x_hat / rstd)) / count
    # Cotangents in their primals' dtypes (float32 parameters here; any float works).
    return dx.astype(x.dtype), sum_g_x_hat.astype(scale.dtype), sum_g.astype(bias.dtype)


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
    """
    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
            return y.astype(self.dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name, self.dtype)
        if not self.is_initializing():
            # The running variance is the unbiased one (PyTorch); statistics carry no gradient.
            mean, var = jax.lax.stop_gradient((mean, var))
            count = _batch_count(x, self.axis_name)
            unbiased = var * (count / jnp.maximum(count - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y
