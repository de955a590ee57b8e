"""Training: the paper's losses by name, the reference optimiser, jitted train
steps over a Flax model, several runs as one program, and the
config-driven training loop with Orbax checkpoints (:func:`train_and_evaluate`).

The compiled units, from small to large:

* :func:`train_step` -- one step on a given batch (for your own loops);
* :func:`train_steps` -- many steps in one call, each batch gathered, cropped
  and flipped on the device (the training loop's unit: no host work per step);
* :func:`multi_train_steps` -- the same for K runs (losses, gammas, seeds) as
  one program over stacked states (:func:`stack_states`), members vmapped or
  one after another.

Data parallelism is plain ``jax.jit`` over a ``('data',)`` mesh: put the
state on the mesh replicated (:func:`replicate`) and the batch split over the
data axis (:func:`batch_sharding`, e.g. from ``pipeline.train_batch``); XLA
then all-reduces the gradients, and BatchNorm statistics and batch-coupled
losses (MMCE) are computed over the **global** batch, exactly as on one
device. The recipe is the reference's:

* losses reduced as the reference does (sum for CE / focal / FLSD / FLSc /
  label smoothing, mean for Brier, ``N * (mean CE + lambda * MMCE_w)`` for MMCE);
* global-norm clipping at 2 of the loss gradient, then weight decay 5e-4 added
  to the gradient (PyTorch SGD's ``weight_decay``), then SGD momentum 0.9;
* learning rate 0.1, x0.1 at epochs 150 and 250 (``early_decay=True`` gives
  the reference's one-epoch-early decay: its ``scheduler.step()`` runs at the
  start of each epoch, so epochs 149 and 249 already use the smaller rate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from calib_jax import losses
from calib_jax.data import pipeline
from calib_jax.files import (DirectoryInUseError, atomic_write_text, hold_directory_lock,
                             unwritable_reason)
from calib_jax.models.text import NodeLogits
from calib_jax.validation import is_concrete

__all__ = ["ConfigError", "EVAL_CHECKPOINTS", "EXECUTION_FIELDS", "GPU_GRAPH_CONVOLUTIONS",
           "LOSS_NAMES", "LossSpec", "PARAM_LAYOUTS", "RESUMABLE_FIELDS", "TrainState",
           "TrainingDivergedError",
           "abstract_state_for_config", "batch_loss", "batch_sharding",
           "check_resumable", "clip_by_global_norm", "concise_warnings", "config_differences",
           "create_train_state", "default_device", "default_flat_params", "default_member_mode",
           "default_steps_per_call", "default_unroll", "exit_on_sigterm",
           "field_differences", "global_norm", "host_init_device", "loop_compiler_options",
           "loop_functions", "make_optimizer", "member_dir",
           "multi_train_steps", "piecewise_lr", "predict", "predict_members",
           "replicate", "replicated", "stack_states", "table_checkpoint",
           "train_and_evaluate", "train_step", "train_steps", "unstack_state",
           "with_flat_params"]

LOSS_NAMES = ("ce", "focal", "flsd53", "flsd52", "flsc531", "brier", "mmce_weighted",
              "label_smoothing")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A training objective: the loss name and its hyper-parameters (hashable, static).

    Attributes:
      name: one of :data:`LOSS_NAMES`.
      gamma: for ``focal``.
      mmce_lambda: for ``mmce_weighted``.
      smoothing: for ``label_smoothing``.
      flsd_threshold: the lower FLSD tier bound (0.2; the reference's text runs use 0.19).
      mean_reduction: divide the reference's batch *sums* by the batch size (the
        reference's text runs); Brier is a mean either way.
      gamma_boundaries: epochs where FLSc-531's gamma goes 5 -> 3 -> 1 (SST: (3, 7)).
    """
    name: str = "ce"
    gamma: float = 3.0
    mmce_lambda: float = 2.0
    smoothing: float = 0.05
    flsd_threshold: float = 0.2
    mean_reduction: bool = False
    gamma_boundaries: tuple = (100, 250)

    @classmethod
    def from_config(cls, config) -> "LossSpec":
        return cls(config.loss, float(config.gamma), float(config.mmce_lambda),
                   float(config.smoothing), float(config.get("flsd_threshold", 0.2)),
                   bool(config.get("loss_mean", False)),
                   tuple(int(b) for b in config.get("gamma_boundaries", (100, 250))))


def batch_loss(name, logits, labels, epoch, **options):
    """The reference's batch objective (a scalar).

    Args:
      name: a loss name or a :class:`LossSpec`; with a name, ``options`` are
        LossSpec fields (``gamma``, ``mmce_lambda``, ``smoothing``, ...).
      logits, labels: ``[B, C]`` and ``[B]``; or, for phrase-level training (SST as the
        reference trains it), every node's logits ``[B, M, C]`` and labels ``[B, M]``, -1
        where a node has no label. Then each labelled node is an example and the batch is
        still ``B`` trees: the reference sums a tree's node losses and divides the batch's
        sum by ``B`` (``mean_reduction``); Brier is that sum over ``B`` as well, and MMCE's
        ``N`` is the number of labelled nodes, its kernel taken over all of them.
      epoch: used by ``flsc531`` (gamma 5 / 3 / 1 from epochs 0 / 100 / 250).
    """
    spec = name if isinstance(name, LossSpec) else LossSpec(name, **options)
    tiers = dict(thresholds=(spec.flsd_threshold, 0.5), gammas=(5.0, 3.0))
    n = logits.shape[0]
    where = None
    if logits.ndim == 3:
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"node logits {logits.shape} need labels [B, M] = "
                             f"{logits.shape[:2]}, got {labels.shape}.")
        where = (labels >= 0).reshape(-1)
        # Unlabelled nodes (padding) read as zero logits of class 0, then masked: neither
        # their values nor their gradients reach the loss.
        logits = jnp.where(where[:, None], logits.reshape(-1, logits.shape[-1]), 0.0)
        labels = jnp.maximum(labels, 0).reshape(-1)

    def total(values):
        return jnp.sum(values if where is None else jnp.where(where, values, 0.0))
    per_example = {
        "ce": lambda: losses.cross_entropy(logits, labels),
        "focal": lambda: losses.focal_loss(logits, labels, gamma=spec.gamma),
        "flsd53": lambda: losses.adaptive_focal_loss(logits, labels, gamma=3.0, **tiers),
        "flsd52": lambda: losses.adaptive_focal_loss(logits, labels, gamma=2.0, **tiers),
        "flsc531": lambda: losses.focal_loss(
            logits, labels,
            gamma=losses.focal_gamma_schedule(epoch, boundaries=spec.gamma_boundaries)),
        "label_smoothing": lambda: losses.label_smoothing_cross_entropy(
            logits, labels, smoothing=spec.smoothing),
    }
    if spec.name in per_example:
        summed = total(per_example[spec.name]())
    elif spec.name == "brier":
        brier = losses.brier_score(logits, labels)
        return jnp.mean(brier) if where is None else total(brier) / n
    elif spec.name == "mmce_weighted":
        # N * (mean CE + lambda * MMCE_w), N the examples (labelled nodes) that count.
        count = n if where is None else jnp.sum(where)
        mean_ce = total(losses.cross_entropy(logits, labels)) / count
        summed = count * (mean_ce + spec.mmce_lambda
                          * losses.mmce_weighted(logits, labels, where=where))
    else:
        raise ValueError(f"unknown loss {spec.name!r}; choose one of {LOSS_NAMES}.")
    return summed / n if spec.mean_reduction else summed


def piecewise_lr(base_lr: float, steps_per_epoch: int, boundaries=(150, 250), factor=0.1,
                 early_decay: bool = False):
    """Step-decay schedule by epoch (optax schedule over steps)."""
    shift = 1 if early_decay else 0
    return optax.piecewise_constant_schedule(
        base_lr, {max(0, (b - shift)) * steps_per_epoch: factor for b in boundaries})


def make_optimizer(learning_rate, *, momentum=0.9, weight_decay=5e-4, clip_norm=2.0,
                   name: str = "sgd"):
    """clip(global norm) -> + weight_decay * params -> SGD momentum, as the reference.

    ``name="adam"`` (the reference's 20 Newsgroups runs: PyTorch Adam defaults) or
    ``"adagrad"`` (its SST runs) replace the last stage.
    """
    if name == "sgd":
        last = optax.sgd(learning_rate, momentum=momentum or None)
    elif name == "adam":
        last = optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
    elif name == "adagrad":
        # PyTorch's Adagrad: accumulator starts at 0, eps 1e-10.
        last = optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=1e-10)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adagrad.")
    return optax.chain(
        clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        last,
    )


def global_norm(tree) -> jax.Array:
    """The L2 norm of all of ``tree``'s leaves together (float32 at least), as one
    reduction over their concatenation.

    Equal to ``optax.global_norm`` up to float rounding. optax sums each leaf apart, and
    XLA:GPU then runs one reduction kernel (or two) per leaf: ~195 small kernels per
    ResNet-50 step, where the concatenation costs one copy of the gradient (94 MB) and
    two or three kernels (benchmarks/NOTES.md, "Kernels per step without a GPU"). Timed on
    an H200 (ResNet-50, batch 128, bfloat16), the two were equally fast within noise
    (13,799 vs 13,886 img/s for optax's)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = functools.reduce(jnp.promote_types, [x.dtype for x in leaves], jnp.float32)
    flat = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(flat)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` with :func:`global_norm` (one reduction instead of
    one per leaf): updates scaled by ``max_norm / norm`` when their norm exceeds
    ``max_norm``. Its state is optax's (empty), so checkpoints are interchangeable."""
    if not max_norm > 0:
        raise ValueError(f"`max_norm` must be positive, got {max_norm}.")

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, parameters, BatchNorm statistics,
    optimiser state and the dropout key (the data order and augmentation come
    from ``(seed, epoch, step)``)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def _init(model, rng, input_shape, input_dtype):
    return model.init(rng, jnp.zeros(input_shape, input_dtype), train=False)


# One compilation per (model, shape): K members (or K tests) initialise without
# recompiling (a fresh jax.jit(model.init) per call would compile every time).
_init_variables = jax.jit(_init, static_argnums=(0, 2, 3))


def default_device():
    """The device that uncommitted arrays, and jitted calls on them, go to:
    ``jax.default_device``'s when one is set, else the first local device."""
    device = jax.config.jax_default_device
    if isinstance(device, str):  # a platform name: 'cpu', 'gpu', 'tpu'
        return jax.local_devices(backend=device)[0]
    return device if device is not None else jax.local_devices()[0]


