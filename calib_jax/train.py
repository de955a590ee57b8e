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

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from calib_jax import losses
from calib_jax.data import pipeline
from calib_jax.files import atomic_write_text

__all__ = ["LOSS_NAMES", "LossSpec", "TrainState", "batch_loss", "batch_sharding",
           "create_train_state", "make_optimizer", "multi_train_step", "piecewise_lr", "predict",
           "replicate", "replicated", "stack_states", "train_step", "unstack_state"]

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
      epoch: used by ``flsc531`` (gamma 5 / 3 / 1 from epochs 0 / 100 / 250).
    """
    spec = name if isinstance(name, LossSpec) else LossSpec(name, **options)
    tiers = dict(thresholds=(spec.flsd_threshold, 0.5), gammas=(5.0, 3.0))
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
    n = logits.shape[0]
    if spec.name in per_example:
        total = jnp.sum(per_example[spec.name]())
    elif spec.name == "brier":
        return jnp.mean(losses.brier_score(logits, labels))
    elif spec.name == "mmce_weighted":
        total = n * (jnp.mean(losses.cross_entropy(logits, labels))
                     + spec.mmce_lambda * losses.mmce_weighted(logits, labels))
    else:
        raise ValueError(f"unknown loss {spec.name!r}; choose one of {LOSS_NAMES}.")
    return total / n if spec.mean_reduction else total


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
        optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        last,
    )


# optax >= 0.2.5 has optax.tree.norm; global_norm is deprecated there.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


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


def create_train_state(rng, model, tx, input_shape, input_dtype=jnp.float32) -> TrainState:
    """Initialises parameters, BatchNorm statistics, optimiser state and the dropout key."""
    init_rng, dropout_rng = jax.random.split(rng)
    variables = jax.jit(model.init, static_argnames="train")(
        init_rng, jnp.zeros(input_shape, input_dtype), train=False)
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
    """``state`` with every array replicated over ``mesh``."""
    return jax.device_put(state, replicated(mesh))


def _model_inputs(inputs, mean, std, dtype):
    """Images are normalised on device; token ids (``mean=None``) pass through."""
    return inputs if mean is None else pipeline.normalize(inputs, mean, std, dtype)


def _apply_step(state: TrainState, x, labels, loss_fn):
    """The optimiser step shared by :func:`train_step` and :func:`multi_train_step`."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                         train=True, mutable=["batch_stats"],
                                         rngs={"dropout": dropout_rng})
        return loss_fn(logits), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "correct": correct, "grad_norm": _tree_norm(grads)}


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
    x = _model_inputs(images, mean, std, dtype)
    return _apply_step(state, x, labels,
                       lambda logits: batch_loss(loss_name, logits, labels, epoch))


def stack_states(states) -> TrainState:
    """K states of the same model and optimiser, stacked on a new leading axis."""
    # The members' static fields (model, optimiser) are equal but not identical
    # objects, so stack leaves under the first member's tree structure.
    treedef = jax.tree_util.tree_structure(states[0])
    leaves = [jax.tree_util.tree_leaves(s) for s in states]
    if any(len(member) != len(leaves[0]) for member in leaves):
        raise ValueError("`states` must share one model and optimiser structure.")
    return jax.tree_util.tree_unflatten(treedef, [jnp.stack(xs) for xs in zip(*leaves)])


def unstack_state(stacked: TrainState, index: int) -> TrainState:
    """Member ``index`` of :func:`stack_states`."""
    return jax.tree_util.tree_map(lambda x: x[index], stacked)


@functools.partial(jax.jit, static_argnames=("losses_", "mean", "std", "dtype"),
                   donate_argnums=(0,))
