"""calib_jax.data.pipeline: augmentation statistics, determinism, sharding, eval coverage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calib_jax.data import pipeline


def marker_images(n):
    """Channel 0 all 255 (reveals the crop offset through the zero padding);
    channel 1 a left-to-right ramp (reveals flips); channel 2 the example id."""
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[..., 0] = 255
    x[..., 1] = (np.arange(32) * 8)[None, None, :]
    x[..., 2] = (np.arange(n) % 256)[:, None, None]
    return x


def offsets_and_flips(batch):
    ch0 = np.asarray(batch)[..., 0] > 0
    rows, cols = ch0.any(2), ch0.any(1)
    top, bottom = np.argmax(rows, 1), np.argmax(rows[:, ::-1], 1)
    left, right = np.argmax(cols, 1), np.argmax(cols[:, ::-1], 1)
    oy = 4 - top + bottom
    ox = 4 - left + right
    ramp = np.asarray(batch)[:, 16, 12:20, 1].astype(int)
    flipped = ramp[:, -1] < ramp[:, 0]
    return oy, ox, flipped


def test_crop_offsets_uniform_and_flip_half():
    n = 4096
    images = jnp.asarray(marker_images(n))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    out = jax.jit(pipeline.augment_crop_flip)(keys, images)
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    oy, ox, flipped = offsets_and_flips(out)
    for offsets in (oy, ox):
        assert offsets.min() == 0 and offsets.max() == 8
        counts = np.bincount(offsets, minlength=9)
        # Chi-square against uniform over 9 values (8 dof; 26.1 is the 0.1 % quantile).
        expected = n / 9
        assert np.sum((counts - expected) ** 2 / expected) < 26.1, counts
    assert abs(flipped.mean() - 0.5) < 0.04
    # Independence of flip and offset draws (weak check).
    assert abs(np.corrcoef(oy, flipped)[0, 1]) < 0.08


def test_crop_content_is_a_shifted_window():
    image = np.arange(32 * 32 * 3, dtype=np.int32).reshape(1, 32, 32, 3) % 251
    out = np.asarray(pipeline.augment_crop_flip(jax.random.split(jax.random.PRNGKey(3), 1),
                                                jnp.asarray(image)))
    padded = np.pad(image[0], ((4, 4), (4, 4), (0, 0)))
    windows = [padded[y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
    assert any(np.array_equal(out[0], w) or np.array_equal(out[0], w[:, ::-1]) for w in windows)


def test_epoch_order_is_a_seeded_permutation():
    a = np.asarray(pipeline.epoch_order(0, 3, 1000))
    assert sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, pipeline.epoch_order(0, 3, 1000))
    assert not np.array_equal(a, pipeline.epoch_order(0, 4, 1000))
    assert not np.array_equal(a, pipeline.epoch_order(1, 3, 1000))


def test_train_batches_deterministic_and_cover_epoch():
    n, bs = 640, 64
    images, labels = pipeline.put_on_device(marker_images(n), np.arange(n) % 10)
    order = pipeline.epoch_order(7, 0, n)
    seen = []
    for step in range(pipeline.steps_per_epoch(n, bs)):
        x, y = pipeline.train_batch(images, labels, order, step, seed=7, epoch=0, batch_size=bs)
        x2, _ = pipeline.train_batch(images, labels, order, step, seed=7, epoch=0, batch_size=bs)
        np.testing.assert_array_equal(x, x2)
        seen.extend(np.asarray(order[step * bs:(step + 1) * bs]).tolist())
        np.testing.assert_array_equal(y, np.asarray(order[step * bs:(step + 1) * bs]) % 10)
    assert sorted(seen) == list(range(n))
    plain, _ = pipeline.train_batch(images, labels, order, 0, seed=7, epoch=0, batch_size=bs,
                                    augment=False)
    np.testing.assert_array_equal(plain, marker_images(n)[np.asarray(order[:bs])])


def test_same_batches_whatever_the_device_count():
    n_dev = len(jax.devices())
    assert n_dev >= 2
    n, bs = 256, 32
    data = marker_images(n)
    order = pipeline.epoch_order(0, 1, n)
    single = pipeline.put_on_device(data, np.arange(n))
    x1, y1 = pipeline.train_batch(*single, order, 3, seed=0, epoch=1, batch_size=bs)
    for devices in (2, n_dev):
        mesh = pipeline.data_mesh(jax.devices()[:devices])
        replicated = NamedSharding(mesh, P())
        sharded = NamedSharding(mesh, P("data"))
        images, labels = pipeline.put_on_device(data, np.arange(n), replicated)
        x, y = pipeline.train_batch(images, labels, order, 3, seed=0, epoch=1, batch_size=bs,
                                    sharding=sharded)
        x = jax.block_until_ready(x)
        assert x.sharding.is_equivalent_to(sharded, x.ndim)
        assert len(x.addressable_shards) == devices
        assert x.addressable_shards[0].data.shape[0] == bs // devices
        np.testing.assert_array_equal(x, x1)
        np.testing.assert_array_equal(y, y1)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_batch(images, labels, order, 0, seed=0, epoch=1, batch_size=bs + 1,
                             sharding=sharded)


def test_eval_batches_cover_every_example_once():
    for n, bs in [(10, 3), (9, 3), (1, 5), (100, 100)]:
        batches = list(pipeline.eval_batches(n, bs))
        real = np.concatenate([b.index[b.mask] for b in batches])
        np.testing.assert_array_equal(real, np.arange(n))
        assert all(b.index.shape == (bs,) and b.mask.shape == (bs,) for b in batches)
        assert batches[-1].mask.sum() == n - bs * (len(batches) - 1)


def test_normalize_and_input_errors():
    x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    out = pipeline.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[0, 0, 0], np.float32), [2.0, 1.0, 0.5])
    with pytest.raises(TypeError, match="uint8 images"):
        pipeline.put_on_device(np.zeros((2, 2, 2, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="`batch_size`"):
        pipeline.steps_per_epoch(10, 11)


def _as_two_processes(monkeypatch, other_process=lambda digests: digests):
    """pipeline's multi-process path in this one process: the replicated sharding counts as
    spanning two processes, and the allgather returns this process's hashes and "process
    1's" (``other_process`` of them). Returns the hashes passed to each allgather call."""
    from jax.experimental import multihost_utils
    calls = []

    def allgather(digests):
        calls.append(digests)
        return np.stack([digests, other_process(digests.copy())])

    monkeypatch.setattr(pipeline, "_spans_processes", lambda sharding: sharding is not None)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    return calls