def host_init_device(target):
    """Where :func:`create_train_state` computes the initial variables of a state that is
    to live on ``target``: the host's CPU device when ``target`` is an accelerator; None
    (``target`` itself) when it is a CPU, when the process has no CPU backend
    (``JAX_PLATFORMS`` without ``cpu``), or when the run spans several processes
    (``jax.distributed``): every process initialises its own replicas of the state, which
    must be equal, and hosts of different CPU models could round a draw differently, while
    identical accelerators compute identical numbers.

    Why: a model's initialisation is one random draw per parameter, and XLA:GPU compiles
    each draw as a kernel of its own (threefry unrolled), while XLA:CPU compiles them as
    loops: compiling ``jit(model.init)`` for an H200 took 12.1 s for ResNet-50, 32.4 s for
    ResNet-110, 8.8 s for WRN-26-10 and 33.1 s for DenseNet-121, for XLA:CPU 3.5, 6.2, 2.4
    and 8.7 s, and running it on the host 0.05-0.3 s (a 2-core CPU; benchmarks/NOTES.md,
    "Model initialisation: compile time"). Every training process pays this compile once
    (the evaluation pass initialises nothing: :func:`abstract_state_for_config`)."""
    if target.platform == "cpu" or jax.process_count() > 1:
        return None
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def create_train_state(rng, model, tx, input_shape, input_dtype=jnp.float32, *,
                       init_on_host: bool = True) -> TrainState:
    """Initialises parameters, BatchNorm statistics, optimiser state and the dropout key.

    The state's arrays are uncommitted, on :func:`default_device` (as a plain
    ``model.init`` call would leave them). With ``init_on_host`` (the default) and an
    accelerator as that device, in a single-process run, the variables are computed by
    XLA:CPU on the host and then copied over (see :func:`host_init_device`: 6-26 s less
    compile per process for the paper's CIFAR models on an H200, compiled on a 2-core
    host), so a seed gives the same initial parameters on a CPU and on an accelerator (the
    draws are XLA:CPU's everywhere; another CPU model may round the normal draws' last bit
    differently). ``init_on_host=False`` computes them on the device: for models whose
    parameters do not fit the host's memory, or to keep an accelerator's own rounding.
    """
    init_rng, dropout_rng = jax.random.split(rng)
    # Under a trace (jax.eval_shape, a caller's jit) nothing is computed here: no host
    # round trip to stage into the caller's program.
    host = host_init_device(default_device()) if init_on_host and is_concrete(rng) else None
    if host is not None:
        init_rng = jax.device_put(init_rng, host)  # committed: the jitted init runs there
    try:
        hash(model)
        cached = True
    except TypeError:  # e.g. a module holding a NumPy array (pretrained embeddings)
        cached = False
    if cached:
        variables = _init_variables(model, init_rng, tuple(input_shape), jnp.dtype(input_dtype))
    else:  # not a static argument: a jit of its own, compiled per call
        variables = jax.jit(functools.partial(_init, model), static_argnums=(1, 2))(
            init_rng, tuple(input_shape), jnp.dtype(input_dtype))
    if host is not None:
        # Through NumPy: device_put of a host array without a device leaves it uncommitted
        # on the default device, as the on-device path does.
        variables = jax.device_put(jax.device_get(variables))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=dropout_rng, apply_fn=model.apply, tx=tx)


def replicated(mesh):
    """Sharding that keeps a full copy on every device of ``mesh``."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh):
    """Sharding that splits the leading (batch) axis over the mesh's ``data`` axis."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def replicate(state: TrainState, mesh) -> TrainState:
    """``state`` with every array replicated over ``mesh`` (over several processes: checked
    equal on all of them with one collective, :func:`calib_jax.data.pipeline.put_replicated`)."""
    return pipeline.put_replicated(state, replicated(mesh), what="the initial training state")


def _model_inputs(inputs, mean, std, dtype):
    """Images are normalised on device; token ids (``mean=None``) pass through."""
    return inputs if mean is None else pipeline.normalize(inputs, mean, std, dtype)


def _loss_targets(output, labels):
    """``(accuracy logits, loss logits, loss labels)`` of a model's training output: the
    batch's own for plain logits; a tree model's nodes for :class:`models.text.NodeLogits`
    (phrase-level training: the loss on every labelled node, accuracy on the sentences)."""
    if isinstance(output, NodeLogits):
        return output.logits, output.node_logits, output.node_labels
    return output, output, labels


def _apply_step(state: TrainState, x, labels, loss_fn):
    """The optimiser step shared by :func:`train_step`, :func:`train_steps` and
    :func:`multi_train_steps`; ``loss_fn(logits, labels)`` is the batch objective."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
        output, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                         train=True, mutable=["batch_stats"],
                                         rngs={"dropout": dropout_rng})
        logits, loss_logits, loss_labels = _loss_targets(output, labels)
        return loss_fn(loss_logits, loss_labels), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "correct": correct, "grad_norm": global_norm(grads)}


@functools.partial(jax.jit, static_argnames=("loss_name", "mean", "std", "dtype"),
                   donate_argnums=(0,))
def train_step(state: TrainState, images, labels, epoch, *, loss_name, mean, std,
               dtype=jnp.float32):
    """One optimiser step on a batch; returns ``(state, metrics)``.

    Args:
      images: uint8 images (already augmented), or token ids with ``mean=None``.
      loss_name: a loss name (reference hyper-parameters) or a :class:`LossSpec`.
      mean, std: per-channel normalisation (tuples: static), or None.
    """
    return _train_on_batch(state, images, labels, epoch, loss_name, mean, std, dtype)


def _train_on_batch(state, images, labels, epoch, loss, mean, std, dtype):
    """One step of one run on a raw batch: normalise, then the loss's optimiser step."""
    return _apply_step(state, _model_inputs(images, mean, std, dtype), labels,
                       lambda logits, targets: batch_loss(loss, logits, targets, epoch))


def stack_states(states) -> TrainState:
    """K states of the same model and optimiser, stacked on a new leading axis."""
    # The members' static fields (model, optimiser) are equal but not identical
    # objects, so stack leaves under the first member's tree structure.
    treedef = jax.tree_util.tree_structure(states[0])
    leaves = [jax.tree_util.tree_leaves(s) for s in states]
    if any(len(member) != len(leaves[0]) for member in leaves):
        raise ValueError("`states` must share one model and optimiser structure.")
    return jax.tree_util.tree_unflatten(treedef, _stack_leaves(leaves))


@jax.jit
def _stack_leaves(leaves):
    # One compiled program for all leaves: eager stacking compiles one program per distinct
    # leaf shape (30 among a ResNet-50 state's 430 leaves; six ResNet-50 states on CPU:
    # 3.2-4.3 -> 2.0-2.6 s, and an XLA:GPU compile of even a small stack takes ~60 ms).
    return [jnp.stack(xs) for xs in zip(*leaves)]


def unstack_state(stacked: TrainState, index: int) -> TrainState:
    """Member ``index`` of :func:`stack_states`."""
    return _unstack_state(stacked, index)


@jax.jit
def _unstack_state(stacked, index):
    # One compiled slice of every leaf (index traced: one compilation for all members):
    # eager indexing dispatches once per leaf, ~0.4 ms each, and a ResNet-50 state has
    # 431 leaves (170 ms per member on CPU; on an H200 the sequential validation of six
    # members took ~230 ms per member more than its forward passes).
    return jax.tree_util.tree_map(lambda x: x[index], stacked)


def _loop_batch(images, labels, order, seed, epoch, step, batch_size, augment, sharding):
    """Batch ``step`` built inside a compiled loop, laid out like :func:`pipeline.train_batch`."""
    x, y = pipeline.gather_batch(images, labels, order, step,
                                 pipeline.batch_key(seed, epoch, step), batch_size, augment)
    if sharding is not None:
        # Without the constraint the loop body would gather the whole batch on every
        # device; with it each device builds (and trains on) its own rows.
        x = jax.lax.with_sharding_constraint(x, sharding)
        y = jax.lax.with_sharding_constraint(y, sharding)
    return x, y


def _scan_steps(body, state, first_step, num_steps, unroll):
    """``lax.scan`` of ``body`` over steps ``first_step ...``; one step is called directly:
    XLA:CPU runs a length-1 scan (a one-trip loop) ~15x slower than the plain step."""
    if num_steps == 1:
        state, metrics = body(state, jnp.asarray(first_step))
        return state, jax.tree_util.tree_map(lambda v: v[None], metrics)
    return jax.lax.scan(body, state, first_step + jnp.arange(num_steps), unroll=unroll)


_LOOP_STATIC = ("num_steps", "batch_size", "augment", "mean", "std", "dtype", "sharding",
                "unroll", "flat_params")
# The static arguments of train_steps and multi_train_steps (their jits here, the jits with
# XLA options of _jit_with_options, the benchmarks' fresh jits).
_TRAIN_STEPS_STATIC = ("loss_name",) + _LOOP_STATIC
_MULTI_STEPS_STATIC = ("losses_", "shared_batch", "members") + _LOOP_STATIC


def _param_dtypes(params) -> list[str]:
    """The dtypes of ``params``' leaves, sorted names (one: the flat vector converts none)."""
    return sorted({str(jnp.result_type(x)) for x in jax.tree_util.tree_leaves(params)})


def _like_params(node, params) -> bool:
    """Whether ``node`` (a part of an optimiser state) is shaped like ``params``: the same
    tree, leaf shapes and dtypes (SGD's momentum, Adam's moments, Adagrad's sums)."""
    if jax.tree_util.tree_structure(node) != jax.tree_util.tree_structure(params):
        return False
    return all(jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
               for a, b in zip(jax.tree_util.tree_leaves(node), jax.tree_util.tree_leaves(params)))


def with_flat_params(state: TrainState, *, stacked: bool = False):
    """``(flat state, restore)``: ``state`` with its parameters raveled into one vector, and
    every part of its optimiser state shaped like them too (:func:`_like_params`); and the
    function that puts a flat state back into ``state``'s structure.

    The flat state's ``apply_fn`` unravels the vector (slices of it, each fused into its
    first consumer), so a step of it is the step of ``state``: the gradient of the vector is
    the leaves' gradients concatenated in ``tree_leaves`` order, and the optimiser updates
    one vector with one kernel instead of one kernel (or more) per leaf. That is exact only
    for an optimiser that treats every parameter element alike and never looks at the
    leaves' shapes: :func:`make_optimizer`'s (clipping by the global norm, weight decay, SGD
    momentum, Adam, Adagrad) are; optax's ``masked``, ``multi_transform``, LARS / LAMB or
    factored Adafactor are not (a mask would see one vector and, e.g., decay every weight).
    ``stacked=True``: a :func:`stack_states` state, raveled member by member (``[K, P]``).

    Raises ValueError when the parameters are not all of one dtype (the vector would
    convert some of them).
    """
    params = state.params
    dtypes = _param_dtypes(params)
    if len(dtypes) != 1:
        raise ValueError(f"`flat_params=True` needs parameters of one dtype, got {dtypes}; "
                         "pass flat_params=False (config.param_layout='tree').")
    one = jax.tree_util.tree_map(lambda x: x[0], params) if stacked else params
    unravel_one = ravel_pytree(one)[1]

    def ravel_one(tree):
        return ravel_pytree(tree)[0]

    ravel, unravel = ((jax.vmap(ravel_one), jax.vmap(unravel_one)) if stacked
                      else (ravel_one, unravel_one))

    def like(node):
        return _like_params(node, params)

    apply_fn = state.apply_fn

    def flat_apply(variables, *args, **kwargs):  # called per member (vmapped or unstacked)
        return apply_fn({**variables, "params": unravel_one(variables["params"])}, *args,
                        **kwargs)

    def restore(flat_state):
        opt_state = jax.tree_util.tree_map(lambda old, new: unravel(new) if like(old) else new,
                                           state.opt_state, flat_state.opt_state, is_leaf=like)
        return flat_state.replace(params=unravel(flat_state.params), opt_state=opt_state,
                                  apply_fn=apply_fn)

    flat_opt_state = jax.tree_util.tree_map(lambda t: ravel(t) if like(t) else t,
                                            state.opt_state, is_leaf=like)
    return state.replace(params=ravel(params), opt_state=flat_opt_state,
                         apply_fn=flat_apply), restore