def multi_train_step(stacked: TrainState, images, labels, epoch, *, losses_, mean, std,
                     dtype=jnp.float32):
    """K runs that differ in loss (or seed) as one vmapped step over stacked states.

    Every member sees the same batch; member ``k`` uses ``losses_[k]`` (names or
    :class:`LossSpec`). A batch of 128 leaves an accelerator idle; K members
    fill it with one program. Returns ``(stacked_state, metrics)`` with ``[K]`` metrics.
    """
    x = _model_inputs(images, mean, std, dtype)
    branches = [functools.partial(batch_loss, spec) for spec in losses_]

    def member(state, k):
        return _apply_step(state, x, labels,
                           lambda logits: jax.lax.switch(k, branches, logits, labels, epoch))

    return jax.vmap(member)(stacked, jnp.arange(len(losses_)))


@functools.partial(jax.jit, static_argnames=("apply_fn", "mean", "std", "dtype"))
def _predict_batch(apply_fn, params, batch_stats, images, mean, std, dtype):
    x = _model_inputs(images, mean, std, dtype)
    return apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)


def predict(state: TrainState, images: np.ndarray, *, mean, std, batch_size: int = 500,
            dtype=jnp.float32) -> np.ndarray:
    """Logits ``[N, C]`` of every example (fixed-size padded batches, one compilation).

    ``mean=None`` for token inputs (no normalisation)."""
    # Put each batch where the parameters are (replicated over the mesh in a
    # data-parallel run, which also works across hosts), not on a default device.
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    sharding = leaf.sharding if isinstance(leaf.sharding, jax.sharding.NamedSharding) else None
    out = []
    for batch in pipeline.eval_batches(images.shape[0], batch_size):
        x = images[batch.index]
        x = jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)
        logits = _predict_batch(state.apply_fn, state.params, state.batch_stats, x,
                                None if mean is None else tuple(mean),
                                None if std is None else tuple(std), dtype)
        out.append(np.asarray(jax.device_get(logits))[batch.mask])
    return np.concatenate(out)


# ----------------------------------------------------------------------------
# The training loop: config -> checkpoints in a work directory.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMAGE_DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "synthetic")
# Token-id data sets (SST: packed trees, models.text.pack_trees) and their models.
TEXT_DATASETS = ("20news", "sst")
TEXT_MODELS = ("global_pooling_cnn", "tree_lstm")


def validate_config(config, num_devices: int) -> None:
    """Raises ``ValueError`` naming the field for any bad value, before any compute."""
    from calib_jax import models as model_zoo

    def bad(field, why):
        raise ValueError(f"config.{field} = {config.get(field)!r}: {why}")

    if config.loss not in LOSS_NAMES:
        bad("loss", f"unknown loss; choose one of {LOSS_NAMES}")
    if config.model not in model_zoo.names():
        bad("model", f"unknown model; choose one of {model_zoo.names()}")
    if config.dataset not in IMAGE_DATASETS + TEXT_DATASETS:
        bad("dataset", f"training supports {IMAGE_DATASETS + TEXT_DATASETS}")
    if (config.dataset in TEXT_DATASETS) != (config.model in TEXT_MODELS):
        kind = "text" if config.dataset in TEXT_DATASETS else "image"
        bad("model", f"{config.dataset!r} needs a {kind} model")
    if config.get("optimizer", "sgd") not in ("sgd", "adam", "adagrad"):
        bad("optimizer", "must be sgd, adam or adagrad")
    if not config.learning_rate > 0:
        bad("learning_rate", "must be > 0")
    if config.num_epochs < 1:
        bad("num_epochs", "must be >= 1")
    if config.batch_size < 1 or config.batch_size % num_devices:
        bad("batch_size", f"must be a positive multiple of the {num_devices} devices")
    if config.dtype not in _DTYPES:
        bad("dtype", f"must be one of {sorted(_DTYPES)}")
    for field in ("weight_decay", "clip_norm"):
        if config[field] < 0:
            bad(field, "must be >= 0")
    if not 0 <= config.momentum < 1:
        bad("momentum", "must be in [0, 1)")
    if config.gamma < 0:
        bad("gamma", "must be >= 0")
    if config.checkpoint_every_epochs < 1:
        bad("checkpoint_every_epochs", "must be >= 1")
    if list(config.lr_boundaries) != sorted(config.lr_boundaries):
        bad("lr_boundaries", "must be increasing")
    if config.train_subset < 0:
        bad("train_subset", "must be >= 0 (0 = all)")


