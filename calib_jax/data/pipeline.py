"""The training input pipeline: data on the device(s), augmentation in JAX.

CIFAR-scale data lives on the accelerator as uint8 (150 MB for CIFAR-10), so
the host only hands out step numbers. Every function here is pure except those that place
data or compare it across processes (:func:`put_on_device`, :func:`put_replicated`,
:func:`check_same_across_processes`):

* :func:`epoch_order` -- the permutation of epoch ``e``: ``permutation(fold_in(key(seed), e))``.
* :func:`train_batch` -- the ``step``-th global batch of that order, randomly
  cropped (zero padding 4) and flipped per example, from keys derived from the
  example's position in the global batch. One jitted call; with a ``sharding``
  its output is laid out over the mesh's data axis, each device computing only
  its own rows.
* :func:`eval_batches` -- index batches covering every example exactly once,
  the last one padded and masked.
* :func:`put_replicated` -- host values onto a replicated sharding; across processes
  (``jax.distributed``) checked equal everywhere with one collective over hashes, where
  ``jax.device_put`` would allgather every array.

Determinism: the batch contents depend only on ``(seed, epoch, step)`` and the
global batch size, never on the device or host count (random bits come from
``fold_in`` on global positions, and ``jax_threefry_partitionable`` makes
sharded random numbers equal to unsharded ones).

Epochs have ``len(data) // batch_size`` steps (static shapes); the few
examples left over are a different random subset each epoch.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EvalBatch", "augment_crop_flip", "batch_key", "check_same_across_processes",
           "data_mesh", "epoch_order", "eval_batches", "gather_batch", "normalize",
           "put_on_device", "put_replicated", "steps_per_epoch", "train_batch"]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch; raises if there is not even one.

    The remainder of an epoch's permutation is not trained that epoch (it differs from
    epoch to epoch), where the reference's PyTorch loader trains it as a smaller last batch:
    every step keeps one shape (README, "Conventions")."""
    if batch_size < 1 or num_examples < batch_size:
        raise ValueError(f"`batch_size` must be in [1, {num_examples}] for {num_examples} "
                         f"examples, got {batch_size}.")
    return num_examples // batch_size


def put_on_device(images: np.ndarray, labels: np.ndarray, sharding=None):
    """Copies a split (uint8 images or int token ids) to the device(s) once, replicated
    (``sharding`` = a replicated ``NamedSharding`` over the mesh, or None for the
    default device)."""
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.integer):
        raise TypeError(f"`images` must be uint8 images (normalised on device) or integer token "
                        f"ids, got {images.dtype}.")
    return put_replicated((images, np.asarray(labels, np.int32)), sharding,
                          what="the training split")


def _spans_processes(sharding) -> bool:
    return (sharding is not None and jax.process_count() > 1
            and len({d.process_index for d in sharding.device_set}) == jax.process_count())


def _digest(x: np.ndarray) -> np.ndarray:
    """8 bytes of BLAKE2b over ``x``'s dtype, shape and bytes."""
    h = hashlib.blake2b(f"{x.dtype.str}{x.shape}".encode(), digest_size=8)
    h.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
    return np.frombuffer(h.digest(), np.uint8)


def check_same_across_processes(tree, sharding, *, what: str = "the value") -> None:
    """Raises ValueError on every process if the arrays of ``tree`` (host values) are not
    the same on every process that ``sharding`` spans; nothing to do in a single process.

    One collective for the whole tree: each process hashes its arrays (8 bytes of BLAKE2b
    each) and a single allgather compares the hashes. The message names the arrays that
    differ."""
    if _spans_processes(sharding):
        paths, host, _ = _host_leaves(tree)
        _check_host_arrays(paths, host, what=what)


def put_replicated(tree, sharding, *, check: bool = True, what: str = "the value"):
    """``jax.device_put(tree, sharding)`` of host values every process holds alike, checked
    across processes with one collective for the whole tree.

    In a single process this is ``jax.device_put``. When ``sharding`` (replicated) spans
    several processes (``jax.distributed``), ``jax.device_put`` of a host array checks that
    every process passed the same value with an allgather of the whole array, one per array:
    hundreds of collectives moving the whole state through the network at the start of a run
    (and one per validation batch). Here the check is :func:`check_same_across_processes`'s
    single collective over hashes, then each process places its own copy
    (``jax.make_array_from_callback``). ``check=False`` skips the comparison, for parts of
    data already compared (the batches of a checked split).

    Args:
      tree: a pytree of NumPy arrays, scalars or fully addressable (e.g. uncommitted) jax
        arrays, the same on every process.
      sharding: a replicated ``jax.sharding.Sharding``, or None (the default device).
      check: compare the values across processes first.
      what: the value's name in the error message.

    Raises:
      ValueError: on every process, naming the arrays that differ between processes.
    """
    if not _spans_processes(sharding):
        return jax.device_put(tree, sharding)
    paths, host, treedef = _host_leaves(tree)
    if check:
        _check_host_arrays(paths, host, what=what)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
        for x in host])