def _scan_steps_flat(body, state, first_step, num_steps, unroll, flat_params, stacked=False):
    """:func:`_scan_steps`, over :func:`with_flat_params`' state when ``flat_params``; the
    state returned is in the caller's structure either way (checkpoints unchanged)."""
    if not flat_params:
        return _scan_steps(body, state, first_step, num_steps, unroll)
    flat_state, restore = with_flat_params(state, stacked=stacked)
    flat_state, metrics = _scan_steps(body, flat_state, first_step, num_steps, unroll)
    return restore(flat_state), metrics


@functools.partial(jax.jit, static_argnames=_TRAIN_STEPS_STATIC, donate_argnums=(0,))
def train_steps(state: TrainState, images, labels, order, first_step, epoch, seed, *,
                num_steps: int, loss_name, batch_size: int, augment: bool = True, mean, std,
                dtype=jnp.float32, sharding=None, unroll: int | bool = 1,
                flat_params: bool = False):
    """``num_steps`` optimiser steps in one compiled call, batches built on the device.

    Step ``first_step + i`` trains on ``pipeline.train_batch(images, labels, order,
    first_step + i, seed=seed, epoch=epoch, ...)``, exactly the batches of a
    per-step loop, so the result equals ``num_steps`` calls of :func:`train_step`
    (up to float rounding of a differently fused program). The host hands out
    only chunk boundaries: no per-step dispatch, no per-step transfer, which is
    what keeps an accelerator busy at batch 128.

    Args:
      state: donated.
      images, labels: the training split on the device(s) (``pipeline.put_on_device``).
      order: ``pipeline.epoch_order(seed, epoch, N)``.
      first_step, epoch, seed: integers (traced: no recompilation per chunk or epoch).
      num_steps: steps in this call (static: each distinct value compiles once).
      loss_name: a loss name or :class:`LossSpec` (static).
      batch_size: the global batch size; ``sharding`` (e.g. :func:`batch_sharding`)
        splits it over the mesh's data axis.
      mean, std: normalisation (static tuples), or None for token ids.
      unroll: ``lax.scan``'s unroll. XLA:CPU runs convolutions inside a loop body
        through a slow path (about 15x slower, jax-ml/jax#12868), so on CPU use
        ``num_steps=1`` (no loop at all) or a full unroll; on GPU / TPU a rolled
        loop of many steps.
      flat_params: run the steps over one parameter vector (:func:`with_flat_params`:
        exact for :func:`make_optimizer`'s optimisers, not for masked or shape-aware
        ones); the state comes back in its own structure. On an H200 it saves ~170
        kernels per ResNet-50 step (:func:`default_flat_params`); on CPU it is slower.

    Returns:
      ``(state, {"loss": [num_steps] batch losses, "correct": [num_steps] counts})``.
    """
    def body(state, step):
        images_b, labels_b = _loop_batch(images, labels, order, seed, epoch, step, batch_size,
                                         augment, sharding)
        state, m = _train_on_batch(state, images_b, labels_b, epoch, loss_name, mean, std,
                                   dtype)
        return state, {"loss": m["loss"].astype(jnp.float32), "correct": m["correct"]}

    return _scan_steps_flat(body, state, first_step, num_steps, unroll, flat_params)


MEMBER_MODES = ("vmap", "sequential")


def default_member_mode(platform: str) -> str:
    """``multi_mode="auto"``: ``sequential`` on CPU and GPU, ``vmap`` on TPU.

    Measured (benchmarks/NOTES.md): the vmapped members' convolutions become grouped
    convolutions, slow on CPU and on an H200 (six ResNet-50 members at batch 128 in
    bfloat16: the row took 9.75x one run vmapped, 6.36x sequential). TPU is unmeasured;
    it keeps the batched form its convolution units are built for."""
    return "vmap" if platform == "tpu" else "sequential"


@functools.partial(jax.jit, static_argnames=_MULTI_STEPS_STATIC, donate_argnums=(0,))
def multi_train_steps(stacked: TrainState, images, labels, orders, first_step, epoch, seeds, *,
                      num_steps: int, losses_, shared_batch: bool, batch_size: int,
                      augment: bool = True, mean, std, dtype=jnp.float32, sharding=None,
                      unroll: int | bool = 1, members: str = "vmap",
                      flat_params: bool = False):
    """:func:`train_steps` for K runs at once: one program over stacked states.

    Member ``k`` trains with ``losses_[k]`` on the batches of seed ``seeds[k]``
    (order ``orders[k]``), i.e. exactly the batches its single run would see, so
    each member equals its single run (up to float rounding of batched
    convolutions). ``shared_batch=True`` (all seeds equal) builds every batch once
    for all members.

    Args:
      stacked: :func:`stack_states` of the K members (donated).
      orders: ``[K, N]`` epoch orders; seeds: ``[K]`` integers.
      losses_: K loss names / :class:`LossSpec` (static).
      members: ``"vmap"`` batches the members' computations (each convolution
        becomes one grouped convolution over K weight sets); ``"sequential"`` runs
        the K steps one after another inside the program (plain convolutions). On
        CPU and on an H200 sequential is the faster (:func:`default_member_mode`).
      flat_params: each member's steps over one parameter vector, as :func:`train_steps`.

    Returns:
      ``(stacked, {"loss": [num_steps, K], "correct": [num_steps, K]})``.
    """
    num_members = len(losses_)
    branches = [functools.partial(batch_loss, spec) for spec in losses_]
    member_sharding = None
    if sharding is not None and not shared_batch:
        member_sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))

    def member(state, x, y, k):
        return _apply_step(state, x, y, lambda logits, targets: jax.lax.switch(
            k, branches, logits, targets, epoch))

    if members not in MEMBER_MODES:
        raise ValueError(f"`members` must be one of {MEMBER_MODES}, got {members!r}.")

    def shared(step):  # the one batch of members that share a seed
        return _loop_batch(images, labels, orders[0], seeds[0], epoch, step, batch_size,
                           augment, sharding)

    def sequential_body(stacked, step):
        batch = shared(step) if shared_batch else None
        new_members, metrics = [], []
        for k, spec in enumerate(losses_):
            x, y = batch or _loop_batch(images, labels, orders[k], seeds[k], epoch, step,
                                        batch_size, augment, sharding)
            state, m = _train_on_batch(unstack_state(stacked, k), x, y, epoch, spec, mean, std,
                                       dtype)
            new_members.append(state)
            metrics.append(m)
        return stack_states(new_members), {
            "loss": jnp.stack([m["loss"] for m in metrics]).astype(jnp.float32),
            "correct": jnp.stack([m["correct"] for m in metrics])}

    def vmapped_body(stacked, step):
        if shared_batch:
            x, y = shared(step)
            batch_axis = None
        else:
            x, y = jax.vmap(lambda o, s: _loop_batch(images, labels, o, s, epoch, step,
                                                     batch_size, augment, None))(orders, seeds)
            if member_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, member_sharding)
                y = jax.lax.with_sharding_constraint(y, member_sharding)
            batch_axis = 0
        x = _model_inputs(x, mean, std, dtype)
        stacked, m = jax.vmap(member, in_axes=(0, batch_axis, batch_axis, 0))(
            stacked, x, y, jnp.arange(num_members))
        return stacked, {"loss": m["loss"].astype(jnp.float32), "correct": m["correct"]}

    body = sequential_body if members == "sequential" else vmapped_body
    return _scan_steps_flat(body, stacked, first_step, num_steps, unroll, flat_params,
                            stacked=True)


def _eval_logits(apply_fn, params, batch_stats, x):
    return apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)


@functools.partial(jax.jit, static_argnames=("apply_fn", "mean", "std", "dtype"))
def _predict_batch(apply_fn, params, batch_stats, images, mean, std, dtype):
    return _eval_logits(apply_fn, params, batch_stats, _model_inputs(images, mean, std, dtype))


@functools.partial(jax.jit, static_argnames=("apply_fn", "mean", "std", "dtype"))
def _predict_members_batch(apply_fn, params, batch_stats, images, mean, std, dtype):
    """``[K, B, C]``: the K stacked members' logits of one shared batch, one vmapped pass."""
    return jax.vmap(functools.partial(_eval_logits, apply_fn), in_axes=(0, 0, None))(
        params, batch_stats, _model_inputs(images, mean, std, dtype))


# Batches whose logits may wait on the device before the host fetches the oldest: the
# host dispatches ahead instead of waiting for each batch, with bounded device memory.
_PREDICT_IN_FLIGHT = 8


def _predict_batches(state, images, batch_size, forward):
    """``forward(x)`` (logits with the batch on axis -2) over fixed-size padded batches,
    the masked rows dropped, batches concatenated on axis -2 (host NumPy)."""
    # Put each batch where the parameters are (replicated over the mesh in a
    # data-parallel run, which also works across hosts), not on a default device.
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    sharding = leaf.sharding if isinstance(leaf.sharding, jax.sharding.NamedSharding) else None
    done, in_flight = [], []

    def fetch(logits, mask):
        done.append(np.asarray(jax.device_get(logits))[..., mask, :])

    # Across processes the images are compared once here, not batch by batch.
    pipeline.check_same_across_processes(images, sharding, what="the images to predict")
    for batch in pipeline.eval_batches(images.shape[0], batch_size):
        x = pipeline.put_replicated(images[batch.index], sharding, check=False)
        in_flight.append((forward(x), batch.mask))
        if len(in_flight) > _PREDICT_IN_FLIGHT:
            fetch(*in_flight.pop(0))
    for item in in_flight:
        fetch(*item)
    return np.concatenate(done, axis=-2)


def _static_normalization(mean, std):
    return (None if mean is None else tuple(mean)), (None if std is None else tuple(std))


def predict(state: TrainState, images: np.ndarray, *, mean, std, batch_size: int = 500,
            dtype=jnp.float32) -> np.ndarray:
    """Logits ``[N, C]`` of every example (fixed-size padded batches, one compilation).

    ``mean=None`` for token inputs (no normalisation)."""
    mean, std = _static_normalization(mean, std)
    return _predict_batches(state, images, batch_size, lambda x: _predict_batch(
        state.apply_fn, state.params, state.batch_stats, x, mean, std, dtype))


def predict_members(stacked: TrainState, images: np.ndarray, *, mean, std,
                    batch_size: int = 500, dtype=jnp.float32,
                    members: str = "vmap") -> np.ndarray:
    """Logits ``[K, N, C]`` of the K members of a :func:`stack_states` state.

    ``members="vmap"`` runs every batch through all members in one vmapped pass
    (one program per batch instead of K: what :func:`multi_train_steps` does for
    training); ``"sequential"`` runs :func:`predict` member by member (plain
    convolutions: faster on CPU). Either equals :func:`predict` of each member
    (vmapped: up to float rounding of batched convolutions).
    """
    if members not in MEMBER_MODES:
        raise ValueError(f"`members` must be one of {MEMBER_MODES}, got {members!r}.")
    if members == "sequential":
        count = jax.tree_util.tree_leaves(stacked.params)[0].shape[0]
        return np.stack([predict(unstack_state(stacked, k), images, mean=mean, std=std,
                                 batch_size=batch_size, dtype=dtype) for k in range(count)])
    mean, std = _static_normalization(mean, std)
    return _predict_batches(stacked, images, batch_size, lambda x: _predict_members_batch(
        stacked.apply_fn, stacked.params, stacked.batch_stats, x, mean, std, dtype))


# ----------------------------------------------------------------------------
# The training loop: config -> checkpoints in a work directory.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMAGE_DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "synthetic")
# Token-id data sets (SST: packed trees, models.text.pack_trees) and their models.
TEXT_DATASETS = ("20news", "sst")
TEXT_MODELS = ("global_pooling_cnn", "tree_lstm")