def maybe_initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize()`` when the environment describes a cluster.

    Triggered by ``force`` or by ``JAX_COORDINATOR_ADDRESS`` (with
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) in the environment; on TPU pods
    and SLURM, ``initialize()`` finds the rest itself.
    """
    import os
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


def _validation_metrics(state, images, labels, mean, std, dtype, batch_size) -> dict:
    from calib_jax import metrics as cmetrics
    logits = predict(state, images, mean=mean, std=std, dtype=dtype, batch_size=batch_size)
    stats = cmetrics.update_stats(cmetrics.init_stats(logits.shape[1]), logits, labels)
    values = cmetrics.metrics_from_stats(stats)
    return {"val_accuracy": float(values["accuracy"]), "val_nll": float(values["nll"]),
            "val_ece": float(values["ece"])}


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


def dataset_options(config) -> dict:
    """Loader options a config implies (vocabulary size for text)."""
    return {"vocab_size": config.vocab_size} if config.dataset in TEXT_DATASETS else {}


def input_normalization(config, split: str):
    """``(mean, std)`` tuples for an image data set's split, ``(None, None)`` for text."""
    from calib_jax.data import datasets
    if config.dataset in TEXT_DATASETS:
        return None, None
    mean, std = datasets.normalization(
        config.dataset, split,
        reference_cifar100_test=config.get("reference_cifar100_test_norm", True))
    return tuple(mean), tuple(std)


