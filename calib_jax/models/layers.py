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


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics, parameters and statistics in float32.

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
        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean = jnp.mean(x32, axis=axes)
            mean_sq = jnp.mean(jnp.square(x32), axis=axes)
            count = np.prod([x.shape[a] for a in axes])
            if self.axis_name is not None:
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)