def loss_tokens(loss) -> list[str]:
    """The member losses of ``config.loss``: ``"ce"`` -> ``["ce"]``;
    ``"[ce,brier,focal3]"`` (or without brackets, or a list) -> three names."""
    if isinstance(loss, (list, tuple)):
        return [str(t).strip() for t in loss]
    text = str(loss).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [t.strip() for t in text.split(",") if t.strip()]


def _member_loss_fields(token: str):
    """``(loss, gamma or None)`` of one member token: a loss name, or ``focal<gamma>``
    (e.g. ``focal3``, ``focal1.5``) for focal loss with that gamma."""
    if token in LOSS_NAMES:
        return token, None
    if token.startswith("focal"):
        try:
            gamma = float(token[len("focal"):])
        except ValueError:
            pass
        else:
            if not math.isfinite(gamma) or gamma < 0:  # "focal-1", "focalnan", "focalinf"
                raise ValueError(f"{token!r}: focal<gamma> needs a finite gamma >= 0")
            return "focal", gamma
    raise ValueError(f"unknown loss {token!r}; choose from {LOSS_NAMES}, or focal<gamma> "
                     f"(e.g. focal3) in a list such as [ce,flsd53]")


def run_members(config) -> list[tuple[str, Any]]:
    """The runs one config describes, as ``(name, single-run config)`` pairs.

    ``config.loss`` may list several losses (``"[ce,brier,focal3]"``, ``focal<g>``
    meaning focal loss with gamma ``g``) and ``config.seeds`` several seeds; the
    members are every (loss, seed) pair, named ``<loss>`` or ``<loss>-seed<s>``
    (several seeds). Each member's config is an ordinary single-run config
    (one loss, ``gamma``, ``seed``), so a member's work directory is a normal run
    directory. A single (loss, seed) pair gives one member named ``""`` (the
    work directory itself).
    """
    tokens = loss_tokens(config.loss)
    seeds = tuple(int(s) for s in config.get("seeds", ())) or (int(config.seed),)
    if len(tokens) == 1 and len(seeds) == 1 and tokens[0] in LOSS_NAMES \
            and seeds[0] == int(config.seed):
        if config.get("seeds"):  # seeds=[s] with s == seed: the run of seeds=(), recorded so
            config = config.copy_and_resolve_references()
            config.seeds = ()
        return [("", config)]
    members = []
    for token in tokens:
        loss, gamma = _member_loss_fields(token)
        for seed in seeds:
            member = config.copy_and_resolve_references()
            member.loss, member.seed = loss, seed
            if "seeds" in member:
                member.seeds = ()
            if gamma is not None:
                member.gamma = gamma
            members.append((token + (f"-seed{seed}" if len(seeds) > 1 else ""), member))
    if len(members) == 1:  # one run written as a list (loss=[focal2] or seeds=[5]): no subfolder
        return [("", members[0][1])]
    return members


def member_dir(workdir, name: str) -> Path:
    """The run directory of member ``name`` (:func:`run_members`) of a program trained into
    ``workdir``: ``workdir/name``, or ``workdir`` itself for a single run (``name == ""``)."""
    return Path(workdir) / name if name else Path(workdir)


#: What ``config.eval_checkpoint`` may name: the checkpoint a run's evaluation reports.
EVAL_CHECKPOINTS = ("final", "best")


def table_checkpoint(config) -> str:
    """The checkpoint a run's evaluation reports by default (``config.eval_checkpoint``;
    ``"final"`` for configs written before that field existed)."""
    return config.get("eval_checkpoint", "final")


#: Config fields that decide how a run is executed, logged or saved, not what it computes
#: (results agree to float rounding whatever their values).
EXECUTION_FIELDS = frozenset({
    "eval_batch_size", "data_dir", "multi_mode", "checkpoint_every_epochs", "keep_checkpoints",
    "log_every_steps", "steps_per_call", "scan_unroll", "param_layout",
    "gpu_graph_convolutions"})
#: Config fields a resumed run may change: the execution fields, ``num_epochs``, which
#: lengthens or shortens the run (the learning-rate and gamma schedules are in epochs, not
#: fractions of the run; not below the epochs already checkpointed, see check_resumable),
#: and ``eval_checkpoint``, which checkpoint the evaluation reports (training saves both).
#: Any other difference between a work directory's ``config.json`` and the config given is
#: refused.
RESUMABLE_FIELDS = EXECUTION_FIELDS | {"num_epochs", "eval_checkpoint"}


def field_differences(saved: dict, given: dict, *, ignore=RESUMABLE_FIELDS) -> list[tuple]:
    """``[(field, saved value, given value), ...]`` for the fields of two configs (as JSON
    dicts) that differ, outside ``ignore``, in ``given``'s order.

    Fields that only one side has (written by another calib_jax version) are not compared,
    and ``seeds: [s]`` with ``seed: s`` equals ``seeds: []`` (the same single run; earlier
    versions recorded it so).
    """
    saved, given = _one_seed_as_no_seeds(saved), _one_seed_as_no_seeds(given)
    return [(k, saved[k], given[k]) for k in given
            if k in saved and k not in ignore and saved[k] != given[k]]


def _one_seed_as_no_seeds(fields: dict) -> dict:
    seeds = fields.get("seeds")
    if isinstance(seeds, (list, tuple)) and len(seeds) == 1 and "seed" in fields \
            and seeds[0] == fields["seed"]:
        return {**fields, "seeds": []}
    return fields


def config_differences(run_dir, config, *, ignore=RESUMABLE_FIELDS) -> list[str] | None:
    """``["loss 'ce' -> 'flsd53'", ...]``: the fields in which ``run_dir/config.json``
    differs from ``config``, outside ``ignore`` (``field_differences``); None when the
    directory has no config.json."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    return [f"{k} {old!r} -> {new!r}" for k, old, new in field_differences(
        json.loads(path.read_text()), json.loads(config.to_json()), ignore=ignore)]


class ConfigError(ValueError):
    """A config or work directory that cannot train as given, refused before any compute; the
    message names the field (``config.<field> = <value>``) or the directory, and the fix."""


def check_resumable(run_dir, config) -> None:
    """Refuses to resume ``run_dir`` with a config that computes something else.

    A run directory that already holds training (a checkpoint or a log record) and whose
    ``config.json`` differs from ``config`` in a field outside ``RESUMABLE_FIELDS`` (the loss,
    gamma, learning rate, seed, dtype, ...) raises :class:`ConfigError` (a ``ValueError``)
    naming each such field with its old and new value, before any compute: resuming would train
    the rest of the run under another recipe and overwrite the record of the first. (A different
    model is caught too, here rather than by the checkpoint's tree structure.) Fields that only
    one side has (written by another calib_jax version) are not compared. A directory without
    training, e.g. a run killed in its first epoch, may be reused with any config. A
    ``num_epochs`` below the newest periodic checkpoint's epoch is refused too (the run is past
    it).
    """
    from calib_jax import checkpoints

    log = Path(run_dir) / "log.jsonl"
    saved = {which: checkpoints.saved_epochs(run_dir, which) for which in checkpoints.FOLDERS}
    trained = (log.exists() and log.stat().st_size > 0) or any(saved.values())
    changed = config_differences(run_dir, config) if trained else None
    if changed:
        raise ConfigError(
            f"workdir {run_dir} holds a run of another configuration ({run_dir}/config.json): "
            f"{'; '.join(changed)}. Use a new --workdir, or resume with the run's own config "
            f"(only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume).")
    newest = max(saved["latest"], default=0)
    if newest > config.num_epochs:
        # Its config.json would say num_epochs while its final state (and every evaluation of
        # it) is of a longer run.
        raise ConfigError(
            f"workdir {run_dir} has trained {newest} epochs, more than config.num_epochs = "
            f"{config.num_epochs}: a run can be shortened only before it gets there. Resume "
            f"with num_epochs >= {newest}, or use a new --workdir (an earlier checkpoint of "
            f"this run, if kept, is evaluated with `python -m calib_jax.evaluate --checkpoint "
            f"EPOCH`).")


def _check_run_layout(workdir: Path, *, several: bool) -> None:
    """Refuses to mix a single run and a group of runs in one work directory: the evaluation
    pass (``evaluate.member_dirs``) would see only one of them."""
    if several and (workdir / "config.json").exists():
        raise ConfigError(f"workdir {workdir} holds a single run ({workdir}/config.json); train "
                          f"several runs in a new workdir (each member goes to <workdir>/<name>)")
    if not several and (workdir / "members.json").exists():
        listed = json.loads((workdir / "members.json").read_text()).get("members", [])
        raise ConfigError(f"workdir {workdir} holds a group of runs (members.json: "
                          f"{', '.join(listed)}); train this run in a directory of its own, or "
                          f"with the group's members as one more member (loss=[...])")


def validate_config(config, num_devices: int) -> None:
    """Raises :class:`ConfigError` (a ``ValueError``) naming the field for any bad value,
    before any compute."""
    from calib_jax import models as model_zoo

    def bad(field, why):
        raise ConfigError(f"config.{field} = {config.get(field)!r}: {why}")

    tokens = loss_tokens(config.loss)
    if not tokens:
        bad("loss", f"no loss given; choose from {LOSS_NAMES}")
    for token in tokens:
        try:
            _member_loss_fields(token)
        except ValueError as e:
            bad("loss", str(e))
    if len(set(tokens)) != len(tokens):
        bad("loss", "lists a loss twice; each member needs its own name")

    def is_seed(x):  # NumPy's generators (the subset, the splits) refuse negative seeds
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 63

    if not is_seed(config.seed):
        bad("seed", "must be an integer in [0, 2**63)")
    seeds = tuple(config.get("seeds", ()))
    if len(set(seeds)) != len(seeds) or not all(is_seed(x) for x in seeds):
        bad("seeds", "must be distinct integers in [0, 2**63) (or empty for config.seed alone)")
    if config.get("data_dir") and not Path(config.data_dir).is_dir():
        bad("data_dir", "no such directory (\"\" searches $CALIB_JAX_DATA_DIR, then "
                        "../shared/data, then TFDS)")
    for field in ("vocab_size", "embed_dim", "mem_dim"):  # the text models' sizes
        if field in config and not config[field] >= 1:
            bad(field, "must be >= 1")
    if config.model not in model_zoo.names():
        bad("model", f"unknown model; choose one of {model_zoo.names()}")
    if config.dataset not in IMAGE_DATASETS + TEXT_DATASETS:
        bad("dataset", f"training supports {IMAGE_DATASETS + TEXT_DATASETS}")
    if (config.dataset in TEXT_DATASETS) != (config.model in TEXT_MODELS):
        kind = "text" if config.dataset in TEXT_DATASETS else "image"
        bad("model", f"{config.dataset!r} needs a {kind} model")
    phrase_labels = config.get("phrase_labels", False)
    if not isinstance(phrase_labels, bool):
        bad("phrase_labels", "must be True or False")
    if phrase_labels and (config.dataset, config.model) != ("sst", "tree_lstm"):
        bad("phrase_labels", "trains a Tree-LSTM on SST's labelled phrases: needs "
                             "dataset=sst and model=tree_lstm (False for other runs)")
    if config.get("optimizer", "sgd") not in ("sgd", "adam", "adagrad"):
        bad("optimizer", "must be sgd, adam or adagrad")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        bad("learning_rate", "must be finite and > 0")
    if config.num_epochs < 1:
        bad("num_epochs", "must be >= 1")
    if config.batch_size < 1 or config.batch_size % num_devices:
        bad("batch_size", f"must be a positive multiple of the {num_devices} devices")
    if config.dtype not in _DTYPES:
        bad("dtype", f"must be one of {sorted(_DTYPES)}")
    # Every loss's hyper-parameters are checked whichever loss trains: config.json records
    # them all, and a later member or resume may use them. (NaN fails every comparison.)
    for field in ("weight_decay", "clip_norm", "gamma", "mmce_lambda"):
        if not (math.isfinite(config[field]) and config[field] >= 0):
            bad(field, "must be finite and >= 0" + (" (0 = no clipping)" if field == "clip_norm"
                                                     else ""))
    if not (math.isfinite(config.lr_factor) and config.lr_factor > 0):
        bad("lr_factor", "must be finite and > 0 (the learning rate's factor at each boundary)")
    if not 0 <= config.smoothing < 1:
        bad("smoothing", "must be in [0, 1)")
    if not 0 < config.get("flsd_threshold", 0.2) < 0.5:
        bad("flsd_threshold", "must be in (0, 0.5): FLSD's gamma is 5 below it, 3 up to 0.5")
    gamma_boundaries = tuple(config.get("gamma_boundaries", (100, 250)))
    if len(gamma_boundaries) != 2 or not _increasing_epochs(gamma_boundaries, first=0):
        bad("gamma_boundaries", "must be two increasing epochs >= 0 (FLSc-531's gamma goes "
                                "5 -> 3 -> 1 there)")
    if not 0 <= config.momentum < 1:
        bad("momentum", "must be in [0, 1)")
    for field in ("checkpoint_every_epochs", "keep_checkpoints", "eval_batch_size"):
        if config[field] < 1:
            bad(field, "must be >= 1" + (" (the final checkpoint is one of those kept)"
                                         if field == "keep_checkpoints" else ""))
    if table_checkpoint(config) not in EVAL_CHECKPOINTS:
        bad("eval_checkpoint", f"must be one of {EVAL_CHECKPOINTS} (the last epoch, or the "
                               "highest validation accuracy)")
    if config.log_every_steps < 1:
        bad("log_every_steps", "must be >= 1")
    if config.get("multi_mode", "auto") not in ("auto",) + MEMBER_MODES:
        bad("multi_mode", f"must be auto or one of {MEMBER_MODES}")
    if config.get("steps_per_call", 0) < 0:
        bad("steps_per_call", "must be >= 0 (0 = automatic, see default_steps_per_call)")
    scan_unroll = config.get("scan_unroll", 0)
    if isinstance(scan_unroll, bool) or not isinstance(scan_unroll, int) or scan_unroll < 0:
        bad("scan_unroll", "must be an integer >= 0 (0 = automatic, see default_unroll)")
    if config.get("param_layout", "auto") not in PARAM_LAYOUTS:
        bad("param_layout", f"must be one of {PARAM_LAYOUTS} (auto = flat on GPU, see "
                            "default_flat_params)")
    if not isinstance(config.get("gpu_graph_convolutions", True), bool):
        bad("gpu_graph_convolutions", "must be True or False")
    if not _increasing_epochs(tuple(config.lr_boundaries), first=1):
        bad("lr_boundaries", "must be increasing epochs >= 1 (each decays the learning rate "
                             "once: two equal epochs would decay it once)")
    if config.train_subset < 0:
        bad("train_subset", "must be >= 0 (0 = all)")
    if config.train_subset and len(seeds) > 1:
        # The subset is drawn with the seed, so members would not match their single runs.
        bad("train_subset", "cannot be combined with several config.seeds (each seed draws "
                            "its own subset); train the seeds as separate runs")


def _increasing_epochs(epochs: tuple, *, first: int) -> bool:
    """Integers >= ``first``, strictly increasing."""
    return (all(isinstance(e, int) and not isinstance(e, bool) and e >= first for e in epochs)
            and all(a < b for a, b in zip(epochs, epochs[1:])))


def maybe_initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize()`` when the environment describes a cluster.

    Triggered by ``force`` or by ``JAX_COORDINATOR_ADDRESS`` (with
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) in the environment; on TPU pods
    and SLURM, ``initialize()`` finds the rest itself.
    """
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # Cross-process collectives on CPU need gloo (set before the backend starts).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                          process_id=int(os.environ.get("JAX_PROCESS_ID", "0")))
        jax.distributed.initialize(**kwargs)