def train_and_evaluate(config, workdir) -> TrainState:
    """Trains ``config`` into ``workdir``, resuming from its latest checkpoint.

    Writes ``config.json``, ``log.jsonl`` (one line per epoch: loss, train
    accuracy, validation accuracy / NLL / ECE, images/s), the same scalars as
    TensorBoard event files under ``tensorboard/``, and checkpoints
    (:class:`calib_jax.checkpoints.RunCheckpoints`): every
    ``checkpoint_every_epochs``, the final epoch, and the best validation
    accuracy. Only process 0 writes logs. The run is deterministic given the
    config: a restarted run continues with the same data order and random
    numbers, so it ends with exactly the parameters of an uninterrupted run.
    """
    import json
    import time
    from pathlib import Path

    from calib_jax import checkpoints
    from calib_jax.data import datasets

    workdir = Path(workdir)
    mesh = pipeline.data_mesh()
    validate_config(config, mesh.size)
    dtype = _DTYPES[config.dtype]
    is_chief = jax.process_index() == 0
    data_dir = config.data_dir or None
    options = dataset_options(config)
    train_split = datasets.load(config.dataset, "train", data_dir=data_dir, **options)
    val_split = datasets.load(config.dataset, "val", data_dir=data_dir, **options)
    images, labels = train_split.inputs, train_split.labels
    if config.train_subset:
        subset = np.random.default_rng(config.seed).permutation(len(labels))[:config.train_subset]
        images, labels = images[subset], labels[subset]
    mean, std = input_normalization(config, "train")
    loss_spec = LossSpec.from_config(config)
    steps = pipeline.steps_per_epoch(len(labels), config.batch_size)
    state = state_for_config(config, train_split.num_classes, images.shape[1:], steps)
    state = replicate(state, mesh)
    ckpt = checkpoints.RunCheckpoints(workdir, keep=config.keep_checkpoints)
    restored = ckpt.restore(state)
    start_epoch, best_acc = 0, -1.0
    if restored is not None:
        state, meta = restored
        start_epoch, best_acc = int(meta["epoch"]), float(meta.get("best_val_accuracy", -1.0))
        if is_chief:
            print(f"resumed from {workdir}/checkpoints/{start_epoch} (epoch {start_epoch})")
    if is_chief:
        atomic_write_text(workdir / "config.json", config.to_json(indent=2))
    writer = None
    if is_chief:
        # TensorBoard event files (tensorboardX needs no TensorFlow), beside log.jsonl.
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tensorboard"))
    x_dev, y_dev = pipeline.put_on_device(images, labels, replicated(mesh))
    sharding = batch_sharding(mesh)
    on_cpu = jax.devices()[0].platform == "cpu"
    for epoch in range(start_epoch, config.num_epochs):
        order = pipeline.epoch_order(config.seed, epoch, len(labels))
        start, loss_sum, correct = time.perf_counter(), 0.0, 0
        pending = []
        for step in range(steps):
            xb, yb = pipeline.train_batch(x_dev, y_dev, order, step, seed=config.seed,
                                          epoch=epoch, batch_size=config.batch_size,
                                          augment=config.augment and mean is not None,
                                          sharding=sharding)
            state, m = train_step(state, xb, yb, epoch, loss_name=loss_spec, mean=mean, std=std,
                                  dtype=dtype)
            pending.append(m)
            # On CPU, wait for each sharded step (unwaited collectives can deadlock);
            # elsewhere, only at logging points so the host runs ahead of the device.
            if on_cpu or (step + 1) % config.log_every_steps == 0 or step + 1 == steps:
                for done in jax.device_get(pending):
                    loss_sum += float(done["loss"])
                    correct += int(done["correct"])
                pending = []
            if is_chief and ((step + 1) % config.log_every_steps == 0 or step + 1 == steps):
                rate = (step + 1) * config.batch_size / (time.perf_counter() - start)
                eta = (steps - step - 1 + steps * (config.num_epochs - epoch - 1)) \
                    * config.batch_size / max(rate, 1e-9)
                print(f"\repoch {epoch + 1}/{config.num_epochs} step {step + 1}/{steps} "
                      f"{rate:,.0f} img/s, ETA {eta / 60:.1f} min", end="", flush=True)
        seconds = time.perf_counter() - start
        val = _validation_metrics(state, val_split.inputs, val_split.labels, mean, std, dtype,
                                  config.eval_batch_size)
        # Batch losses are sums per batch, or already means (mean reduction, Brier).
        per_image = loss_spec.mean_reduction or loss_spec.name == "brier"
        record = {"epoch": epoch + 1,
                  "train_loss_per_image": loss_sum / (steps if per_image else
                                                      steps * config.batch_size),
                  "train_accuracy": correct / (steps * config.batch_size),
                  "images_per_second": steps * config.batch_size / seconds, **val}
        improved = val["val_accuracy"] > best_acc
        best_acc = max(best_acc, val["val_accuracy"])
        done_epochs = epoch + 1
        periodic = done_epochs % config.checkpoint_every_epochs == 0 or \
            done_epochs == config.num_epochs
        meta = {"best_val_accuracy": best_acc, "final": done_epochs == config.num_epochs}
        if periodic or improved:
            ckpt.save(done_epochs, state, meta, periodic=periodic,
                      best_metrics={"val_accuracy": val["val_accuracy"]} if improved else None)
        if is_chief:
            print(f"\repoch {done_epochs}/{config.num_epochs}: loss/img "
                  f"{record['train_loss_per_image']:.4f} train acc {record['train_accuracy']:.4f} "
                  f"val acc {val['val_accuracy']:.4f} val NLL {val['val_nll']:.4f} "
                  f"val ECE {val['val_ece']:.4f} ({record['images_per_second']:,.0f} img/s)")
            with open(workdir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, global_step=done_epochs)
            writer.flush()
    if writer is not None:
        writer.close()
    ckpt.close()
    return state


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

    def run(_):
        maybe_initialize_distributed(flags_.distributed)
        train_and_evaluate(flags_.config, flags_.workdir)

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