def test_put_replicated_across_processes_places_what_device_put_places(monkeypatch):
    """One collective for the whole tree (jax.device_put would allgather each array), then
    the same arrays as jax.device_put: values, dtypes (bfloat16, an int64 leaf made int32
    as jax does, a 0-d scalar) and the replicated sharding."""
    mesh = pipeline.data_mesh(jax.devices())
    replicated = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(3, 5)).astype(np.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),  # uncommitted jax array
            "step": np.int64(7), "labels": np.arange(6)}
    want = jax.device_put(tree, replicated)
    calls = _as_two_processes(monkeypatch)
    got = pipeline.put_replicated(tree, replicated, what="the state")
    assert len(calls) == 1 and calls[0].shape == (4, 8) and calls[0].dtype == np.uint8
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        assert g.sharding.is_equivalent_to(replicated, g.ndim)
        assert len(g.addressable_shards) == len(jax.devices())
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # Batches of an already compared split: no collective.
    pipeline.put_replicated(tree["w"][:2], replicated, check=False)
    assert len(calls) == 1
    pipeline.check_same_across_processes(tree, replicated, what="the state")
    assert len(calls) == 2


def test_put_replicated_names_the_arrays_that_differ_between_processes(monkeypatch):
    def second_array_differs(digests):
        digests[1, 0] ^= 1
        return digests

    _as_two_processes(monkeypatch, second_array_differs)
    replicated = NamedSharding(pipeline.data_mesh(jax.devices()), P())
    tree = {"a": np.zeros(3), "b": np.ones(2), "c": np.zeros(1)}
    with pytest.raises(ValueError, match=r"the initial training state differs between processes "
                                         r"\(1 of 3 arrays, e\.g\. \['b'\]; processes \[1\]"):
        pipeline.put_replicated(tree, replicated, what="the initial training state")
    _as_two_processes(monkeypatch, lambda digests: digests ^ np.uint8(1))
    with pytest.raises(ValueError, match=r"the images to predict differs .*\(the value\)"):
        pipeline.check_same_across_processes(np.zeros(3), replicated,
                                             what="the images to predict")


def test_the_hash_tells_apart_arrays_of_equal_bytes():
    zeros = np.zeros(4, np.float32)
    digests = {pipeline._digest(x).tobytes() for x in (
        zeros, zeros.reshape(2, 2), zeros.view(np.int32), np.zeros(4, np.float32)[::-1].copy())}
    assert len(digests) == 3  # shape and dtype count; equal values hash equal
    assert pipeline._digest(np.float32(1.0)).shape == (8,)
    assert not (pipeline._digest(np.arange(3)) == pipeline._digest(np.arange(1, 4))).all()


def test_put_replicated_in_one_process_is_device_put():
    replicated = NamedSharding(pipeline.data_mesh(jax.devices()), P())
    assert not pipeline._spans_processes(replicated)  # one process: jax.device_put, no check
    x = pipeline.put_replicated(np.arange(5), replicated)
    assert x.sharding == replicated
    assert pipeline.put_replicated(np.arange(5), None).committed is False