def _validation_metrics(logits, labels) -> dict:
    from calib_jax import metrics as cmetrics
    stats = cmetrics.update_stats(cmetrics.init_stats(logits.shape[1]), logits, labels)
    values = cmetrics.metrics_from_stats(stats)
    return {"val_accuracy": float(values["accuracy"]), "val_nll": float(values["nll"]),
            "val_ece": float(values["ece"])}


def _validate_members(state, images, labels, num_members: int, member_mode: str,
                      **eval_options) -> list[dict | None]:
    """The per-epoch validation metrics of each run: one :func:`predict` for a single
    run, :func:`predict_members` (``member_mode``) for a stacked group; None for a run whose
    logits are not all finite (a diverged model: :func:`_check_finite_epoch` stops there)."""
    logits = predict(state, images, **eval_options)[None] if num_members == 1 else \
        predict_members(state, images, members=member_mode, **eval_options)
    return [_validation_metrics(member_logits, labels) if np.isfinite(member_logits).all()
            else None for member_logits in logits]


class TrainingDivergedError(FloatingPointError):
    """A run's training loss or model became NaN / infinite; the message says what to change."""


def _check_finite_epoch(config, epoch: int, names, loss_sums, vals, saved_epoch: int) -> None:
    """Raises :class:`TrainingDivergedError` when a run's epoch ended non-finite.

    A NaN or infinite loss or model never recovers under SGD: the rest of the run would spend
    its hours on NaN, and its periodic checkpoints would push the last good ones out
    (``keep_checkpoints``). So the loop stops at the first such epoch, before it logs or
    saves anything of it: the checkpoints keep epoch ``saved_epoch`` for inspection. A run is
    deterministic, so the same config would diverge again; the fixes (learning rate,
    clipping, dtype) are not resumable fields, hence a new workdir.
    """
    bad = {}
    for name, loss, val in zip(names, loss_sums, vals):
        if not np.isfinite(loss):
            bad[name or "the run"] = "training loss"
        elif val is None:
            bad[name or "the run"] = "model (NaN or infinite validation logits)"
    if not bad:
        return
    which = "; ".join(f"{name}: {what}" for name, what in bad.items())
    kept = (f"up to epoch {saved_epoch} (`python -m calib_jax.evaluate --checkpoint latest` "
            f"reads the newest)" if saved_epoch else "none")
    others = [name for name in names if name and name not in bad]
    message = (f"training diverged in epoch {epoch} ({which} not finite); stopped before "
               f"logging or saving that epoch. Checkpoints kept: {kept}. The same config "
               f"diverges again (runs are deterministic): change the recipe in a new --workdir, "
               f"e.g. a lower learning_rate (now {config.learning_rate}) or gradient clipping "
               f"(clip_norm now {config.clip_norm}; 0 = off)")
    message += f" or dtype float32 (now {config.dtype})." if config.dtype != "float32" else "."
    if others:
        message += (f" The other members ({', '.join(others)}) were finite; each member's "
                    f"directory is a complete run: train one on alone with --workdir "
                    f"<workdir>/<member> and its own loss and seed, or several as a group by "
                    f"listing only them in `loss` / `seeds` (the same --workdir).")
    raise TrainingDivergedError(message)


def state_for_config(config, num_classes: int, example_shape, steps_per_epoch: int = 1):
    """The initial :class:`TrainState` of a run (model, schedule and optimiser from ``config``).

    ``example_shape`` is one example's shape: ``(H, W, 3)`` images, ``(L,)`` token
    ids, ``(3, M)`` packed trees. Also the template to restore a run's
    checkpoints with (the evaluation pass).
    """
    from calib_jax import models as model_zoo
    dtype = _DTYPES[config.dtype]
    shape = (1, *tuple(example_shape))
    if config.model in TEXT_MODELS:
        embeddings = np.load(config.embeddings_path) if config.get("embeddings_path") else None
        extra = {"mem_dim": config.mem_dim} if config.model == "tree_lstm" else {}
        if config.get("phrase_labels", False):
            # The reference's SST model: three phrase classes, a sentence read as negative
            # or positive (datasets.SST_SENTENCE_CLASSES), trained on every labelled node.
            from calib_jax.data import datasets
            if num_classes != len(datasets.SST_SENTENCE_CLASSES):
                raise ValueError(f"phrase labels are SST binary's: 2 sentence classes, got "
                                 f"num_classes={num_classes}")
            num_classes = len(set(datasets.SST_PHRASE_CLASSES.values()))
            extra.update(root_classes=datasets.SST_SENTENCE_CLASSES, phrase_labels=True)
        model = model_zoo.get(config.model, num_classes, dtype=dtype,
                              vocab_size=config.vocab_size, embed_dim=config.embed_dim,
                              embeddings=embeddings,
                              train_embeddings=config.get("train_embeddings", True), **extra)
        input_dtype = jnp.int32
    else:
        model = model_zoo.get(config.model, num_classes, dtype=dtype)
        input_dtype = jnp.float32
    tx = make_optimizer(piecewise_lr(config.learning_rate, steps_per_epoch,
                                     tuple(config.lr_boundaries), config.lr_factor,
                                     config.early_decay),
                        momentum=config.momentum, weight_decay=config.weight_decay,
                        clip_norm=config.clip_norm, name=config.get("optimizer", "sgd"))
    return create_train_state(jax.random.PRNGKey(config.seed), model, tx, shape, input_dtype)


def abstract_state_for_config(config, num_classes: int, example_shape):
    """The structure, shapes and dtypes of :func:`state_for_config`'s state, computed by
    ``jax.eval_shape`` (no initialisation compiled or run), each leaf a
    ``jax.ShapeDtypeStruct`` on :func:`default_device`: the template to restore a
    checkpoint into (the evaluation pass), where the initial values would be thrown away."""
    abstract = jax.eval_shape(lambda: state_for_config(config, num_classes, example_shape))
    sharding = jax.sharding.SingleDeviceSharding(default_device())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)


def dataset_options(config) -> dict:
    """Loader options a config implies (vocabulary size for text; SST's phrase labels)."""
    if config.dataset not in TEXT_DATASETS:
        return {}
    options = {"vocab_size": config.vocab_size}
    if config.get("phrase_labels", False):
        options["phrase_labels"] = True
    return options


def input_normalization(config, split: str):
    """``(mean, std)`` tuples for an image data set's split, ``(None, None)`` for text."""
    from calib_jax.data import datasets
    if config.dataset in TEXT_DATASETS:
        return None, None
    mean, std = datasets.normalization(
        config.dataset, split,
        reference_cifar100_test=config.get("reference_cifar100_test_norm", True))
    return tuple(mean), tuple(std)


