"""Training building blocks: the paper's losses by name, the reference optimiser,
a jitted train step over a Flax model, and batched evaluation.

Data parallelism is plain ``jax.jit`` over a ``('data',)`` mesh: put the
state on the mesh replicated (:func:`replicate`) and the batch split over the
data axis (:func:`batch_sharding`, e.g. from ``pipeline.train_batch``); XLA
then all-reduces the gradients, and BatchNorm statistics and batch-coupled
losses (MMCE) are computed over the **global** batch, exactly as on one
device. Orbax checkpoints and the experiment CLI are the training issue's
remaining work. What is here is already the reference recipe:

* losses reduced as the reference does (sum for CE / focal / FLSD / FLSc /
  label smoothing, mean for Brier, ``N * (mean CE + lambda * MMCE_w)`` for MMCE);
* global-norm clipping at 2 of the loss gradient, then weight decay 5e-4 added
  to the gradient (PyTorch SGD's ``weight_decay``), then SGD momentum 0.9;
* learning rate 0.1, x0.1 at epochs 150 and 250 (``early_decay=True`` gives
  the reference's one-epoch-early decay: its ``scheduler.step()`` runs at the
  start of each epoch, so epochs 149 and 249 already use the smaller rate).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from calib_jax import losses
from calib_jax.data import pipeline

__all__ = ["LOSS_NAMES", "TrainState", "batch_loss", "batch_sharding", "create_train_state",
           "make_optimizer", "piecewise_lr", "predict", "replicate", "replicated", "train_step"]

LOSS_NAMES = ("ce", "focal", "flsd53", "flsd52", "flsc531", "brier", "mmce_weighted",
              "label_smoothing")


def batch_loss(name: str, logits, labels, epoch, *, gamma: float = 3.0, mmce_lambda: float = 2.0,
               smoothing: float = 0.05):
    """The reference's batch objective for loss ``name`` (a scalar).

    ``epoch`` is used by ``flsc531`` only (gamma 5 / 3 / 1 from epochs 0 / 100 / 250).
    """
    if name == "ce":
        return jnp.sum(losses.cross_entropy(logits, labels))
    if name == "focal":
        return jnp.sum(losses.focal_loss(logits, labels, gamma=gamma))
    if name == "flsd53":
        return jnp.sum(losses.adaptive_focal_loss(logits, labels, gamma=3.0))
    if name == "flsd52":
        return jnp.sum(losses.adaptive_focal_loss(logits, labels, gamma=2.0))
    if name == "flsc531":
        return jnp.sum(losses.focal_loss(logits, labels, gamma=losses.focal_gamma_schedule(epoch)))
    if name == "brier":
        return jnp.mean(losses.brier_score(logits, labels))
    if name == "mmce_weighted":
        n = logits.shape[0]
        return n * (jnp.mean(losses.cross_entropy(logits, labels))
                    + mmce_lambda * losses.mmce_weighted(logits, labels))
    if name == "label_smoothing":
        return jnp.sum(losses.label_smoothing_cross_entropy(logits, labels, smoothing=smoothing))
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}.")


def piecewise_lr(base_lr: float, steps_per_epoch: int, boundaries=(150, 250), factor=0.1,
                 early_decay: bool = False):
    """Step-decay schedule by epoch (optax schedule over steps)."""
    shift = 1 if early_decay else 0
    return optax.piecewise_constant_schedule(
        base_lr, {max(0, (b - shift)) * steps_per_epoch: factor for b in boundaries})


def make_optimizer(learning_rate, *, momentum=0.9, weight_decay=5e-4, clip_norm=2.0):
    """clip(global norm) -> + weight_decay * params -> SGD momentum, as the reference."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.sgd(learning_rate, momentum=momentum or None),
    )


# optax >= 0.2.5 has optax.tree.norm; global_norm is deprecated there.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_train_state(rng, model, tx, input_shape) -> TrainState:
    """Initialises parameters, BatchNorm statistics and optimiser state."""
    variables = jax.jit(model.init, static_argnames="train")(
        rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      apply_fn=model.apply, tx=tx)


def replicated(mesh):
    """Sharding that keeps a full copy on every device of ``mesh``."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh):
    """Sharding that splits the leading (batch) axis over the mesh's ``data`` axis."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def replicate(state: TrainState, mesh) -> TrainState:
    """``state`` with every array replicated over ``mesh``."""
    return jax.device_put(state, replicated(mesh))


@functools.partial(jax.jit, static_argnames=("loss_name", "mean", "std", "dtype"),
                   donate_argnums=(0,))
def train_step(state: TrainState, images, labels, epoch, *, loss_name: str, mean, std,
               dtype=jnp.float32):
    """One SGD step on a batch of uint8 images (already augmented); returns (state, metrics)."""
    x = pipeline.normalize(images, mean, std, dtype)

    def objective(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
        return batch_loss(loss_name, logits, labels, epoch), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "correct": correct, "grad_norm": _tree_norm(grads)}


@functools.partial(jax.jit, static_argnames=("apply_fn", "mean", "std", "dtype"))
def _predict_batch(apply_fn, params, batch_stats, images, mean, std, dtype):
    x = pipeline.normalize(images, mean, std, dtype)
    return apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)


def predict(state: TrainState, images: np.ndarray, *, mean, std, batch_size: int = 500,
            dtype=jnp.float32) -> np.ndarray:
    """Logits ``[N, C]`` of every image (fixed-size padded batches, one compilation)."""
    out = []
    for batch in pipeline.eval_batches(images.shape[0], batch_size):
        logits = _predict_batch(state.apply_fn, state.params, state.batch_stats,
                                jnp.asarray(images[batch.index]), tuple(mean), tuple(std), dtype)
        out.append(np.asarray(logits)[batch.mask])
    return np.concatenate(out)
