"""ResNets of the reference (``Net/resnet.py``, ``Net/resnet_tiny_imagenet.py``) and small CIFAR ResNets.

Reference ResNets (kuangliu-style): 3x3 stride-1 stem with 64 channels, no
max-pool, four stages of 64/128/256/512 planes, 4x4 average pooling, a linear
head. ``resnet50`` is Bottleneck [3, 4, 6, 3]; the reference's "ResNet-110" is
Bottleneck [3, 4, 26, 3] (not He et al.'s CIFAR ResNet-110). The Tiny-ImageNet
variant pools to 2x2 and flattens (fc over 2048 * 4). PyTorch default
initialisation throughout (the reference overrides nothing here).

Small variants for tests and CPU demos: He et al.'s CIFAR ResNets
(``resnet8``, ``resnet20``: BasicBlock, 16/32/64 channels, 3 stages) with the
same conventions.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from calib_jax.models.layers import BatchNorm, TorchDense, torch_kernel_init


def _conv(features, kernel, stride=1, dtype=jnp.float32, kernel_init=torch_kernel_init, name=None):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init, name=name)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    kernel_init: Any = torch_kernel_init
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        conv = partial(_conv, dtype=self.dtype, kernel_init=self.kernel_init)
        out = norm(relu=True)(conv(self.planes, 3, self.stride)(x))
        out = conv(self.planes, 3)(out)
        # Constructed before the shortcut's so that the names (BatchNorm_1, then _2)
        # stay those of the unfused block: relu(norm(out) + shortcut), one fused op.
        last_norm = norm(relu=True)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = norm()(conv(self.planes, 1, self.stride)(x))
        return last_norm(out, residual=x)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    kernel_init: Any = torch_kernel_init
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        conv = partial(_conv, dtype=self.dtype, kernel_init=self.kernel_init)
        out = norm(relu=True)(conv(self.planes, 1)(x))
        out = norm(relu=True)(conv(self.planes, 3, self.stride)(out))
        out = conv(self.planes * 4, 1)(out)
        last_norm = norm(relu=True)  # before the shortcut's: names as in BasicBlock
        if self.stride != 1 or x.shape[-1] != self.planes * 4:
            x = norm()(conv(self.planes * 4, 1, self.stride)(x))
        return last_norm(out, residual=x)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of blocks, global pooling, linear head.

    Attributes:
      block: ``BasicBlock`` or ``Bottleneck``.
      stage_sizes: blocks per stage.
      widths: planes per stage (the first stage has stride 1, the others 2).
      num_classes: output logits.
      stem_width: channels of the stem convolution.
      pool_size: final spatial size of the average pooling (1 = global average;
        the Tiny-ImageNet variant uses 2 and flattens).
      conv_init: initialiser of every convolution (PyTorch's default here).
      dtype: compute dtype (parameters and batch statistics stay float32).
    """
    block: Any
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    num_classes: int
    stem_width: int = 64
    pool_size: int = 1
    conv_init: Any = torch_kernel_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        x = _conv(self.stem_width, 3, dtype=self.dtype, kernel_init=self.conv_init,
                  name="stem")(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, relu=True)(x)
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                x = self.block(width, stride, dtype=self.dtype, kernel_init=self.conv_init)(x, train)
        h, w = x.shape[1:3]
        p = self.pool_size
        x = nn.avg_pool(x, (h // p, w // p), (h // p, w // p))
        x = x.reshape(x.shape[0], -1)
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def resnet50(num_classes: int, dtype=jnp.float32):
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes, dtype=dtype)


def resnet110(num_classes: int, dtype=jnp.float32):
    """The reference's "ResNet-110": Bottleneck [3, 4, 26, 3] (3 * 36 + 2 layers)."""
    return ResNet(Bottleneck, (3, 4, 26, 3), (64, 128, 256, 512), num_classes, dtype=dtype)


def resnet50_tiny_imagenet(num_classes: int = 200, dtype=jnp.float32):
    """ResNet-50 for 64x64 inputs: 2x2 final pooling, fc over 2048 * 4 features."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes, pool_size=2,
                  dtype=dtype)


def resnet20(num_classes: int, dtype=jnp.float32):
    """He et al.'s CIFAR ResNet-20 (0.27 M parameters): for CPU demos."""
    return ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), num_classes, stem_width=16, dtype=dtype)


def resnet8(num_classes: int, dtype=jnp.float32):
    """A ResNet-8 (BasicBlock [1, 1, 1], 16/32/64 channels, 78 k parameters): for tests."""
    return ResNet(BasicBlock, (1, 1, 1), (16, 32, 64), num_classes, stem_width=16, dtype=dtype)