def default_steps_per_call(steps_per_epoch: int, log_every_steps: int, platform: str) -> int:
    """Training steps per compiled call when ``config.steps_per_call`` is 0.

    CPU: 1 (XLA:CPU runs convolutions inside loops slowly, jax-ml/jax#12868).
    GPU / TPU: the largest divisor of ``steps_per_epoch`` in
    ``[log_every_steps / 2, log_every_steps]``, so that every call of an epoch
    has the same length and the loop compiles once (CIFAR-10, 351 steps, log
    every 50: 39); ``log_every_steps`` itself when no divisor is that close (the
    epoch's shorter last call then compiles once more).
    """
    if platform == "cpu":
        return 1
    target = min(log_every_steps, steps_per_epoch)
    for count in range(target, max(1, target // 2) - 1, -1):
        if steps_per_epoch % count == 0:
            return count
    return target


def default_unroll(platform: str, members: int = 1) -> int:
    """``lax.scan``'s unroll of the training loop when ``config.scan_unroll`` is 0.

    GPU, one run: 2 (two steps per loop trip). Measured on an H200, ResNet-50 batch 128
    bfloat16, identical losses: +4.4% and +5.9% images/s in two sessions
    (benchmarks/NOTES.md); XLA then compiles a body of two steps (39 s with the
    convolutions already autotuned; the two steps' per-leaf updates share kernels: 852.5
    instead of 901 kernels per step in `benchmarks/hlo_static.py`).
    1 elsewhere: CPU runs one step per call (:func:`default_steps_per_call`), so there is
    no loop to unroll; several members already put K steps in the body (a doubled
    six-member body would compile for minutes, its speed unmeasured); TPU is unmeasured.
    """
    return 2 if platform == "gpu" and members == 1 else 1


#: ``config.param_layout``: ``auto`` (:func:`default_flat_params`), ``flat`` (the steps run
#: over one parameter vector, :func:`with_flat_params`) or ``tree`` (over the parameters'
#: own tree). Checkpoints hold the tree either way.
PARAM_LAYOUTS = ("auto", "flat", "tree")


def default_flat_params(platform: str) -> bool:
    """``config.param_layout="auto"``: the flat parameter vector on GPU, the tree elsewhere.

    Measured (benchmarks/NOTES.md, "GPU: NVIDIA H200, third session"): on an H200, flat
    parameters with the two-stage BatchNorm sums (``models.layers._channel_sums``) and the
    convolutions in XLA's CUDA graphs (:func:`loop_compiler_options`) ran ResNet-50 at batch
    128 bfloat16 at 17,047 img/s against 16,260 (medians of 5 interleaved rounds, +4.8%;
    the ranges did not overlap; 751 instead of 928 kernels per step). On CPU the vector
    costs a copy of the parameters per call and slowed ResNet-8 training by ~30% (one step
    per call); TPU is unmeasured."""
    return platform == "gpu"


def _param_layout_is_flat(layout: str, platform: str, params=None) -> bool:
    """Whether the loop runs over the flat vector for ``config.param_layout``; ``auto`` keeps
    the tree for ``params`` of several dtypes (which :func:`with_flat_params` refuses)."""
    if layout not in PARAM_LAYOUTS:
        raise ValueError(f"`param_layout` must be one of {PARAM_LAYOUTS}, got {layout!r}.")
    if layout != "auto":
        return layout == "flat"
    one_dtype = params is None or len(_param_dtypes(params)) <= 1
    return default_flat_params(platform) and one_dtype


#: XLA:GPU's default command-buffer (CUDA graph) kinds in jaxlib 0.11.2, plus
#: ``CONVOLUTION``: cuDNN's convolution calls recorded into the graphs too. By default XLA
#: launches each convolution on its own, which splits a ResNet-50 step into ~100 graphs with
#: gaps between them (3.9 ms of a traced 11.2 ms step on an H200; 0.5 ms with this option
#: and :func:`default_flat_params`' changes: benchmarks/NOTES.md).
GPU_GRAPH_CONVOLUTIONS = {"xla_gpu_enable_command_buffer":
                          "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,DYNAMIC_SLICE_FUSION,"
                          "CONDITIONAL,CONVOLUTION"}


def loop_compiler_options(platform: str, *, graph_convolutions: bool = True) -> dict:
    """The XLA options the training loop compiles with on ``platform``
    (``config.gpu_graph_convolutions``): :data:`GPU_GRAPH_CONVOLUTIONS` on GPU, none
    elsewhere, and none when ``XLA_FLAGS`` already sets ``xla_gpu_enable_command_buffer``
    (a compile option would override the user's own choice of graphs)."""
    if platform != "gpu" or not graph_convolutions:
        return {}
    if "xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(GPU_GRAPH_CONVOLUTIONS)


@functools.cache
def _jit_with_options(options: tuple) -> tuple[Callable, Callable]:
    return tuple(jax.jit(fn.__wrapped__, static_argnames=static, donate_argnums=(0,),
                         compiler_options=dict(options))
                 for fn, static in ((train_steps, _TRAIN_STEPS_STATIC),
                                    (multi_train_steps, _MULTI_STEPS_STATIC)))


def _loop_jits(options: dict):
    """``(train_steps, multi_train_steps)`` compiled with XLA ``options``: the module's own
    functions without options, else the same functions jitted with them (cached)."""
    if not options:
        return train_steps, multi_train_steps
    return _jit_with_options(tuple(sorted(options.items())))


def loop_functions(platform: str, *, graph_convolutions: bool = True):
    """``(train_steps, multi_train_steps)`` as :func:`train_and_evaluate` runs them on
    ``platform``: compiled with :func:`loop_compiler_options` (none on CPU and TPU: the
    module's own functions)."""
    return _loop_jits(loop_compiler_options(platform, graph_convolutions=graph_convolutions))


def _graph_failure_hint(error: Exception, options: dict) -> str | None:
    """What to do when a training call fails while XLA records cuDNN's convolutions into its
    CUDA graphs: the option is new and measured on one card (an H200); on an H200 its
    concurrent variant failed with ``<unknown cudnn status: 5003>`` (benchmarks/NOTES.md)."""
    text = str(error).lower()
    if not options or not ("cudnn" in text or "command buffer" in text or "cuda graph" in text):
        return None
    return ("the training call failed while XLA recorded cuDNN's convolutions into CUDA "
            "graphs (config.gpu_graph_convolutions=True); run again with "
            "--config.gpu_graph_convolutions=False (the run resumes from its last checkpoint)")


def _lock_run_directories(workdir: Path, member_dirs) -> contextlib.ExitStack:
    """Locks ``workdir`` and each member's directory for the run
    (:func:`calib_jax.files.hold_directory_lock`, taken by process 0); returns the held
    locks. Raises :class:`calib_jax.files.DirectoryInUseError` on every process if process 0
    found one in use by another process."""
    locks, refusal = contextlib.ExitStack(), None
    if jax.process_index() == 0:
        try:
            for directory in dict.fromkeys([workdir, *member_dirs]):
                locks.enter_context(hold_directory_lock(directory, "training"))
        except DirectoryInUseError as error:
            locks.close()
            refusal = error
    if jax.process_count() > 1:  # the other processes must not go on (they would hang)
        from jax.experimental import multihost_utils
        if int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))) \
                and refusal is None:
            refusal = DirectoryInUseError(f"process 0 found {workdir} (or a member's directory) "
                                          f"in use by another process: see its message.")
    if refusal is not None:
        raise refusal
    return locks


