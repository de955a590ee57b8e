"""The paper's networks, as Flax **Linen** modules, and a registry by name.

Why Linen rather than NNX: every model here is a pure function of
``(params, batch_stats, inputs)``, which is exactly what the data-parallel
train step, ``vmap`` over stacked runs and Orbax checkpoints want to handle,
with no object state to thread through transformations; Linen is also what
the Flax ``examples/imagenet`` recipe we follow uses.

Conventions: NHWC images, any float dtype in (cast to the model's compute
``dtype``; parameters and BatchNorm statistics stay float32), logits out in
float32. ``model.apply(variables, x, train=True, mutable=["batch_stats"])``
for training. BatchNorm matches PyTorch (momentum 0.1, eps 1e-5, unbiased
running variance). Initialisers are PyTorch's defaults except where the
reference overrides them (Wide-ResNet: He-normal fan-out convolutions).

Trainable parameter counts equal the reference's (``tests/test_models.py``):

| name | 10 classes | 100 classes |
| --- | --- | --- |
| resnet50 | 23,520,842 | 23,705,252 |
| resnet110 | 45,864,522 | 46,048,932 |
| wide_resnet_26_10 | 36,481,434 | 36,539,124 |
| densenet121 | 6,956,298 | 7,048,548 |
| resnet50_tiny_imagenet | 25,138,952 (200 classes) | |
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax.models import densenet, resnet, text, wide_resnet
from calib_jax.models.layers import BatchNorm
from calib_jax.models.text import BinaryTreeLSTM, GlobalPoolingCNN, NodeLogits, Trees

__all__ = ["BatchNorm", "BinaryTreeLSTM", "GlobalPoolingCNN", "NodeLogits", "Trees", "densenet",
           "get", "input_shape", "resnet", "text", "wide_resnet", "names", "param_count"]

_IMAGE_MODELS: dict[str, tuple[Callable, int]] = {
    # name: (constructor, input height/width)
    "resnet50": (resnet.resnet50, 32),
    "resnet110": (resnet.resnet110, 32),
    "wide_resnet_26_10": (wide_resnet.wide_resnet_26_10, 32),
    "densenet121": (densenet.densenet121, 32),
    "resnet50_tiny_imagenet": (resnet.resnet50_tiny_imagenet, 64),
    "resnet20": (resnet.resnet20, 32),
    "resnet8": (resnet.resnet8, 32),
}
_TEXT_MODELS = {"global_pooling_cnn": GlobalPoolingCNN, "tree_lstm": BinaryTreeLSTM}


def names() -> list[str]:
    """Every registered model name."""
    return sorted(_IMAGE_MODELS) + sorted(_TEXT_MODELS)


def get(name: str, num_classes: int, *, dtype=jnp.float32, **kwargs):
    """A model by name: ``get("resnet50", 10, dtype=jnp.bfloat16)``.

    Text models take their own keyword arguments (``vocab_size``,
    ``embeddings``, ``train_embeddings``, ...).
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
        raise ValueError(f"`dtype` must be float32, bfloat16 or float16, got {dtype!r}.")
    if name in _IMAGE_MODELS:
        if kwargs:
            raise TypeError(f"image model {name!r} takes no extra arguments, got {sorted(kwargs)}.")
        return _IMAGE_MODELS[name][0](int(num_classes), dtype=dtype)
    if name in _TEXT_MODELS:
        return _TEXT_MODELS[name](num_classes=int(num_classes), dtype=dtype, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {names()}.")


def input_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    """The NHWC input shape of an image model (``[batch, 32, 32, 3]`` for CIFAR)."""
    if name not in _IMAGE_MODELS:
        raise ValueError(f"{name!r} is not an image model; image models: {sorted(_IMAGE_MODELS)}.")
    size = _IMAGE_MODELS[name][1]
    return (batch, size, size, 3)


def param_count(model, *example_inputs) -> int:
    """Trainable parameters of ``model`` (shapes only: nothing is computed)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"])))
