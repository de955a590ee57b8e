"""DenseNet-121 for CIFAR as the reference builds it (``Net/densenet.py``).

3x3 stem with ``2 * growth = 64`` channels (no pooling), dense blocks of
[6, 12, 24, 16] bottleneck layers (BN-ReLU-conv1x1 to ``4 * growth``,
BN-ReLU-conv3x3 to ``growth``; the new features are concatenated *before* the
input, ``cat([new, x])``), transitions BN-ReLU-conv1x1 to
``floor(channels * 0.5)`` then 2x2 average pooling, a final BN-ReLU, 4x4
average pooling and a linear head. PyTorch default initialisation.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from calib_jax.models.layers import BatchNorm, TorchDense, torch_kernel_init


def _conv(features, kernel, dtype):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=False,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init)


class DenseNet(nn.Module):
    block_sizes: Sequence[int]
    num_classes: int
    growth_rate: int = 32
    reduction: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        g = self.growth_rate
        x = _conv(2 * g, 3, self.dtype)(x.astype(self.dtype))
        for i, size in enumerate(self.block_sizes):
            for _ in range(size):
                out = _conv(4 * g, 1, self.dtype)(norm(relu=True)(x))
                out = _conv(g, 3, self.dtype)(norm(relu=True)(out))
                x = jnp.concatenate([out, x], axis=-1)
            if i < len(self.block_sizes) - 1:
                x = _conv(int(math.floor(x.shape[-1] * self.reduction)), 1,
                          self.dtype)(norm(relu=True)(x))
                x = nn.avg_pool(x, (2, 2), (2, 2))
        x = norm(relu=True)(x)
        x = nn.avg_pool(x, x.shape[1:3], x.shape[1:3]).reshape(x.shape[0], -1)
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def densenet121(num_classes: int, dtype=jnp.float32):
    return DenseNet((6, 12, 24, 16), num_classes, growth_rate=32, dtype=dtype)