def _host_leaves(tree):
    """``(leaf paths, leaves as NumPy arrays, treedef)``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) or "(the value)" for path, _ in leaves]
    return paths, [np.asarray(jax.device_get(x)) for _, x in leaves], treedef


def _check_host_arrays(paths, host, *, what):
    if not host:
        return
    from jax.experimental import multihost_utils  # only needed across processes
    gathered = np.asarray(multihost_utils.process_allgather(
        np.stack([_digest(x) for x in host])))  # [processes, arrays, 8]
    differs = np.any(gathered != gathered[:1], axis=-1)  # [processes, arrays]
    if differs.any():
        names = [p for p, d in zip(paths, differs.any(axis=0)) if d]
        raise ValueError(
            f"{what} differs between processes ({len(names)} of {len(paths)} arrays, e.g. "
            f"{', '.join(names[:3])}; processes {np.flatnonzero(differs.any(axis=1)).tolist()} "
            f"differ from process 0): every process must build it from the same config, seed "
            f"and data files.")


@functools.partial(jax.jit, static_argnames=("num_examples",))
def epoch_order(seed, epoch, num_examples: int):
    """The example order of ``epoch``: a permutation of ``range(num_examples)``."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    return jax.random.permutation(key, num_examples)


def augment_crop_flip(keys, images, padding: int = 4):
    """Random crop with zero padding and random horizontal flip, one key per image.

    Args:
      keys: ``[B]`` PRNG keys (one per example, so that results do not depend on
        how the batch is split over devices).
      images: ``[B, H, W, C]`` (any dtype; uint8 stays uint8).
      padding: zero padding on each side; crop offsets are uniform in
        ``[0, 2 * padding]``.
    """
    _, h, w, _ = images.shape

    def one(key, image):
        k_y, k_x, k_flip = jax.random.split(key, 3)
        oy = jax.random.randint(k_y, (), 0, 2 * padding + 1)
        ox = jax.random.randint(k_x, (), 0, 2 * padding + 1)
        padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        crop = jax.lax.dynamic_slice(padded, (oy, ox, 0), (h, w, image.shape[-1]))
        return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

    return jax.vmap(one)(keys, images)


def normalize(images, mean, std, dtype=jnp.float32):
    """``(uint8 / 255 - mean) / std`` per channel, in ``dtype``."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def batch_key(seed, epoch, step):
    """The augmentation key of one global batch: ``fold_in(fold_in(key(seed + 1), epoch), step)``.

    Traceable (``seed``, ``epoch``, ``step`` may be traced integers)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed + 1), epoch), step)


def gather_batch(images, labels, order, step, key, batch_size: int, augment: bool = True,
                 padding: int = 4):
    """The traceable body of :func:`train_batch`: rows ``order[step * B : (step + 1) * B]``,
    cropped and flipped with per-example keys ``fold_in(key, position)``.

    For use inside a jitted training loop (``train.train_steps``); ``key`` is
    :func:`batch_key`. Equal to :func:`train_batch` for the same arguments.
    """
    index = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
    x = jnp.take(images, index, axis=0)
    y = jnp.take(labels, index, axis=0)
    if augment:
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))
        x = augment_crop_flip(keys, x, padding)
    return x, y


@functools.lru_cache(maxsize=None)
def _compiled_train_batch(sharding):
    # Output sharding fixed at jit time: XLA partitions the gather and the
    # augmentation so that each device computes only its own rows.
    out = None if sharding is None else (sharding, sharding)
    return jax.jit(gather_batch, static_argnames=("batch_size", "augment", "padding"),
                   out_shardings=out)


def data_mesh(devices=None):
    """A 1-D ``('data',)`` mesh over ``devices`` (default: all), with an Auto axis
    so that jit propagates shardings (jax >= 0.10 makes Explicit axes by default)."""
    devices = list(jax.devices() if devices is None else devices)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # pragma: no cover - older jax
        return jax.sharding.Mesh(np.asarray(devices), ("data",))
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(axis_type.Auto,))


def train_batch(images, labels, order, step, *, seed: int, epoch: int, batch_size: int,
                augment: bool = True, padding: int = 4, sharding=None):
    """The ``step``-th global training batch of an epoch, as uint8 images and labels.

    Args:
      images, labels: the split on the device(s) (:func:`put_on_device`).
      order: :func:`epoch_order` of this epoch.
      step: batch index within the epoch.
      seed, epoch: give the augmentation key ``fold_in(fold_in(key(seed + 1), epoch), step)``.
      batch_size: the **global** batch size (divisible by the data-axis size).
      augment: random crop + flip (training); False for plain batches.
      sharding: e.g. ``NamedSharding(mesh, P("data"))`` to split rows over devices.
    """
    if sharding is not None:
        n_shards = sharding.mesh.shape[sharding.spec[0]] if sharding.spec else 1
        if batch_size % n_shards:
            raise ValueError(f"`batch_size` {batch_size} must be divisible by the {n_shards} "
                             f"devices of the data axis.")
    key = batch_key(seed, epoch, step)
    return _compiled_train_batch(sharding)(images, labels, order, step, key,
                                           batch_size=batch_size, augment=augment,
                                           padding=padding)


class EvalBatch(NamedTuple):
    """Indices of one evaluation batch and which of them are real (not padding)."""
    index: np.ndarray   # int32 [batch_size]
    mask: np.ndarray    # bool [batch_size]


def eval_batches(num_examples: int, batch_size: int) -> Iterator[EvalBatch]:
    """Fixed-size batches covering ``range(num_examples)`` exactly once.

    The last batch is padded with index 0 and masked, so every batch has the
    same shape (one compilation) and masked rows must be ignored (e.g.
    ``metrics.update_stats(..., mask=batch.mask)``).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    for start in range(0, num_examples, batch_size):
        index = np.arange(start, min(start + batch_size, num_examples), dtype=np.int32)
        mask = np.ones(batch_size, bool)
        mask[index.shape[0]:] = False
        yield EvalBatch(np.pad(index, (0, batch_size - index.shape[0])), mask)