def _truncate_log(path, epochs_done: int) -> None:
    """Drops ``log.jsonl`` records of epochs after the restored checkpoint (a resumed
    run writes them again), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a kill mid-write
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _write_members_listing(workdir, names, config) -> None:
    """Writes ``workdir/members.json``: ``{"members": [...], "config": ...}``, atomically.

    The listing keeps the members that earlier programs trained in ``workdir`` (their
    directories still there) before this program's new ones: a row trained as two groups
    (``sweep.py --vmap-rows`` after some cells were done, or a member added later) lists all
    its runs, so ``calib_jax.evaluate`` on ``workdir`` still finds every one. ``config`` is
    this program's config; each member's own ``config.json`` is its record.
    """
    path = Path(workdir) / "members.json"
    earlier = json.loads(path.read_text()).get("members", []) if path.exists() else []
    listed = [m for m in earlier if m not in names and (Path(workdir) / m).is_dir()]
    atomic_write_text(path, json.dumps(
        {"members": listed + list(names), "config": json.loads(config.to_json())}, indent=2))


def _restore_members(ckpts, templates):
    """``(states, metas)`` of the newest epoch that every member can restore, or None.

    Members are saved one after another, so a run killed mid-save has some
    members one checkpoint ahead; all restart from the newest common epoch (the
    later checkpoints are recomputed identically, see ``RunCheckpoints.save``).
    """
    if len(ckpts) == 1:
        restored = ckpts[0].restore(templates[0])
        return None if restored is None else ([restored[0]], [restored[1]])
    common = set.intersection(*(set(c.latest.all_steps()) for c in ckpts))
    for epoch in sorted(common, reverse=True):
        restored = [c.restore(t, epoch) for c, t in zip(ckpts, templates)]
        if all(r is not None for r in restored):
            return [r[0] for r in restored], [r[1] for r in restored]
    for c, t in zip(ckpts, templates):  # fresh start: still refuse a foreign run's checkpoints
        if c.latest.all_steps():
            c.restore(t)
    return None


def _warn_progress_not_shared(names, ckpts) -> None:
    """Says so on stderr when members start from epoch 0 although some have checkpoints.

    That happens when no epoch is saved for every member (a member added to a half-trained
    group, or a half-trained run grouped with new ones): every member trains again from the
    start. The results are those of the runs all the same; the earlier progress is recomputed.
    For a single run (``names == [""]``) it happens when none of its checkpoints can be read.
    """
    steps = {name: c.latest.all_steps() for name, c in zip(names, ckpts)}
    saved = {name: max(epochs) for name, epochs in steps.items() if epochs}
    if not saved:
        return
    if names == [""]:  # one run: every checkpoint it has could not be read
        from calib_jax import checkpoints
        print(f"warning: none of the checkpoints in {ckpts[0].latest.directory} could be read "
              f"(epochs {', '.join(map(str, sorted(steps[''])))}), so training starts again "
              f"from epoch 0; each unreadable one is replaced (its files moved to "
              f"{ckpts[0].workdir / checkpoints.UNREADABLE_FOLDER}/) when its epoch is "
              f"recomputed.",
              file=sys.stderr, flush=True)
        return
    have = ", ".join(f"{name}: up to epoch {epoch}" for name, epoch in saved.items())
    lack = ", ".join(name for name in names if name not in saved) or "none"
    print(f"warning: no epoch has a readable checkpoint of every member ({have}; members without "
          f"any: {lack}), so all {len(names)} members train from epoch 0 and the earlier "
          f"progress is recomputed. To keep it, resume the partly trained members with their own "
          f"loss list and train the others in a program of their own (the same --workdir is "
          f"fine).", file=sys.stderr, flush=True)


def _training_data(config):
    """``(images, labels, val_split, num_classes)``: the training examples (the first
    ``config.train_subset`` of a permutation drawn with ``config.seed``, when it is set) and
    the validation split."""
    from calib_jax.data import datasets

    options = dict(data_dir=config.data_dir or None, **dataset_options(config))
    train_split = datasets.load(config.dataset, "train", **options)
    val_split = datasets.load(config.dataset, "val", **options)
    images, labels = train_split.inputs, train_split.labels
    if config.train_subset > len(labels):
        raise ConfigError(f"config.train_subset = {config.train_subset}: larger than the "
                          f"training split ({len(labels)} examples); use 0 for all of them")
    if config.train_subset:
        # Drawn with config.seed: members share it (validate_config refuses several seeds).
        subset = np.random.default_rng(config.seed).permutation(len(labels))[:config.train_subset]
        images, labels = images[subset], labels[subset]
    if config.batch_size > len(labels):
        # Checked here, with the split's size known, to be stated as the config's error (the
        # pipeline's own check would stop the run with a traceback).
        raise ConfigError(f"config.batch_size = {config.batch_size}: larger than the "
                          f"{len(labels)} training examples"
                          f"{' of config.train_subset' if config.train_subset else ''}; an "
                          f"epoch trains full batches only")
    return images, labels, val_split, train_split.num_classes


def _resume(ckpts, templates, names, member_dirs, *, is_chief: bool, num_epochs: int,
            workdir: Path):
    """``(member_states, start_epoch, best_accuracies)``: the newest epoch every member can
    restore (:func:`_restore_members`), else the ``templates`` from epoch 0.

    Also reads each member's best checkpoint (``RunCheckpoints.mend_best``): one that cannot
    be read is rewritten from its epoch's periodic checkpoint while that is kept (before
    rotation deletes the last good copy), and one newer than the resume point (saved between
    two periodic ones) is replaced when the run recomputes its epoch
    (``RunCheckpoints.save``), instead of staying damaged for good.
    """
    restored = _restore_members(ckpts, templates)
    start_epoch, best_accs, states = 0, [-1.0] * len(ckpts), templates
    if restored is None:
        if is_chief:
            _warn_progress_not_shared(names, ckpts)
    else:
        states, metas = restored
        start_epoch = int(metas[0]["epoch"])
        best_accs = [float(m.get("best_val_accuracy", -1.0)) for m in metas]
        if is_chief:
            together = f" with {len(ckpts)} members" if len(ckpts) > 1 else ""
            print(f"resumed from {member_dirs[0]}/checkpoints/{start_epoch} (epoch "
                  f"{start_epoch}){together}")
            if start_epoch >= num_epochs:  # the command of a finished run, run again
                print(f"the run has finished its {num_epochs} epochs: nothing to train "
                      f"(--config.num_epochs=N lengthens it; python -m calib_jax.evaluate "
                      f"--workdir {workdir} evaluates it)")
    for ckpt, template in zip(ckpts, templates):
        ckpt.mend_best(template)
    return states, start_epoch, best_accs


def _open_member_logs(workdir, members, member_dirs, config, start_epoch: int) -> list:
    """Writes each member's ``config.json`` (and ``workdir/members.json`` for several), cuts
    ``log.jsonl`` back to ``start_epoch`` (:func:`_truncate_log`) and returns a TensorBoard
    writer per member. Process 0 only."""
    # TensorBoard event files (tensorboardX needs no TensorFlow), beside log.jsonl.
    from tensorboardX import SummaryWriter

    if len(members) > 1:
        _write_members_listing(workdir, [name for name, _ in members], config)
    writers = []
    for d, (_, c) in zip(member_dirs, members):
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "config.json", c.to_json(indent=2))
        _truncate_log(d / "log.jsonl", start_epoch)
        # purge_step: TensorBoard hides the earlier session's scalars of the epochs this run
        # recomputes (the log.jsonl counterpart of _truncate_log).
        writers.append(SummaryWriter(str(d / "tensorboard"), purge_step=start_epoch + 1))
    return writers


class _EpochProgress:
    """The progress line of one epoch (:func:`_show_progress`): images/s so far and the run's
    ETA, after each call that crosses a multiple of ``config.log_every_steps`` and after the
    last; :meth:`end` closes the line on a terminal."""

    def __init__(self, config, epoch: int, steps: int):
        self.config, self.epoch, self.steps, self.shown = config, epoch, steps, False

    def __call__(self, first: int, count: int, seconds: float) -> None:
        """After the call of steps ``first .. first + count`` was issued, ``seconds`` into the
        epoch (the rate counts the ``first`` steps issued before it)."""
        config, every = self.config, self.config.log_every_steps
        if not first or ((first + count) // every == first // every
                         and first + count != self.steps):
            return
        rate = first * config.batch_size / max(seconds, 1e-9)
        eta = (self.steps - first + self.steps * (config.num_epochs - self.epoch - 1)) \
            * config.batch_size / max(rate, 1e-9)
        _show_progress(f"epoch {self.epoch + 1}/{config.num_epochs} step {first + count}/"
                       f"{self.steps} {rate:,.0f} {_example_unit(config.dataset)}/s, "
                       f"ETA {eta / 60:.1f} min")
        self.shown = True

    def end(self) -> None:
        if self.shown and sys.stdout.isatty():
            print()  # ends the progress line that \r kept rewriting


def _train_epoch(run_chunk, state, orders, epoch: int, *, steps: int, per_call: int,
                 num_members: int, wait_each_call: bool, progress=None):
    """One epoch in calls of ``per_call`` steps (``run_chunk(state, orders, first, count,
    epoch)``); returns ``(state, loss_sums, correct_counts, seconds)``, sums per member.

    The host reads each call's losses while the next call runs (it stays one call ahead).
    ``wait_each_call`` waits for every call first: on CPU, unwaited collectives can deadlock.
    ``progress(first, count, seconds)`` is told of each call after the first.
    """
    start = time.perf_counter()
    loss_sums, correct = np.zeros(num_members), np.zeros(num_members, np.int64)

    def add(metrics):
        done = jax.device_get(metrics)
        loss_sums[:] += np.asarray(done["loss"], np.float64).reshape(-1, num_members).sum(0)
        correct[:] += np.asarray(done["correct"], np.int64).reshape(-1, num_members).sum(0)

    pending = None
    for first in range(0, steps, per_call):
        count = min(per_call, steps - first)  # a shorter last call compiles once more
        state, metrics = run_chunk(state, orders, first, count, epoch)
        if wait_each_call:
            jax.block_until_ready(metrics)
        if pending is not None:
            add(pending)
        pending = metrics
        if progress is not None:
            progress(first, count, time.perf_counter() - start)
    add(pending)
    return state, loss_sums, correct, time.perf_counter() - start


def _epoch_record(epoch: int, spec: LossSpec, loss_sum: float, correct: int, val: dict, *,
                 steps: int, batch_size: int, seconds: float) -> dict:
    """A member's line of ``log.jsonl`` for ``epoch`` (counted from 1): its training loss per
    image and accuracy over the epoch's ``steps`` batches, images/s, and the validation
    metrics ``val``."""
    # Batch losses are sums per batch, or already means (mean reduction, Brier).
    per_image = spec.mean_reduction or spec.name == "brier"
    return {"epoch": epoch,
            "train_loss_per_image": loss_sum / (steps if per_image else steps * batch_size),
            "train_accuracy": correct / (steps * batch_size),
            "images_per_second": steps * batch_size / seconds, **val}


def _example_unit(dataset: str) -> str:
    """What the printed rates and losses count one example as: ``"img"`` for the image data
    sets, ``"ex"`` (a document, a sentence) for the text ones. The log's keys keep their
    names (``train_loss_per_image``, ``images_per_second``) whatever the data set."""
    return "ex" if dataset in TEXT_DATASETS else "img"


def _log_epoch(record: dict, name: str, run_dir: Path, writer, *, num_epochs: int,
               several: bool, unit: str) -> None:
    """Prints a member's epoch (``unit``: :func:`_example_unit`), appends it to
    ``run_dir/log.jsonl`` and to TensorBoard."""
    print(f"epoch {record['epoch']}/{num_epochs}{' ' + name if name else ''}: "
          f"loss/{unit} {record['train_loss_per_image']:.4f} "
          f"train acc {record['train_accuracy']:.4f} "
          f"val acc {record['val_accuracy']:.4f} val NLL {record['val_nll']:.4f} "
          f"val ECE {record['val_ece']:.4f} "
          f"({record['images_per_second']:,.0f} {unit}/s{' per member' if several else ''})")
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    for key, value in record.items():
        if key != "epoch":
            writer.add_scalar(key, value, global_step=record["epoch"])
    writer.flush()


def train_and_evaluate(config, workdir):
    """Trains ``config`` into ``workdir``, resuming from its latest checkpoint.

    Writes ``config.json``, ``log.jsonl`` (one line per epoch: loss, train
    accuracy, validation accuracy / NLL / ECE, images/s), the same scalars as
    TensorBoard event files under ``tensorboard/``, and checkpoints
    (:class:`calib_jax.checkpoints.RunCheckpoints`): every
    ``checkpoint_every_epochs``, the final epoch, and the best validation
    accuracy. Only process 0 writes logs. The run is deterministic given the
    config: a restarted run continues with the same data order and random
    numbers, so it ends with exactly the parameters of an uninterrupted run.
    A ``workdir`` that holds training of another configuration is refused before
    any compute (:func:`check_resumable`; only ``RESUMABLE_FIELDS`` may change).
    An epoch whose training loss or validation logits are not finite raises
    :class:`TrainingDivergedError` before it is logged or saved (:func:`_check_finite_epoch`).
    While it trains, the run holds a lock on ``workdir`` and each member's directory
    (:func:`calib_jax.files.hold_directory_lock`): another process training into one of them
    (the same command launched twice, two sweeps over one work root) raises
    :class:`calib_jax.files.DirectoryInUseError` naming this one, before writing anything.

    Steps run ``steps_per_call`` at a time in one compiled call
    (:func:`train_steps`: batches built on the device, no per-step host work;
    0 = :func:`default_steps_per_call`: a divisor of the epoch's steps near
    ``log_every_steps`` on GPU / TPU, 1 on CPU). Checkpoints are written in the
    background while training goes on. On GPU the calls run over one flat parameter
    vector (``config.param_layout``, :func:`default_flat_params`) and compile with
    cuDNN's convolutions in XLA's CUDA graphs (``config.gpu_graph_convolutions``,
    :func:`loop_compiler_options`); a call that fails under the graphs raises a
    RuntimeError that names the switch.

    **Several runs in one program**: when ``config.loss`` lists losses
    (``"[ce,brier,mmce_weighted,label_smoothing,focal,flsd53]"``, ``focal<g>`` for
    other gammas) and / or ``config.seeds`` lists seeds, the members of
    :func:`run_members` train together as one program (:func:`multi_train_steps`;
    ``config.multi_mode``: by default ``sequential`` on CPU and GPU, ``vmap`` on TPU,
    :func:`default_member_mode`), each with the batches, initialisation and
    random numbers of its single run. Member ``m`` lives in ``workdir/m/``, a
    complete run directory (its own single-run ``config.json``, log,
    TensorBoard files and checkpoints) that ``calib_jax.evaluate`` reads like
    any other; ``workdir/members.json`` lists them, after the members that earlier programs
    trained in the same ``workdir`` (:func:`_write_members_listing`).

    Returns the final state (a stacked state for several members).
    """
    from calib_jax import checkpoints

    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file; give a directory (new, or a run's)")
    if why := unwritable_reason(workdir):  # before loading the data
        raise ConfigError(f"workdir {workdir}: {why}; give a directory you can write.")
    mesh = pipeline.data_mesh()
    validate_config(config, mesh.size)
    members = run_members(config)
    names = [name for name, _ in members]
    member_dirs = [member_dir(workdir, name) for name in names]
    _check_run_layout(workdir, several=names != [""])
    for d, (_, c) in zip(member_dirs, members):
        check_resumable(d, c)
    images, labels, val_split, num_classes = _training_data(config)
    mean, std = input_normalization(config, "train")
    # From here on the run writes into its directories, and one process at a time may: a
    # command launched twice, or two sweeps over one work root, is refused (or skipped).
    with _lock_run_directories(workdir, member_dirs):
        for d, (_, c) in zip(member_dirs, members):  # again, under the lock: another
            check_resumable(d, c)  # process may have trained them since the first check
        steps = pipeline.steps_per_epoch(len(labels), config.batch_size)
        templates = [replicate(state_for_config(c, num_classes, images.shape[1:], steps), mesh)
                     for _, c in members]
        # Under the lock: no other process writes these checkpoints, so the unfinished saves
        # of a killed process are removed.
        ckpts = [checkpoints.RunCheckpoints(d, keep=config.keep_checkpoints,
                                            clean_up_unfinished=True) for d in member_dirs]
        is_chief = jax.process_index() == 0
        member_states, start_epoch, best_accs = _resume(
            ckpts, templates, names, member_dirs, is_chief=is_chief,
            num_epochs=config.num_epochs, workdir=workdir)
        saved_epoch = start_epoch  # the newest periodic checkpoint of every member
        writers = _open_member_logs(workdir, members, member_dirs, config, start_epoch) \
            if is_chief else []
        state = member_states[0] if len(members) == 1 else \
            jax.device_put(stack_states(member_states), replicated(mesh))
        del member_states, templates
        x_dev, y_dev = pipeline.put_on_device(images, labels, replicated(mesh))
        platform = jax.devices()[0].platform
        specs = tuple(LossSpec.from_config(c) for _, c in members)
        seeds = tuple(int(c.seed) for _, c in members)
        dtype = _DTYPES[config.dtype]
        loop_options = dict(batch_size=config.batch_size,
                            augment=config.augment and mean is not None,
                            mean=mean, std=std, dtype=dtype, sharding=batch_sharding(mesh),
                            unroll=config.get("scan_unroll", 0) or default_unroll(platform,
                                                                                  len(members)),
                            flat_params=_param_layout_is_flat(
                                config.get("param_layout", "auto"), platform, state.params))
        compiler_options = loop_compiler_options(
            platform, graph_convolutions=config.get("gpu_graph_convolutions", True))
        steps_fn, multi_steps_fn = _loop_jits(compiler_options)
        eval_options = dict(mean=mean, std=std, dtype=dtype, batch_size=config.eval_batch_size)
        per_call = config.get("steps_per_call", 0) or default_steps_per_call(
            steps, config.log_every_steps, platform)
        member_mode = config.get("multi_mode", "auto")
        if member_mode == "auto":
            member_mode = default_member_mode(platform)

        def run_chunk(state, orders, first, count, epoch):
            try:
                if len(members) == 1:
                    return steps_fn(state, x_dev, y_dev, orders[0], first, epoch, seeds[0],
                                    num_steps=count, loss_name=specs[0], **loop_options)
                return multi_steps_fn(state, x_dev, y_dev, orders, first, epoch,
                                      jnp.asarray(seeds, jnp.int32), num_steps=count,
                                      losses_=specs, shared_batch=len(set(seeds)) == 1,
                                      members=member_mode, **loop_options)
            except Exception as error:
                if hint := _graph_failure_hint(error, compiler_options):
                    raise RuntimeError(hint) from error
                raise

        # Checkpoints are written in the background (RunCheckpoints): closing waits for them,
        # also when training stops with an exception or a SIGTERM (a scheduler preempting the
        # job), so nothing already saved or being saved is lost.
        with exit_on_sigterm(), contextlib.ExitStack() as closing:
            for closeable in (*ckpts, *writers):  # each closed even if another fails to
                closing.callback(closeable.close)
            for epoch in range(start_epoch, config.num_epochs):
                by_seed = {s: pipeline.epoch_order(s, epoch, len(labels)) for s in set(seeds)}
                orders = jax.device_put(jnp.stack([by_seed[s] for s in seeds]), replicated(mesh))
                progress = _EpochProgress(config, epoch, steps) if is_chief else None
                state, loss_sums, correct, seconds = _train_epoch(
                    run_chunk, state, orders, epoch, steps=steps, per_call=per_call,
                    num_members=len(members), wait_each_call=platform == "cpu",
                    progress=progress)
                if progress is not None:
                    progress.end()
                done_epochs = epoch + 1
                periodic = done_epochs % config.checkpoint_every_epochs == 0 or \
                    done_epochs == config.num_epochs
                vals = _validate_members(state, val_split.inputs, val_split.labels,
                                         len(members), member_mode, **eval_options)
                _check_finite_epoch(config, done_epochs, names, loss_sums, vals, saved_epoch)
                for k, (name, val) in enumerate(zip(names, vals)):
                    record = _epoch_record(done_epochs, specs[k], loss_sums[k], correct[k], val,
                                           steps=steps, batch_size=config.batch_size,
                                           seconds=seconds)
                    improved = val["val_accuracy"] > best_accs[k]
                    best_accs[k] = max(best_accs[k], val["val_accuracy"])
                    # The log line goes first: a run killed in between resumes from the previous
                    # checkpoint and drops the extra line (_truncate_log); the other order would
                    # lose this epoch's line.
                    if is_chief:
                        _log_epoch(record, name, member_dirs[k], writers[k],
                                   num_epochs=config.num_epochs, several=len(members) > 1,
                                   unit=_example_unit(config.dataset))
                    if periodic or improved:
                        member = state if len(members) == 1 else unstack_state(state, k)
                        ckpts[k].save(done_epochs, member,
                                      {"best_val_accuracy": best_accs[k],
                                       "final": done_epochs == config.num_epochs},
                                      periodic=periodic,
                                      best_metrics={"val_accuracy": val["val_accuracy"]}
                                      if improved else None)
                if periodic:
                    saved_epoch = done_epochs
        return state


@contextlib.contextmanager
def exit_on_sigterm():
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread.

    Python's default for SIGTERM (what ``kill``, SLURM and preemptible cloud machines send
    before SIGKILL) ends the process at once, skipping ``finally``: a checkpoint being written
    in the background is lost and the run resumes from the one before, up to
    ``checkpoint_every_epochs`` epochs back. As ``SystemExit`` the signal unwinds the training
    loop, whose ``finally`` waits for the checkpoints in flight. A second SIGTERM while they
    are written is ignored. Outside the main thread (where signals cannot be handled) the
    block runs unchanged; the previous handler is restored after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the checkpoints finish
        print("SIGTERM: stopping; waiting for the checkpoints being written (rerun the same "
              "command to resume)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show_progress(text: str) -> None:
    """One progress line: rewritten in place on a terminal, a line of its own in a log file.

    (A ``\\r`` in a redirected log, e.g. a cluster job's, glues every update of an epoch into
    one unreadable line.)
    """
    if sys.stdout.isatty():
        print("\r" + text, end="", flush=True)
    else:
        print(text, flush=True)


class _DropOrbaxInfo(logging.Filter):
    """Drops Orbax's records below WARNING (it logs to absl's logger, not one of its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or \
            f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


