"""Wide-ResNet-26-10 as the reference builds it (``Net/wide_resnet.py``).

Post-activation BasicBlocks (conv-BN-ReLU-conv-BN, add, ReLU) in three stages
of ``(depth - 2) / 6 = 4`` blocks with 16k/32k/64k planes (k = 10: 160/320/640),
a 3x3 stem with 16 channels, projection shortcuts of conv 1x1 + BN, 8x8
average pooling and a linear head. Unlike the other models, the reference
initialises every convolution with He-normal over fan-out
(``N(0, sqrt(2 / (k * k * out_channels)))``); BN and the linear layer keep
PyTorch's defaults.
"""

from __future__ import annotations

import jax.numpy as jnp

from calib_jax.models.layers import he_normal_fan_out
from calib_jax.models.resnet import BasicBlock, ResNet


def wide_resnet(num_classes: int, depth: int = 26, width: int = 10, dtype=jnp.float32):
    """A CIFAR Wide-ResNet-``depth``-``width`` (``depth = 6n + 2``)."""
    if (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n + 2 (e.g. 26), got {depth}.")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), (16 * width, 32 * width, 64 * width), num_classes,
                  stem_width=16, conv_init=he_normal_fan_out, dtype=dtype)


def wide_resnet_26_10(num_classes: int, dtype=jnp.float32):
    return wide_resnet(num_classes, 26, 10, dtype)