def quiet_library_info_logs() -> None:
    """Keeps Orbax's and JAX's INFO records out of the training CLI's log.

    Under ``absl.app`` the log level is INFO. Orbax writes ~40 INFO lines per checkpoint
    (threads, transfers, compression ratios): a 350-epoch run's progress would drown in
    thousands of them. JAX writes one at start-up on every machine without a TPU, "Unable to
    initialize backend 'tpu': ... Failed to open libtpu.so", which reads like an error on a GPU.
    Their warnings and errors still show; ``--verbosity=0`` (or any ``--verbosity`` given
    explicitly) keeps everything. Idempotent.
    """
    logger = logging.getLogger("absl")  # Orbax logs to absl's logger, not one of its own
    if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
        logger.addFilter(_DropOrbaxInfo())
    jax_logger = logging.getLogger("jax")  # JAX's loggers are jax.* (records propagate up)
    if jax_logger.getEffectiveLevel() < logging.WARNING:
        jax_logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def concise_warnings():
    """For the command-line tools: calib_jax's own warnings (a checkpoint skipped or moved
    aside, ...) print as one ``warning: ...`` line on stderr, without the source line that
    Python's format adds; other libraries' warnings keep that format. Restored on exit."""
    package = str(Path(__file__).resolve().parent)
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if str(Path(filename).resolve()).startswith(package):
                print(f"warning: {message}", file=file or sys.stderr, flush=True)
            else:
                default(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def main(argv=None):
    """``python -m calib_jax.train --config path.py[:k=v,...] --workdir DIR [--config.k=v]``."""
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Training config file (path[:overrides]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
    flags.mark_flags_as_required(["config", "workdir"])

    started = []  # set once the flags are parsed: later errors are not the flags'

    def run(_):
        started.append(True)
        config = flags_.config
        try:
            # ml_collections defers a missing or unreadable file's error to the config's first
            # use, where it surfaced as a 40-line traceback from inside the config check.
            config.get("loss")
        except OSError as e:
            why = str(e.__cause__ or e).strip().splitlines()[-1].strip()  # "[Errno 2] No such..."
            sys.exit(f"--config: cannot read the config file: {why}\nGive a Python file with "
                     f"get_config(), e.g. experiments/configs/cifar10.py[:key=value,...]")
        if not flags_["verbosity"].present:
            quiet_library_info_logs()
        maybe_initialize_distributed(flags_.distributed)
        from calib_jax.data.sources import DamagedDataError, DataNotFoundError
        try:
            with concise_warnings():
                train_and_evaluate(config, flags_.workdir)
        except (ConfigError, DamagedDataError, DataNotFoundError, DirectoryInUseError,
                TrainingDivergedError) as e:
            # Their messages say what is wrong and what to do; a traceback adds nothing.
            sys.exit(f"{type(e).__name__}: {e}")

    try:
        app.run(run, argv=argv)
    except (AttributeError, KeyError) as error:
        argv = sys.argv if argv is None else argv
        unknown = None if started else _unknown_override(error, argv)
        if unknown is None:
            raise
        sys.exit(unknown)


def _config_fields(argv) -> list[str] | None:
    """The fields of the config that ``argv``'s ``--config path.py[:arg]`` names, loaded as
    ml_collections loads it (``get_config(arg)``, or ``get_config()`` without ``arg``); None
    when it cannot be loaded."""
    import runpy

    try:
        at = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
        spec = argv[at].split("=", 1)[1] if "=" in argv[at] else argv[at + 1]
        path, _, arg = spec.partition(":")
        get_config = runpy.run_path(path)["get_config"]
        return sorted((get_config(arg) if arg else get_config()).keys())
    except Exception:  # noqa: BLE001 -- only a list for a message: without it, none is given
        return None


def _unknown_override(error: Exception, argv) -> str | None:
    """The message for ``--config.<field>=...`` naming a field the config lacks (and the
    config's fields), or None when ``error`` is not that one. (ml_collections raises it while
    absl parses the flags: a 30-line traceback ending in ``AttributeError: "'lr'"``.)"""
    innermost = error
    while innermost.__context__ is not None:
        innermost = innermost.__context__
    if not (isinstance(innermost, KeyError) and innermost.args
            and isinstance(innermost.args[0], str)):
        return None
    field = innermost.args[0]
    given = [a.split("=", 1)[0] for a in argv[1:]
             if a.startswith("--config.") and a.split("=", 1)[0][len("--config."):]
             .split(".")[0] == field]
    if not given:
        return None
    hint = ""
    context = error.__context__
    if isinstance(context, KeyError) and context.args and "\n" in str(context.args[0]):
        hint = " " + str(context.args[0]).split("\n", 1)[1].strip()  # "Did you mean ...?"
    fields = _config_fields(argv)
    listing = f" Its fields: {', '.join(fields)}." if fields else ""
    return f"{given[0]}: the config has no field {field!r}.{hint}{listing}"


if __name__ == "__main__":
    main()
