"""calib_jax.train: loss names and reductions, optimiser recipe, a real step on tiny data."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiment_configs
from checkpoint_damage import damage
from calib_jax import losses, train
from calib_jax.data import pipeline

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_batch_loss_reductions_follow_reference():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 16))
    ce = losses.cross_entropy(z, y)
    np.testing.assert_allclose(train.batch_loss("ce", z, y, 0), ce.sum(), rtol=1e-6)
    np.testing.assert_allclose(train.batch_loss("brier", z, y, 0),
                               losses.brier_score(z, y).mean(), rtol=1e-6)
    np.testing.assert_allclose(train.batch_loss("mmce_weighted", z, y, 0),
                               16 * (ce.mean() + 2 * losses.mmce_weighted(z, y)), rtol=1e-6)
    np.testing.assert_allclose(train.batch_loss("flsc531", z, y, 120),
                               losses.focal_loss(z, y, gamma=3.0).sum(), rtol=1e-6)
    np.testing.assert_allclose(train.batch_loss("flsc531", z, y, 260),
                               losses.focal_loss(z, y, gamma=1.0).sum(), rtol=1e-6)
    for name in train.LOSS_NAMES:
        assert np.isfinite(float(train.batch_loss(name, z, y, 0)))
    with pytest.raises(ValueError, match="unknown loss"):
        train.batch_loss("nll", z, y, 0)


def test_learning_rate_schedule_and_early_decay():
    lr = train.piecewise_lr(0.1, steps_per_epoch=10)
    assert np.isclose(lr(1499), 0.1) and np.isclose(lr(1500), 0.01) and np.isclose(lr(2500), 0.001)
    early = train.piecewise_lr(0.1, steps_per_epoch=10, early_decay=True)
    assert np.isclose(early(1489), 0.1) and np.isclose(early(1490), 0.01)
    assert np.isclose(early(2490), 0.001)


def test_optimizer_is_clip_then_weight_decay_then_momentum():
    tx = train.make_optimizer(0.1, momentum=0.9, weight_decay=0.5, clip_norm=1.0)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to [0.6, 0.8]
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * (np.array([0.6, 0.8]) + 0.5 * np.array([1, -2])),
                               rtol=1e-6)
    updates, _ = tx.update(grads, state, params)  # momentum buffer: 0.9 * b + d
    d = np.array([0.6, 0.8]) + 0.5 * np.array([1, -2])
    np.testing.assert_allclose(updates["w"], -0.1 * (0.9 * d + d), rtol=1e-6)


def test_global_norm_and_clip_equal_optax():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    tree = {"a": jax.random.normal(keys[0], (3, 5)), "b": [jax.random.normal(keys[1], (7,)),
            jax.random.normal(keys[2], (2, 2, 2)).astype(jnp.bfloat16)],
            "c": jnp.float32(3.0)}
    # float64 oracle: half-precision leaves are squared and summed in float32 (optax sums a
    # bfloat16 leaf in bfloat16: 7e-5 off here).
    want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                       for x in jax.tree_util.tree_leaves(tree)))
    np.testing.assert_allclose(train.global_norm(tree), want, rtol=1e-6)
    assert train.global_norm(tree).dtype == jnp.float32
    assert float(train.global_norm({})) == 0.0
    optax_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm
    tree["b"][1] = tree["b"][1].astype(jnp.float32)
    norm = float(optax_norm(tree))
    np.testing.assert_allclose(train.global_norm(tree), norm, rtol=1e-6)
    for max_norm in (norm / 3, norm * 2):  # clipped, and left alone
        ours, _ = train.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        for g, w in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(want)):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-6)
    # The optimiser state is optax's, so checkpoints of either load into the other.
    assert (jax.tree_util.tree_structure(train.clip_by_global_norm(1.0).init(tree))
            == jax.tree_util.tree_structure(optax.clip_by_global_norm(1.0).init(tree)))
    with pytest.raises(ValueError, match="`max_norm` must be positive"):
        train.clip_by_global_norm(0.0)


def toy_task(n, seed=0):
    """Learnable toy images: the label is which quadrant is brightest."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, (y // 2) * 16:(y // 2 + 1) * 16, (y % 2) * 16:(y % 2 + 1) * 16] += 150
    return images, labels


class TinyCNN(nn.Module):
    """Convolution + BatchNorm + dense: what the step-level tests need (batched convolutions,
    batch statistics) at a fraction of ResNet-8's compile time."""
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(nn.relu(x)))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def fresh_state(seed, model=None, lr=0.05):
    return train.create_train_state(jax.random.PRNGKey(seed), model or TinyCNN(),
                                    train.make_optimizer(lr), (1, 32, 32, 3))


def flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(jax.device_get(tree))])


def relative_error(a, b):
    """Whole-model relative error: leaves whose gradient is a near-cancelling sum (BN biases
    under a mean-reduced loss) carry float32 noise of a few 1e-3 of their own size."""
    a, b = flat(a), flat(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


class _HoldsAnArray(nn.Module):
    """A module that cannot be hashed (a NumPy field, like pretrained embeddings): the
    initialisation's uncached path."""
    table: np.ndarray

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(x) + self.table


@pytest.mark.parametrize("model", [TinyCNN(), _HoldsAnArray(np.ones(2, np.float32))],
                         ids=["cached", "unhashable"])
def test_host_initialisation_lands_uncommitted_on_the_default_device(model, monkeypatch):
    """On an accelerator the variables are computed on the host's CPU device and copied to
    the default device. Simulated with CPU devices: host = device 2, default = device 1.
    The state must hold the numbers an on-device initialisation gives, on device 1,
    uncommitted (usable beside arrays committed elsewhere, as a plain model.init's are)."""
    devices = jax.devices()
    shape = (1, 32, 32, 3) if isinstance(model, TinyCNN) else (1, 3)
    tx = train.make_optimizer(0.05)
    expected = train.create_train_state(jax.random.PRNGKey(3), model, tx, shape)
    ran_on = []  # the cached path's initialisation: where its key (committed) was
    init_variables = train._init_variables
    monkeypatch.setattr(train, "_init_variables",
                        lambda m, rng, *a: ran_on.append(rng.devices()) or init_variables(
                            m, rng, *a))
    monkeypatch.setattr(train, "host_init_device", lambda target: devices[2])
    with jax.default_device(devices[1]):
        state = train.create_train_state(jax.random.PRNGKey(3), model, tx, shape)
        # Uncommitted: a jitted call beside an array committed to device 3 runs there.
        elsewhere = jax.device_put(jnp.ones(()), devices[3])
        moved = jax.jit(lambda p, one: jax.tree.map(lambda x: x * one, p))(state.params,
                                                                          elsewhere)
    assert {d for leaf in jax.tree.leaves(moved) for d in leaf.devices()} == {devices[3]}
    assert ran_on == ([{devices[2]}] if isinstance(model, TinyCNN) else []), ran_on
    leaves = jax.tree.leaves(state)
    assert {d for leaf in leaves for d in leaf.devices()} == {devices[1]}
    for got, want in zip(leaves, jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_default_device_follows_jax_default_device():
    devices = jax.devices()
    assert train.default_device() == jax.local_devices()[0]
    with jax.default_device(devices[2]):
        assert train.default_device() == devices[2] == jnp.zeros(()).devices().pop()
    with jax.default_device("cpu"):  # a platform name: its first local device
        assert train.default_device() == jax.local_devices(backend="cpu")[0]


def test_host_init_device_is_the_cpu_for_an_accelerator_only(monkeypatch):
    class FakeAccelerator:
        platform = "gpu"

    cpu = jax.local_devices(backend="cpu")[0]
    assert train.host_init_device(jax.devices()[1]) is None  # a CPU: initialise there
    assert train.host_init_device(FakeAccelerator()) == cpu

    def no_cpu_backend(*args, backend=None, **kwargs):
        raise RuntimeError("Unknown backend cpu")  # JAX_PLATFORMS=cuda

    with monkeypatch.context() as patched:
        patched.setattr(jax, "local_devices", no_cpu_backend)
        assert train.host_init_device(FakeAccelerator()) is None
    # Several processes: each initialises its replicas where identical hardware rounds alike.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert train.host_init_device(FakeAccelerator()) is None


def test_abstract_state_is_the_state_without_computing_it(monkeypatch):
    """The evaluation pass's restore template: the shapes, dtypes and structure of the run's
    initial state, on the default device (also where the initialisation would run on the
    host), computed by jax.eval_shape: nothing initialised."""
    config = experiment_configs.load("cifar10", experiment_configs.TINY_RUN)
    concrete = train.state_for_config(config, 10, (32, 32, 3))
    monkeypatch.setattr(train, "host_init_device", lambda target: jax.devices()[2])
    with jax.default_device(jax.devices()[1]):
        abstract = train.abstract_state_for_config(config, 10, (32, 32, 3))
    from calib_jax.checkpoints import state_to_tree
    # (The states' static fields differ: each config builds its own optax closures.)
    assert isinstance(abstract, train.TrainState)
    abstract, concrete = state_to_tree(abstract), state_to_tree(concrete)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (c.shape, c.dtype)
        assert a.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[1])


def test_every_loss_trains_in_one_program():
    """All eight losses as members of one program (one compilation; vmapped members are
    checked below): finite losses and gradients, K losses per step, and each member
    predicts like a normal state."""
    n, bs = 64, 16
    images, labels = toy_task(n)
    model = TinyCNN()
    tx = train.make_optimizer(0.05)
    states = [train.create_train_state(jax.random.PRNGKey(0), model, tx, (1, 32, 32, 3))
              for _ in train.LOSS_NAMES]
    stacked = train.stack_states(states)
    x, y = pipeline.put_on_device(images, labels)
    orders = jnp.stack([pipeline.epoch_order(0, 0, n)] * len(train.LOSS_NAMES))
    seeds = jnp.zeros(len(train.LOSS_NAMES), jnp.int32)
    for step in range(2):
        stacked, m = train.multi_train_steps(
            stacked, x, y, orders, step, 0, seeds, num_steps=1, losses_=train.LOSS_NAMES,
            shared_batch=True, batch_size=bs, mean=MEAN, std=STD)
        assert m["loss"].shape == (1, len(train.LOSS_NAMES))
        assert np.all(np.isfinite(np.asarray(m["loss"])))
    assert np.all(np.asarray(stacked.step) == 2)
    assert np.all(np.isfinite(flat(stacked.params)))
    # Members started equal and trained with different losses: they differ now.
    assert relative_error(train.unstack_state(stacked, 0).params,
                          train.unstack_state(stacked, 1).params) > 1e-4
    # A member is exactly its slice of every leaf (one compiled slice for any index).
    member = train.unstack_state(stacked, 3)
    for got, whole in zip(jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(stacked)):
        assert got.dtype == whole.dtype
        np.testing.assert_array_equal(got, np.asarray(whole)[3])
    # multi_mode="auto": sequential where it was measured faster (CPU, an H200).
    assert [train.default_member_mode(p) for p in ("cpu", "gpu", "tpu")] == [
        "sequential", "sequential", "vmap"]
    logits = train.predict(train.unstack_state(stacked, 2), images, mean=MEAN, std=STD,
                           batch_size=24)
    assert logits.shape == (n, 4) and np.all(np.isfinite(logits))

    # All members' logits at once (24 does not divide 64: the padded last batch is dropped).
    each = np.stack([train.predict(train.unstack_state(stacked, k), images, mean=MEAN,
                                   std=STD, batch_size=24)
                     for k in range(len(train.LOSS_NAMES))])
    np.testing.assert_array_equal(each[2], logits)
    sequential = train.predict_members(stacked, images, mean=MEAN, std=STD, batch_size=24,
                                       members="sequential")
    np.testing.assert_array_equal(sequential, each)
    vmapped = train.predict_members(stacked, images, mean=MEAN, std=STD, batch_size=24)
    assert vmapped.shape == (len(train.LOSS_NAMES), n, 4)
    np.testing.assert_allclose(vmapped, each, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`members`"):
        train.predict_members(stacked, images, mean=MEAN, std=STD, members="loop")


def test_steps_in_one_call_equal_the_per_step_loop():
    """train_steps (a rolled lax.scan, batches built inside) == train_batch + train_step."""
    n, bs = 64, 16
    images, labels = toy_task(n, seed=1)
    x, y = pipeline.put_on_device(images, labels)
    order = pipeline.epoch_order(3, 1, n)
    state, losses_ = fresh_state(0), []
    for step in range(3):
        xb, yb = pipeline.train_batch(x, y, order, step, seed=3, epoch=1, batch_size=bs)
        state, m = train.train_step(state, xb, yb, 1, loss_name="flsd53", mean=MEAN, std=STD)
        losses_.append(float(m["loss"]))
    chunked, m = train.train_steps(fresh_state(0), x, y, order, 0, 1, 3, num_steps=3,
                                   loss_name="flsd53", batch_size=bs, mean=MEAN, std=STD)
    assert m["loss"].shape == (3,) and int(chunked.step) == 3
    np.testing.assert_allclose(np.asarray(m["loss"]), losses_, rtol=1e-5)
    assert relative_error(chunked.params, state.params) < 1e-6  # measured 1e-7
    # One step per call (what the CPU loop runs): the same step, no loop.
    single, m1 = train.train_steps(fresh_state(0), x, y, order, 0, 1, 3, num_steps=1,
                                   loss_name="flsd53", batch_size=bs, mean=MEAN, std=STD)
    np.testing.assert_allclose(float(m1["loss"][0]), losses_[0], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_flat_parameter_steps_equal_the_tree_steps(optimizer):
    """flat_params=True (the GPU default): the same steps over one parameter vector. The
    state comes back in its own structure (checkpoints unchanged); losses and parameters
    equal the tree's (measured on CPU: bitwise with SGD, the update being elementwise and
    the gradient the leaves' gradients concatenated; with Adam two of 216 elements of a
    kernel 3.6e-6 apart, its division fused differently)."""
    n, bs = 32, 16
    images, labels = toy_task(n, seed=2)
    x, y = pipeline.put_on_device(images, labels)
    order = pipeline.epoch_order(0, 0, n)

    def fresh():
        return train.create_train_state(jax.random.PRNGKey(0), TinyCNN(),
                                        train.make_optimizer(0.05, name=optimizer),
                                        (1, 32, 32, 3))
    kwargs = dict(num_steps=2, loss_name="flsd53", batch_size=bs, mean=MEAN, std=STD,
                  unroll=True)
    tree, tree_m = train.train_steps(fresh(), x, y, order, 0, 0, 0, **kwargs)
    vector, vector_m = train.train_steps(fresh(), x, y, order, 0, 0, 0, flat_params=True,
                                         **kwargs)
    for part in ("params", "batch_stats", "opt_state"):
        got, want = getattr(vector, part), getattr(tree, part)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        assert [v.shape for v in jax.tree_util.tree_leaves(got)] == [
            v.shape for v in jax.tree_util.tree_leaves(want)]
    np.testing.assert_allclose(vector_m["loss"], tree_m["loss"], rtol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(vector), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert relative_error(vector.params, tree.params) < 1e-6
    # The optimiser state (compared above) was flat inside and moved: not the initial zeros.
    assert np.abs(flat(vector.opt_state)).max() > 1e-4
    assert int(vector.step) == 2


def test_flat_parameter_members_equal_the_tree_members():
    """multi_train_steps(flat_params=True): each member raveled on its own ([K, P]), vmapped
    or one after another, equal to the tree's members (one step: several steps over the
    vector are the single-run test's above)."""
    n, bs = 32, 16
    images, labels = toy_task(n, seed=3)
    x, y = pipeline.put_on_device(images, labels)
    names, seeds = ("ce", "flsd53"), (0, 1)
    orders = jnp.stack([pipeline.epoch_order(seed, 0, n) for seed in seeds])
    for members in ("sequential", "vmap"):
        results = []
        for flat_params in (False, True):
            stacked = train.stack_states([fresh_state(seed) for seed in seeds])
            stacked, m = train.multi_train_steps(
                stacked, x, y, orders, 0, 0, jnp.asarray(seeds), num_steps=1, losses_=names,
                shared_batch=False, batch_size=bs, mean=MEAN, std=STD, members=members,
                flat_params=flat_params)
            results.append((stacked, m))
        (tree, tree_m), (vector, vector_m) = results
        assert jax.tree_util.tree_structure(vector.params) == \
            jax.tree_util.tree_structure(tree.params)
        np.testing.assert_allclose(vector_m["loss"], tree_m["loss"], rtol=1e-6)
        for k in range(len(names)):
            assert relative_error(train.unstack_state(vector, k).params,
                                  train.unstack_state(tree, k).params) < 1e-6, (members, k)


def test_with_flat_params_ravels_what_is_shaped_like_the_parameters():
    state = train.create_train_state(jax.random.PRNGKey(0), TinyCNN(),
                                     train.make_optimizer(0.05, name="adam"), (1, 32, 32, 3))
    flat_state, restore = train.with_flat_params(state)
    size = sum(v.size for v in jax.tree_util.tree_leaves(state.params))
    assert jax.tree_util.tree_leaves(flat_state.params)[0].shape == (size,)
    # Adam's two moments are raveled; its step count (a scalar int) is not.
    shapes = [v.shape for v in jax.tree_util.tree_leaves(flat_state.opt_state)]
    assert sorted(shapes) == [(), (size,), (size,)]
    back = restore(flat_state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    assert relative_error(back.params, state.params) == 0
    # The flat state's model unravels the vector: the same logits.
    x = jnp.ones((2, 32, 32, 3))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    np.testing.assert_array_equal(
        flat_state.apply_fn({**variables, "params": flat_state.params}, x),
        state.apply_fn(variables, x))
    # Parameters of two dtypes would be converted by the vector: refused, naming the fix.
    mixed = state.replace(params=jax.tree_util.tree_map(lambda v: v, state.params))
    mixed.params["Dense_0"]["bias"] = mixed.params["Dense_0"]["bias"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="param_layout='tree'"):
        train.with_flat_params(mixed)


def test_loop_compiler_options_are_for_gpu_and_yield_to_the_users_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert train.loop_compiler_options("gpu") == train.GPU_GRAPH_CONVOLUTIONS
    assert "CONVOLUTION" in train.GPU_GRAPH_CONVOLUTIONS["xla_gpu_enable_command_buffer"]
    assert train.loop_compiler_options("gpu", graph_convolutions=False) == {}
    assert train.loop_compiler_options("cpu") == train.loop_compiler_options("tpu") == {}
    assert train.loop_functions("cpu") == (train.train_steps, train.multi_train_steps)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
    assert train.loop_compiler_options("gpu") == {}
    assert train.loop_functions("gpu") == (train.train_steps, train.multi_train_steps)


def test_the_gpu_options_reach_the_training_loops_compile(monkeypatch):
    """loop_functions("gpu") compiles with the options (here on CPU, which parses and
    ignores them): the real ones give the module function's result; a value XLA does not
    know fails the compile, naming it, so the options do reach it."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    n, bs = 16, 8
    images, labels = toy_task(n, seed=4)
    x, y = pipeline.put_on_device(images, labels)
    order = pipeline.epoch_order(0, 0, n)
    kwargs = dict(num_steps=1, loss_name="ce", batch_size=bs, mean=MEAN, std=STD)
    steps, multi_steps = train.loop_functions("gpu")
    assert steps is not train.train_steps and multi_steps is not train.multi_train_steps
    got, got_m = steps(fresh_state(0), x, y, order, 0, 0, 0, **kwargs)
    want, want_m = train.train_steps(fresh_state(0), x, y, order, 0, 0, 0, **kwargs)
    np.testing.assert_array_equal(got_m["loss"], want_m["loss"])
    monkeypatch.setattr(train, "GPU_GRAPH_CONVOLUTIONS",
                        {"xla_gpu_enable_command_buffer": "FUSION,NO_SUCH_KIND"})
    steps, _ = train.loop_functions("gpu")
    with pytest.raises(Exception, match="NO_SUCH_KIND"):
        steps(fresh_state(0), x, y, order, 0, 0, 0, **kwargs)


def test_a_failure_under_graph_convolutions_says_how_to_turn_them_off():
    options = train.GPU_GRAPH_CONVOLUTIONS
    error = RuntimeError("UNKNOWN: <unknown cudnn status: 5003> [executable_name='jit_train_steps']")
    assert "--config.gpu_graph_convolutions=False" in train._graph_failure_hint(error, options)
    assert train._graph_failure_hint(error, {}) is None  # the option was not in use
    assert train._graph_failure_hint(RuntimeError("RESOURCE_EXHAUSTED: out of memory"),
                                     options) is None


def test_data_parallel_step_equals_single_device():
    """jit + NamedSharding: replicated state, batch split over 4 CPU devices. Gradients,
    BatchNorm statistics (global batch) and MMCE (global batch) must match one device; so
    must the sharded steps over the flat parameter vector (the GPU default)."""
    n_dev = len(jax.devices())
    assert n_dev >= 2
    rng = np.random.default_rng(1)
    n, bs = 64, 32
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, n)
    model = TinyCNN()
    mesh = pipeline.data_mesh()
    results = []
    for sharded, flat_params in ((False, False), (True, False), (True, True)):
        tx = train.make_optimizer(0.05)
        state = train.create_train_state(jax.random.PRNGKey(0), model, tx, (1, 32, 32, 3))
        if sharded:
            state = train.replicate(state, mesh)
            x, y = pipeline.put_on_device(images, labels, train.replicated(mesh))
            batch_sharding = train.batch_sharding(mesh)
        else:
            x, y = pipeline.put_on_device(images, labels)
            batch_sharding = None
        order = pipeline.epoch_order(0, 0, n)
        for step in range(2):  # the training loop's call: batch built inside, one step
            state, m = train.train_steps(state, x, y, order, step, 0, 0, num_steps=1,
                                         loss_name="mmce_weighted", batch_size=bs, mean=MEAN,
                                         std=STD, sharding=batch_sharding,
                                         flat_params=flat_params)
            m = jax.device_get(m)  # wait for each sharded step (2-core CPU collectives)
        results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), m))
    (p1, b1, m1), *sharded_results = results
    for p2, b2, m2 in sharded_results:
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
        assert jax.tree_util.tree_structure(p2) == jax.tree_util.tree_structure(p1)
        for a, b in zip(jax.tree_util.tree_leaves((p1, b1)),
                        jax.tree_util.tree_leaves((p2, b2))):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_data_parallel_phrase_training_equals_single_device():
    """SST's phrase-level step (node logits, MMCE over the labelled nodes of the global
    batch) split over the CPU devices equals one device."""
    from calib_jax import models
    from calib_jax.models import text
    sentences = ["(3 (2 a) (4 (2 b) (3 c)))", "(1 (2 (2 a) (1 b)) (0 c))", "(4 (3 b) (4 c))",
                 "(0 (1 a) (2 (2 c) (0 b)))"] * 2
    parsed = [text.parse_ptb_tree(sentence) for sentence in sentences]
    packed = text.pack_trees(text.make_trees(parsed, {"a": 1, "b": 2, "c": 3}, max_nodes=6,
                                             node_classes={0: 0, 1: 0, 2: 1, 3: 2, 4: 2}))
    labels = np.asarray([int(t[0] > 2) for t in parsed], np.int32)
    model = models.get("tree_lstm", 3, vocab_size=4, embed_dim=6, mem_dim=4,
                       root_classes=(0, 2), phrase_labels=True)
    mesh = pipeline.data_mesh()
    results = []
    for sharded in (False, True):
        tx = train.make_optimizer(0.05, name="adagrad", momentum=0.0, weight_decay=1e-4,
                                  clip_norm=0.0)
        state = train.create_train_state(jax.random.PRNGKey(0), model, tx, (1, 4, 6),
                                         jnp.int32)
        if sharded:
            state = train.replicate(state, mesh)
            x, y = pipeline.put_on_device(packed, labels, train.replicated(mesh))
        else:
            x, y = pipeline.put_on_device(packed, labels)
        order = pipeline.epoch_order(0, 0, len(labels))
        state, m = train.train_steps(
            state, x, y, order, 0, 0, 0, num_steps=1,
            loss_name=train.LossSpec("mmce_weighted", mean_reduction=True), batch_size=8,
            augment=False, mean=None, std=None,
            sharding=train.batch_sharding(mesh) if sharded else None)
        results.append((jax.device_get(state.params), jax.device_get(m)))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    assert m1["correct"] == m2["correct"]
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


# ---------------------------------------------------------------- the training loop

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "configs" / "cifar10.py")
SMOKE = experiment_configs.TINY_RUN  # the conftest's evaluated_runs fixture trains it too


def load_config(arg):
    return experiment_configs.load("cifar10", arg)


def run_cli(workdir, *extra, wait=True, **env_vars):
    cmd = [sys.executable, "-m", "calib_jax.train", f"--config={CONFIG}:{SMOKE}",
           f"--workdir={workdir}", *extra]
    # Four CPU devices, like this process (conftest): the same program as the fixture's run.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "  # the session's (conftest)
                         "--xla_force_host_platform_device_count=4", **env_vars)
    if wait:
        return subprocess.run(["timeout", "-k", "10", "300", *cmd], env=env, capture_output=True,
                              text=True, cwd=REPO)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO)


def final_params(workdir):
    config = load_config(SMOKE)
    from calib_jax import checkpoints
    state = train.state_for_config(config, 4, (32, 32, 3))
    restored, meta = checkpoints.RunCheckpoints(workdir).restore(state)
    assert meta["epoch"] == config.num_epochs and meta["final"]
    return jax.device_get(restored.params), jax.device_get(restored.opt_state)


def test_later_epochs_compile_nothing(tiny_run):
    """Every compiled call of the loop (the training chunks, the validation pass, the
    checkpoint copies) compiles in the first epoch and is reused after: an epoch number, step
    offset or learning rate that reached a compile as a constant would compile again each
    epoch, training correctly at 15-40 s per compile of ResNet-50 on a GPU."""
    _, (before, first, second) = tiny_run
    assert first > 0  # the counter sees the loop's compiles, so the 0 below is a count
    assert second == 0


def test_the_compile_counter_counts_programs_from_the_persistent_cache():
    """The session's workers share a persistent compilation cache (conftest.py): a loop that
    asked for its program again each epoch (say a new `jax.jit` per epoch) would load it from
    there instead of compiling it, and must still be counted."""
    import compile_counter
    if not (jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
        pytest.skip("no persistent compilation cache in this session (conftest.py)")

    def fresh_jit():  # a new jit of the same function: a miss in memory, the same program
        return jax.jit(lambda x: jnp.tanh(x) * 3.25 + 0.5)

    x = jnp.arange(7.0)
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    hits = []

    def listener(name, *args, **kwargs):
        if name == compile_counter.CACHE_HIT_EVENT:
            hits.append(name)

    jax.monitoring.register_event_listener(listener)
    try:
        fresh_jit()(x).block_until_ready()  # compiled (or loaded) and written to the cache
        with compile_counter.compiles_per_epoch() as compiles:
            fresh_jit()(x).block_until_ready()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
        jax.monitoring.unregister_event_listener(listener)
    assert hits and compiles == [1]


def test_sigkill_and_restart_gives_exactly_the_uninterrupted_parameters(tmp_path,
                                                                       evaluated_runs):
    # The uninterrupted run: the session fixture's (same config, same four devices).
    whole = evaluated_runs / "cifar10" / "resnet50" / "ce"
    killed = tmp_path / "killed"
    # With a persistent compilation cache, as the README suggests for restarts: the resumed
    # run loads the killed run's compiled programs (and this test runs ~7 s faster).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")}
    proc = run_cli(killed, wait=False, **cache)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "1").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "1").exists()
    assert any((tmp_path / "xla_cache").iterdir())
    resumed = run_cli(killed, **cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    # Its log, redirected: every progress update a line of its own (no \r gluing them), and
    # none of Orbax's INFO records (~40 per checkpoint) around them.
    assert "\r" not in resumed.stdout
    assert any(line.startswith("epoch 2/2 step ") for line in resumed.stdout.splitlines())
    assert "checkpoint_manager.py" not in resumed.stderr, resumed.stderr[-2000:]
    a, b = final_params(whole), final_params(killed)
    from calib_jax import checkpoints
    assert checkpoints.tree_equal(a, b)
    log = (killed / "log.jsonl").read_text().splitlines()
    assert json_epochs(log) == [1, 2]


class SentinelSignal(Exception):
    """Raised by the test's own SIGTERM handler: the code under test did not install one."""


def test_sigterm_during_a_background_save_waits_for_it_then_exits_143(tmp_path, monkeypatch):
    """A scheduler's SIGTERM lands right after epoch 1's checkpoint began to be written in
    the background: the run exits with status 143 once that checkpoint is complete."""
    from calib_jax import checkpoints
    save = checkpoints.RunCheckpoints.save

    def save_then_sigterm(self, epoch, *args, **kwargs):
        save(self, epoch, *args, **kwargs)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def sentinel(signum, frame):
        raise SentinelSignal()

    monkeypatch.setattr(checkpoints.RunCheckpoints, "save", save_then_sigterm)
    previous = signal.signal(signal.SIGTERM, sentinel)  # never the default: it ends pytest
    try:
        with pytest.raises(SystemExit) as stopped:
            train.train_and_evaluate(load_config(SMOKE), tmp_path)
        assert stopped.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is sentinel  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    config = load_config(SMOKE)
    template = train.state_for_config(config, 4, (32, 32, 3))
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    try:
        assert ckpt.restore(template)[1]["epoch"] == 1
    finally:
        ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_exit_on_sigterm_ignores_a_second_signal_while_unwinding():
    before = signal.getsignal(signal.SIGTERM)
    during_cleanup = []
    with pytest.raises(SystemExit):
        with train.exit_on_sigterm():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            finally:
                during_cleanup.append(signal.getsignal(signal.SIGTERM))
    assert during_cleanup == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGTERM) == before


def json_epochs(lines):
    return [json.loads(line)["epoch"] for line in lines]


@pytest.mark.parametrize("override,field", [
    ("loss=focal_loss", "loss"), ("model=resnet51", "model"), ("learning_rate=-0.1", "learning_rate"),
    ("batch_size=6", "batch_size"), ("dtype=float16", "dtype"), ("num_epochs=0", "num_epochs"),
    ("scan_unroll=-1", "scan_unroll"), ("param_layout=leaves", "param_layout"),
    # Each of these used to train, or fail only after compiling, with config.json written:
    ("keep_checkpoints=0", "keep_checkpoints"),  # trained, then kept no checkpoint at all
    ("loss=mmce_weighted,mmce_lambda=-1", "mmce_lambda"),  # trained, rewarding miscalibration
    ("lr_boundaries=[150,150]", "lr_boundaries"),  # trained, decaying once instead of twice
    ("loss=focal-1", "loss"), ("loss=[ce,focalnan]", "loss"), ("gamma=nan", "gamma"),
    ("weight_decay=nan", "weight_decay"), ("learning_rate=inf", "learning_rate"),
    ("lr_factor=-1", "lr_factor"), ("loss=label_smoothing,smoothing=-0.1", "smoothing"),
    ("flsd_threshold=0.6", "flsd_threshold"), ("gamma_boundaries=[5]", "gamma_boundaries"),
    ("eval_batch_size=0", "eval_batch_size"), ("seed=-1", "seed"),
    ("seeds=[-1,2]", "seeds"),  # trained a member "ce-seed-1"
    ("data_dir=/no/such/dir", "data_dir"),  # trained on the default data instead
    ("vocab_size=0", "vocab_size"),
])
def test_bad_config_fails_before_any_compute(override, field, tmp_path, monkeypatch):
    config = load_config(SMOKE + "," + override)
    from calib_jax.data import datasets
    monkeypatch.setattr(datasets, "load", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(train.ConfigError, match=f"config.{field}"):
        train.train_and_evaluate(config, tmp_path)  # 4 CPU devices: batch 6 is not divisible
    assert not (tmp_path / "checkpoints").exists()


def test_a_single_run_and_a_group_never_share_a_workdir(tmp_path, monkeypatch):
    # The evaluation pass would see only one of them (members.json or config.json).
    from calib_jax.data import datasets
    monkeypatch.setattr(datasets, "load", lambda *a, **k: pytest.fail("data was loaded"))
    group, single = tmp_path / "group", tmp_path / "single"
    group.mkdir()
    (group / "members.json").write_text(json.dumps({"members": ["ce", "flsd53"]}))
    with pytest.raises(train.ConfigError,
                       match=r"holds a group of runs \(members.json: ce, flsd53\)"):
        train.train_and_evaluate(load_config(SMOKE + ",loss=brier"), group)
    single.mkdir()
    (single / "config.json").write_text("{}")
    with pytest.raises(train.ConfigError,
                       match=r"holds a single run .*train several runs in a new"):
        train.train_and_evaluate(load_config(SMOKE + ",loss=[ce,brier]"), single)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "config.json", "group", "members.json", "single"]


def test_a_workdir_that_cannot_be_written_is_refused_before_the_data_is_loaded(
        tmp_path, monkeypatch):
    """Checked with os.access (a read-only directory, as root would still write into it)."""
    locked = tmp_path / "read_only"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked
                        and real_access(path, mode))
    from calib_jax.data import datasets

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the refusal")
    monkeypatch.setattr(datasets, "load", no_loading)
    for workdir, where in ((locked, "it"), (locked / "new" / "run", f"{locked}, where it")):
        with pytest.raises(train.ConfigError, match=rf"workdir {workdir}: {where}.* is not "
                                                    rf"writable by this process"):
            train.train_and_evaluate(load_config(SMOKE), workdir)
    assert list(locked.iterdir()) == []
    from calib_jax import files
    assert files.unwritable_reason(tmp_path / "new" / "run") is None  # creates nothing
    assert not (tmp_path / "new").exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("kept")
    with pytest.raises(train.ConfigError, match="workdir .*run is a file; give a directory"):
        train.train_and_evaluate(load_config(SMOKE), tmp_path / "run")
    assert (tmp_path / "run").read_text() == "kept"


def test_a_train_subset_larger_than_the_split_is_refused(tmp_path):
    # It used to train on the whole split, silently.
    config = load_config(SMOKE + ",train_subset=100000")
    with pytest.raises(train.ConfigError, match=r"config.train_subset = 100000: larger than "
                                                r"the training split \(\d+ examples\)"):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    # A batch larger than the (subset of the) split: the config's error, not the pipeline's.
    config = load_config(SMOKE + ",train_subset=40,batch_size=64")
    with pytest.raises(train.ConfigError, match=r"config.batch_size = 64: larger than the 40 "
                                                r"training examples of config.train_subset"):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_trained_workdir_refuses_a_config_that_computes_something_else(
        tmp_path, evaluated_runs, monkeypatch):
    run = evaluated_runs / "cifar10" / "resnet50" / "ce"  # trained with SMOKE
    before = (run / "config.json").read_text(), (run / "log.jsonl").read_text()
    from calib_jax.data import datasets
    monkeypatch.setattr(datasets, "load", lambda *a, **k: pytest.fail("data was loaded"))
    changed = load_config(SMOKE + ",loss=flsd53,learning_rate=0.5")
    with pytest.raises(train.ConfigError, match=r"loss 'ce' -> 'flsd53'; learning_rate 0\.1 -> "
                                                r"0\.5\. Use a new --workdir"):
        train.train_and_evaluate(changed, run)
    assert ((run / "config.json").read_text(), (run / "log.jsonl").read_text()) == before
    # What only decides how the run is executed, logged or saved may change; so may a field
    # that the saved config.json does not have (another calib_jax version).
    train.check_resumable(run, load_config(SMOKE + ",num_epochs=4,steps_per_call=3,"
                                                   "eval_batch_size=64,checkpoint_every_epochs=2"))
    # Shorter than what it has trained (2 epochs): refused, before the data (it used to rewrite
    # config.json with num_epochs=1 beside the epoch-2 state, and evaluate that as final).
    with pytest.raises(train.ConfigError,
                       match=r"has trained 2 epochs, more than config.num_epochs = 1"):
        train.train_and_evaluate(load_config(SMOKE + ",num_epochs=1"), run)
    assert ((run / "config.json").read_text(), (run / "log.jsonl").read_text()) == before
    extra = load_config(SMOKE)
    with extra.unlocked():
        extra.new_field = 1
    train.check_resumable(run, extra)
    # seeds=[seed] is the same single run: resumable, and recorded as seeds=() (a directory
    # that an earlier version recorded with seeds=[seed] resumes too).
    one_seed = load_config(SMOKE + f",seeds=[{extra.seed}]")
    [(name, member)] = train.run_members(one_seed)
    assert name == "" and tuple(member.seeds) == () and member.seed == extra.seed
    train.check_resumable(run, one_seed)
    train.check_resumable(run, member)
    assert train.field_differences({"seed": 3, "seeds": [3]}, {"seed": 3, "seeds": []}) == []
    assert train.field_differences({"seed": 3, "seeds": [4]}, {"seed": 3, "seeds": []}) == [
        ("seeds", [4], [])]
    # A directory without training (config.json, empty log: killed in its first epoch) may be
    # reused with any config.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text((run / "config.json").read_text())
    (fresh / "log.jsonl").write_text("")
    train.check_resumable(fresh, changed)
    (fresh / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(train.ConfigError, match="loss 'ce' -> 'flsd53'"):
        train.check_resumable(fresh, changed)


def test_unknown_config_field_is_rejected():
    with pytest.raises(ValueError, match="unknown config field 'lossy'"):
        load_config("lossy=ce")


def test_cli_states_refusals_in_one_message(tmp_path):
    """The training command's refusals before any compute are one message each, not a
    traceback: a misspelt --config path (a 40-line traceback from inside the config check) and
    a bad config value (train.ConfigError; the work directory refusals are of that class), and
    a --config.<field> flag for a field the config lacks (a 30-line traceback from inside
    absl's flag parsing)."""
    for path, overrides, flag, message in (
            (tmp_path / "cifar01.py", "loss=ce", [], "--config: cannot read the config file: "
                                                     "[Errno 2]"),
            (CONFIG, "loss=flsd35", [], "ConfigError: config.loss = 'flsd35': unknown loss"),
            (CONFIG, "loss=ce", ["--config.batch_sise=64"],
             '--config.batch_sise: the config has no field \'batch_sise\'. Did you mean '
             '"batch_size" instead of "batch_sise"? Its fields: augment, batch_size,'),
            (CONFIG, "loss=ce", ["--config.lr=0.1"],
             "--config.lr: the config has no field 'lr'. Its fields: augment, batch_size,")):
        done = subprocess.run(
            ["timeout", "-k", "10", "120", sys.executable, "-m", "calib_jax.train",
             f"--config={path}:{overrides}", *flag, f"--workdir={tmp_path / 'run'}"],
            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 1, done.stderr[-2000:]
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def test_a_workdir_another_process_trains_in_is_refused_before_anything_is_written(tmp_path):
    """The same command launched twice, or two sweeps over one work root: the second process
    is refused, naming the first, before it writes anything (a group also when only one
    member's directory is in use); the command says so in one line."""
    from calib_jax import files
    run = tmp_path / "run"
    with files.hold_directory_lock(run, "training"):
        with pytest.raises(files.DirectoryInUseError, match=rf"{run} is in use by another "
                                                            rf"process \(pid {os.getpid()}"):
            train.train_and_evaluate(load_config(SMOKE), run)
        done = subprocess.run(
            ["timeout", "-k", "10", "120", sys.executable, "-m", "calib_jax.train",
             f"--config={CONFIG}:{SMOKE}", f"--workdir={run}"],
            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 1, done.stderr[-2000:]
        assert f"DirectoryInUseError: {run} is in use by another process (pid {os.getpid()}" \
            in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == [files.LOCK_FILE]
    group = tmp_path / "group"
    with files.hold_directory_lock(group / "flsd53", "training"):
        with pytest.raises(files.DirectoryInUseError, match=rf"{group}/flsd53 is in use"):
            train.train_and_evaluate(load_config(SMOKE + ",loss=[ce,flsd53]"), group)
    assert sorted(p.name for p in group.rglob("*")) == [files.LOCK_FILE] * 3 + ["ce", "flsd53"]


SHARED = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "20news").is_dir(), reason=f"no 20news copy at {SHARED}")
def test_text_run_on_20_newsgroups(tmp_path, monkeypatch):
    from calib_jax.data import datasets
    load, shortened = datasets.load, []

    def load_a_shorter_val_split(name, split, **kwargs):
        # 128 of the 900 validation posts, and two training steps: a step of the 1,000-token
        # CNN at batch 64 takes ~2.4 s on 2 cores (over all 900 posts and four steps the test
        # took 57 s alone, 30 s over 256 posts; the suite's XLA level 0).
        data = load(name, split, **kwargs)
        if split == "val":
            shortened.append(len(data.labels))
            data = dataclasses.replace(data, inputs=data.inputs[:128], labels=data.labels[:128])
        return data

    monkeypatch.setattr(datasets, "load", load_a_shorter_val_split)
    config = experiment_configs.load("news20",
                                     "train_subset=128,num_epochs=1,batch_size=64,loss=flsd53")
    assert (config.optimizer, config.loss_mean, config.flsd_threshold) == ("adam", True, 0.19)
    state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 2
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert 0 <= record["val_ece"] <= 1 and np.isfinite(record["val_nll"])
    assert shortened == [900]  # the run validated on the shortened split
    # (The evaluation pass over the 3,766 test posts is left to the evaluate tests:
    # a 1,000-token CNN over them takes a minute on the CI's 2 CPU cores.)


def test_loss_spec_options_reach_the_objective():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8))
    spec = train.LossSpec("focal", gamma=1.5, mean_reduction=True)
    np.testing.assert_allclose(train.batch_loss(spec, z, y, 0),
                               losses.focal_loss(z, y, gamma=1.5).mean(), rtol=1e-6)
    spec = train.LossSpec("flsd53", flsd_threshold=0.19)
    want = losses.adaptive_focal_loss(z, y, thresholds=(0.19, 0.5), gammas=(5.0, 3.0)).sum()
    np.testing.assert_allclose(train.batch_loss(spec, z, y, 0), want, rtol=1e-6)
    spec = train.LossSpec("label_smoothing", smoothing=0.2)
    np.testing.assert_allclose(
        train.batch_loss(spec, z, y, 0),
        losses.label_smoothing_cross_entropy(z, y, smoothing=0.2).sum(), rtol=1e-6)


@pytest.mark.parametrize("name", train.LOSS_NAMES)
def test_node_losses_are_the_reference_sum_over_labelled_nodes_per_tree(name):
    """Phrase-level training: the batch loss over node logits [B, M, C] equals the flat loss
    over the labelled nodes alone (B trees: the reference's sum over nodes divided by the
    trees), in value and gradient; unlabelled nodes (padding) get no gradient."""
    b, m, c = 3, 6, 3
    rng = np.random.default_rng(11)
    logits = (2.0 * rng.standard_normal((b, m, c))).astype(np.float32)
    labels = rng.integers(0, c, (b, m)).astype(np.int32)
    labels[0, 4:] = labels[2, 2:] = -1
    where = labels >= 0
    spec = train.LossSpec(name, mean_reduction=True)

    def flat(z):  # the labelled nodes as a flat batch; its own `n` replaced by the B trees
        total = train.batch_loss(dataclasses.replace(spec, mean_reduction=False), z,
                                 labels[where], 2)
        return total / b if name != "brier" else total * len(z) / b

    def nodes(z):
        return train.batch_loss(spec, z, labels, 2)

    np.testing.assert_allclose(float(nodes(logits)), float(flat(logits[where])), rtol=1e-5)
    g = jax.grad(nodes)(logits)
    np.testing.assert_allclose(g[where], jax.grad(flat)(logits[where]), rtol=1e-4, atol=1e-6)
    assert np.all(g[~where] == 0)
    with pytest.raises(ValueError, match=r"need labels \[B, M\]"):
        train.batch_loss(spec, logits, labels[:, 0], 2)


@pytest.mark.skipif(not (SHARED / "sst").is_dir(), reason=f"no SST copy at {SHARED}")
def test_tree_lstm_run_on_sst(tmp_path, capsys):
    config = experiment_configs.load("sst", "train_subset=64,num_epochs=1,batch_size=16,"
                                     "loss=flsc531,mem_dim=8,embed_dim=8,eval_batch_size=436,"
                                     "log_every_steps=2")
    assert (config.optimizer, tuple(config.gamma_boundaries)) == ("adagrad", (3, 7))
    state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 4
    # Sentences, not images: the printed progress and epoch lines count examples.
    printed = capsys.readouterr().out
    assert "img" not in printed and " ex/s, ETA " in printed, printed
    assert "epoch 1/1: loss/ex " in printed and " ex/s)" in printed, printed
    record = json.loads((tmp_path / "log.jsonl").read_text())
    # Epoch 0 of FLSc-531 is focal loss with gamma 5, on every phrase of a tree (the
    # reference's SST training): about (2/3) ** 5 * log 3 per node of three classes, summed
    # over a tree's nodes (the root's alone would be ~40x less).
    from calib_jax.data import datasets
    nodes = datasets.load("sst", "train", phrase_labels=True).inputs[:, 3] >= 0
    subset = np.random.default_rng(config.seed).permutation(len(nodes))[:64]
    per_tree = (2 / 3) ** 5 * np.log(3) * nodes[subset].sum(axis=1).mean()
    assert 0.7 * per_tree < record["train_loss_per_image"] < 1.3 * per_tree, per_tree
    assert 0 <= record["val_ece"] <= 1


def test_vmapped_runs_equal_their_single_runs():
    """K runs that differ in loss and seed, as one vmapped program, match K separate runs
    (each member with its own initialisation, data order and augmentation)."""
    n, bs = 32, 16
    images, labels = toy_task(n, seed=5)
    model = TinyCNN()
    # Not mmce_weighted here: its MMD is a difference of nearly equal sums, so a batched
    # matmul's other summation order moves its gradient by ~1e-5 relative (measured), which
    # two clipped steps turn into ~1 % of the smallest parameters. Its vmapped value is
    # checked in test_vmapped_mmce_member_matches_within_its_conditioning below.
    names, seeds = ("ce", "flsd53", "brier"), (0, 1, 2)
    x, y = pipeline.put_on_device(images, labels)
    orders = jnp.stack([pipeline.epoch_order(seed, 0, n) for seed in seeds])
    singles = []
    for name, seed, order in zip(names, seeds, orders):
        state = fresh_state(seed, model)
        for step in range(2):
            state, m = train.train_steps(state, x, y, order, step, 0, seed, num_steps=1,
                                         loss_name=name, batch_size=bs, mean=MEAN, std=STD)
        singles.append((state.params, float(m["loss"][0])))
    stacked = train.stack_states([fresh_state(seed, model) for seed in seeds])
    for step in range(2):
        stacked, m = train.multi_train_steps(
            stacked, x, y, orders, step, 0, jnp.asarray(seeds), num_steps=1, losses_=names,
            shared_batch=False, batch_size=bs, mean=MEAN, std=STD)
    assert m["loss"].shape == (1, len(names))
    sequential = train.stack_states([fresh_state(seed, model) for seed in seeds])
    for step in range(2):
        sequential, _ = train.multi_train_steps(
            sequential, x, y, orders, step, 0, jnp.asarray(seeds), num_steps=1, losses_=names,
            shared_batch=False, batch_size=bs, mean=MEAN, std=STD, members="sequential")
    for k, (params, loss) in enumerate(singles):
        # Sequential members run the single runs' own convolutions (measured: bitwise).
        assert relative_error(train.unstack_state(sequential, k).params, params) < 1e-7
        np.testing.assert_allclose(float(m["loss"][0, k]), loss, rtol=1e-4)
        # Measured (TinyCNN): 4e-8 for all three. With ResNet-8 the FLSD-53 member reached
        # 1.2e-4: under the batched convolutions' other summation order a stem activation at
        # ~0 fell on the other side of its ReLU. A wrong batch, seed or loss gives order 1.
        error = relative_error(train.unstack_state(stacked, k).params, params)
        assert error < 1e-5, (names[k], error)


def test_vmapped_mmce_member_matches_within_its_conditioning():
    rng = np.random.default_rng(6)
    z = jnp.asarray(rng.standard_normal((3, 32, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 32))
    objective = lambda logits: train.batch_loss("mmce_weighted", logits, y, 0)  # noqa: E731
    batched = jax.vmap(jax.value_and_grad(objective))(z)
    for k in range(3):
        value, grad = jax.value_and_grad(objective)(z[k])
        np.testing.assert_allclose(batched[0][k], value, rtol=1e-5)
        np.testing.assert_allclose(batched[1][k], grad, rtol=1e-3, atol=1e-5)


def test_log_of_a_resumed_run_drops_epochs_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "val_ece": 0.1}) + "\n" for e in (1, 2, 3))
                   + '{"epoch": 4, "val_')  # torn by a kill mid-write
    train._truncate_log(log, 2)
    assert json_epochs(log.read_text().splitlines()) == [1, 2]
    train._truncate_log(tmp_path / "missing.jsonl", 0)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def tensorboard_scalars(run_dir) -> dict:
    """``{tag: [steps]}`` as TensorBoard shows the run: events read in file order, and a
    SessionLog START at step T (tensorboardX's purge_step) hides the earlier events of
    steps >= T."""
    import struct

    from tensorboardX.proto import event_pb2
    shown: dict = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                shown = {t: [s for s in steps if s < event.step] for t, steps in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append(event.step)
    return shown


def test_resume_after_a_kill_between_log_line_and_checkpoint(tmp_path, evaluated_runs):
    """The fixture's finished two-epoch run, as if killed after writing epoch 2's log line
    and TensorBoard scalars, while its checkpoint was being written: the rerun recomputes
    epoch 2, ends with one record per epoch in log.jsonl and in what TensorBoard shows, and
    deletes the half-written checkpoint's temporary folder."""
    import shutil
    run = tmp_path / "ce"
    shutil.copytree(evaluated_runs / "cifar10" / "resnet50" / "ce", run)
    for kind in ("checkpoints", "best"):
        shutil.rmtree(run / kind / "2", ignore_errors=True)
    half_written = run / "checkpoints" / "2.orbax-checkpoint-tmp-1234567"
    shutil.copytree(run / "checkpoints" / "1", half_written)
    assert tensorboard_scalars(run)["val_ece"] == [1, 2]
    train.train_and_evaluate(load_config(SMOKE), run)
    assert not half_written.exists()
    assert json_epochs((run / "log.jsonl").read_text().splitlines()) == [1, 2]
    shown = tensorboard_scalars(run)
    assert shown and all(steps == [1, 2] for steps in shown.values()), shown
    from calib_jax import checkpoints
    assert checkpoints.tree_equal(final_params(run),
                                  final_params(evaluated_runs / "cifar10" / "resnet50" / "ce"))


def test_a_finished_run_whose_final_checkpoint_is_unreadable_is_finished_by_a_rerun(
        tmp_path, evaluated_runs):
    """The fixture's finished two-epoch run with its final checkpoint damaged (checkpoints
    and best): the evaluation refuses it and says to rerun training; the rerun resumes from
    epoch 1, saves the recomputed epoch 2 in place of the damaged one (moved to
    unreadable/), and ends with the uninterrupted run's parameters; then it evaluates."""
    import shutil

    from calib_jax import checkpoints, evaluate
    run = tmp_path / "ce"
    original = evaluated_runs / "cifar10" / "resnet50" / "ce"
    shutil.copytree(original, run)
    damaged = [folder for folder in ("checkpoints", "best") if (run / folder / "2").is_dir()]
    assert "checkpoints" in damaged
    for folder in damaged:
        damage(run / folder / "2")
    with pytest.warns(RuntimeWarning, match="could not be read"), \
            pytest.raises(evaluate.EvaluationRefused, match="Rerun the run's training command"):
        evaluate.evaluate_run(run, which="final", out=tmp_path / "refused")
    with pytest.warns(RuntimeWarning) as record:
        train.train_and_evaluate(load_config(SMOKE), run)
    assert any("checkpoints/2 could not be read" in str(w.message) for w in record)
    assert any("checkpoints/2: it could not be read; replaced by the recomputed epoch 2; moved "
               "to" in str(w.message) for w in record)
    assert sorted(p.name for p in (run / "unreadable").iterdir()) == \
        sorted(f"{folder}-2" for folder in damaged)
    assert json_epochs((run / "log.jsonl").read_text().splitlines()) == [1, 2]
    assert checkpoints.tree_equal(final_params(run), final_params(original))
    evaluate.evaluate_run(run, which="final", out=tmp_path / "evaluated")
    assert (tmp_path / "evaluated" / "results.json").exists()


def test_a_damaged_best_checkpoint_past_the_resume_point_is_replaced(tmp_path,
                                                                     evaluated_runs):
    """A best checkpoint saved after the newest periodic one (here: the periodic ones lost)
    is recomputed by the resumed run; the run reads it on resuming, so a damaged one is
    replaced, not kept (evaluate --checkpoint best would refuse the run for good)."""
    import shutil

    from calib_jax import checkpoints
    run = tmp_path / "ce"
    original = evaluated_runs / "cifar10" / "resnet50" / "ce"
    shutil.copytree(original, run)
    shutil.rmtree(run / "checkpoints")
    (best_epoch,) = checkpoints.saved_epochs(run, "best")
    damage(run / "best" / str(best_epoch))
    with pytest.warns(RuntimeWarning) as record:
        train.train_and_evaluate(load_config(SMOKE), run)
    assert any(f"best/{best_epoch}: it could not be read; replaced" in str(w.message)
               for w in record)
    config = load_config(SMOKE)
    template = train.state_for_config(config, 4, (32, 32, 3))
    restored = [checkpoints.RunCheckpoints(r).restore(template, "best") for r in (run, original)]
    assert restored[0][1]["epoch"] == restored[1][1]["epoch"] == best_epoch
    assert checkpoints.tree_equal(jax.device_get(restored[0][0].params),
                                  jax.device_get(restored[1][0].params))


def test_a_resumed_run_rewrites_a_damaged_best_checkpoint_from_its_periodic_twin(
        tmp_path, evaluated_runs, capsys):
    """A best checkpoint at or before the resume point is not recomputed; while its epoch's
    periodic checkpoint is kept, the resumed run (here: the finished run's command again,
    which says that there is nothing to train) rewrites it from that one, so the best state
    outlives the periodic one's rotation."""
    import shutil

    from calib_jax import checkpoints
    run = tmp_path / "ce"
    original = evaluated_runs / "cifar10" / "resnet50" / "ce"
    shutil.copytree(original, run)
    (best_epoch,) = checkpoints.saved_epochs(run, "best")
    assert best_epoch in checkpoints.saved_epochs(run)  # its twin (checkpoint_every_epochs=1)
    damage(run / "best" / str(best_epoch))
    with pytest.warns(RuntimeWarning) as record:
        train.train_and_evaluate(load_config(SMOKE), run)
    assert any(f"best/{best_epoch}: it could not be read; replaced by a copy of "
               f"{run}/checkpoints/{best_epoch}" in str(w.message) for w in record), \
        [str(w.message) for w in record]
    assert capsys.readouterr().out.splitlines() == [
        f"resumed from {run}/checkpoints/2 (epoch 2)",
        f"the run has finished its 2 epochs: nothing to train (--config.num_epochs=N lengthens "
        f"it; python -m calib_jax.evaluate --workdir {run} evaluates it)"]
    shutil.rmtree(run / "checkpoints" / str(best_epoch))  # as rotation would
    config = load_config(SMOKE)
    template = train.state_for_config(config, 4, (32, 32, 3))
    restored = [checkpoints.RunCheckpoints(r).restore(template, "best") for r in (run, original)]
    assert restored[0][1] == restored[1][1]  # meta: the epoch and the best accuracy
    assert checkpoints.tree_equal(jax.device_get(checkpoints.state_to_tree(restored[0][0])),
                                  jax.device_get(checkpoints.state_to_tree(restored[1][0])))


def _record_loop_calls(monkeypatch, name):
    """Wraps ``train.<name>`` (the loop's compiled call) to record each call's keywords."""
    calls, original = [], getattr(train, name)

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(train, name, recording)
    return calls


def test_several_steps_per_call_train_like_one_step_per_call(tmp_path, evaluated_runs,
                                                              monkeypatch):
    """The accelerators' default path through train_and_evaluate (several steps per call,
    an epoch's last call shorter: 8 steps = 3 + 3 + 2, losses read one call behind) ends
    its epoch where the fixture's one-step-per-call run does. The scan is unrolled: XLA:CPU's
    in-loop convolutions round differently (ResNet-8, 8 steps: 5e-4 apart, growing from
    2e-6 at step 3), which would hide a bookkeeping error of that size. Unrolled, the two
    differ by float32 rounding of differently fused programs, grown over 8 steps (with the
    closed-form BatchNorm gradient: 1.6e-5 with jax 0.11.2, 1.2e-3 with jax 0.12.0.1; a
    float32 gradient of ResNet-8 is 9e-4 from float64's, autodiff's or closed form's
    alike), while one step skipped, repeated or given another batch moves the parameters
    by about one step's update, ~2% here (8 steps move them ~15%): the bound is a quarter
    of one step's update, measured in the test."""
    from calib_jax import checkpoints
    calls = _record_loop_calls(monkeypatch, "train_steps")
    config = load_config(SMOKE.replace("num_epochs=2", "num_epochs=1")
                         + ",steps_per_call=3,scan_unroll=3,param_layout=flat")
    train.train_and_evaluate(config, tmp_path)
    whole = evaluated_runs / "cifar10" / "resnet50" / "ce"
    template = train.state_for_config(config, 4, (32, 32, 3))
    expected, _ = checkpoints.RunCheckpoints(whole).restore(template, 1)
    got, meta = checkpoints.RunCheckpoints(tmp_path).restore(template)
    assert meta["epoch"] == 1 and meta["final"]
    assert [(c["num_steps"], c["unroll"], c["flat_params"]) for c in calls] == [
        (3, 3, True), (3, 3, True), (2, 3, True)]
    error = relative_error(got.params, expected.params)
    one_step = relative_error(expected.params, template.params) / 8  # template: initial
    assert one_step > 5e-3 and error < one_step / 4, (error, one_step)
    logged = [json.loads((d / "log.jsonl").read_text().splitlines()[0])
              for d in (tmp_path, whole)]
    # The epoch's logged training figures (the losses read one call behind) agree closely
    # (the mean loss: 1.4e-5 with jax 0.12.0.1; 1.05e-4 with jax 0.10.2 once BatchNorm took
    # the ReLU and the gradient norm became one reduction: rounding again; a lost or
    # repeated call's losses would move it by percents); the validation NLL follows the
    # final parameters' rounding (0.5% there).
    for key, rtol in (("train_loss_per_image", 1e-3), ("train_accuracy", 1e-4),
                      ("val_accuracy", 1e-2), ("val_nll", 1e-2)):
        np.testing.assert_allclose(logged[0][key], logged[1][key], rtol=rtol, err_msg=key)


@pytest.mark.parametrize("steps,log_every,platform,expected", [
    (351, 50, "gpu", 39),   # CIFAR-10 at batch 128: 9 calls of 39, one compilation
    (390, 50, "tpu", 39),   # 390 = 10 x 39
    (400, 50, "gpu", 50),
    (37, 50, "gpu", 37),    # an epoch shorter than the log interval: one call per epoch
    (101, 50, "gpu", 50),   # prime: no divisor near 50, the tail call compiles once more
    (351, 50, "cpu", 1),    # jax-ml/jax#12868
])
def test_default_steps_per_call(steps, log_every, platform, expected):
    assert train.default_steps_per_call(steps, log_every, platform) == expected


@pytest.mark.parametrize("platform,members,expected", [
    ("gpu", 1, 2),   # measured on an H200: +4.4% / +5.9% images/s
    ("gpu", 6, 1),   # a six-member body is already six steps long
    ("cpu", 1, 1),   # one step per call on CPU: nothing to unroll
    ("tpu", 1, 1),   # unmeasured
])
def test_default_unroll(platform, members, expected):
    assert train.default_unroll(platform, members) == expected


@pytest.mark.parametrize("layout,platform,expected", [
    ("auto", "gpu", True),   # measured on an H200 (with the GPU sums and graph options)
    ("auto", "cpu", False),  # ~30% slower on CPU
    ("auto", "tpu", False),  # unmeasured
    ("flat", "cpu", True), ("tree", "gpu", False),
])
def test_param_layout(layout, platform, expected):
    assert train._param_layout_is_flat(layout, platform) is expected
    one_dtype = {"w": jnp.ones(3), "b": jnp.ones(2)}
    assert train._param_layout_is_flat(layout, platform, one_dtype) is expected
    # auto keeps the tree for parameters of two dtypes (the vector would convert some).
    two_dtypes = {"w": jnp.ones(3), "b": jnp.ones(2, jnp.bfloat16)}
    assert train._param_layout_is_flat(layout, platform, two_dtypes) is (
        expected and layout != "auto")


def test_members_restart_from_their_newest_common_checkpoint(tmp_path, capsys):
    """Members are saved one after another; a run killed between two saves restarts all
    members from the newest epoch they all have, and the recomputed epoch that one member
    already saved is left as it was."""
    from calib_jax import checkpoints
    tx = train.make_optimizer(0.1)

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x)

    def state(value):
        s = train.create_train_state(jax.random.PRNGKey(0), Tiny(), tx, (1, 3))
        return s.replace(params=jax.tree_util.tree_map(lambda p: p * 0 + value, s.params))

    ckpts = [checkpoints.RunCheckpoints(tmp_path / name) for name in ("a", "b")]
    for epoch in (1, 2):
        ckpts[0].save(epoch, state(epoch), {"best_val_accuracy": 0.5})
    ckpts[1].save(1, state(10), {"best_val_accuracy": 0.5})  # killed before b's epoch 2
    states, metas = train._restore_members(ckpts, [state(0), state(0)])
    assert [m["epoch"] for m in metas] == [1, 1]
    assert float(flat(states[0].params)[0]) == 1 and float(flat(states[1].params)[0]) == 10
    ckpts[0].save(2, state(99), {"best_val_accuracy": 0.5})  # exists: kept as it was
    again, _ = ckpts[0].restore(state(0), 2)
    assert float(flat(again.params)[0]) == 2
    empty = [checkpoints.RunCheckpoints(tmp_path / n) for n in ("c", "d")]
    assert train._restore_members(empty, [state(0)] * 2) is None
    train._warn_progress_not_shared(["c", "d"], empty)  # a new group: nothing to say
    assert capsys.readouterr().err == ""
    # A member added to the half-trained group: no common epoch, all restart, and it says so.
    grown = ckpts + empty[:1]
    assert train._restore_members(grown, [state(0)] * 3) is None
    train._warn_progress_not_shared(["a", "b", "c"], grown)
    err = capsys.readouterr().err
    assert "(a: up to epoch 2, b: up to epoch 1; members without any: c)" in err
    assert "all 3 members train from epoch 0" in err
    for c in ckpts + empty:
        c.close()


def test_a_single_run_none_of_whose_checkpoints_can_be_read_says_it_starts_again(tmp_path,
                                                                                 capsys):
    """The warning of a group without a common epoch, for one run: in words that fit."""
    from calib_jax import checkpoints
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(2, fresh_state(0), {})
    ckpt.save(4, fresh_state(0), {})
    train._warn_progress_not_shared([""], [ckpt])
    ckpt.close()
    assert capsys.readouterr().err == (
        f"warning: none of the checkpoints in {tmp_path}/checkpoints could be read (epochs 2, "
        f"4), so training starts again from epoch 0; each unreadable one is replaced (its "
        f"files moved to {tmp_path}/unreadable/) when its epoch is recomputed.\n")


def test_command_line_tools_print_their_own_warnings_in_one_line(capsys):
    import warnings

    from calib_jax import checkpoints
    # pytest.warns records what reaches Python's own handler: only the other library's.
    with pytest.warns(DeprecationWarning, match="a library's") as passed_on:
        before = warnings.showwarning
        with train.concise_warnings():
            warnings.warn_explicit("a checkpoint moved", RuntimeWarning,
                                   checkpoints.__file__, 10)
            warnings.warn_explicit("a library's", DeprecationWarning, "/elsewhere/lib.py", 7)
        assert warnings.showwarning is before
    assert len(passed_on) == 1
    assert capsys.readouterr().err == "warning: a checkpoint moved\n"


def test_a_group_without_a_common_checkpoint_warns_before_training(tmp_path, monkeypatch):
    class Warned(Exception):
        pass

    def warn(names, ckpts):
        raise Warned(names)

    monkeypatch.setattr(train, "_warn_progress_not_shared", warn)
    with pytest.raises(Warned, match=r"\['ce', 'flsd53'\]"):
        train.train_and_evaluate(load_config(SMOKE + ",loss=[ce,flsd53]"), tmp_path)


def test_a_row_of_losses_trains_as_one_program_into_member_run_directories(
        tmp_path, evaluated_runs, monkeypatch):
    """loss=[ce,flsd53]: one program, several steps per call (the GPU / TPU defaults; the
    scan unrolled, see the test above); each member is a complete run directory, the ce
    member equals the fixture's single ce run, and evaluate handles the group. Members run
    sequentially in the program (the CPU and GPU default): vmapped members make grouped
    convolutions, 43 s of this test instead of 18 s on CPU; the vmapped step and prediction
    are checked against single runs in test_vmapped_runs_equal_their_single_runs and
    test_every_loss_trains_in_one_program."""
    from calib_jax import checkpoints, evaluate
    calls = _record_loop_calls(monkeypatch, "multi_train_steps")
    # Two steps per call: the epoch's 8 steps are four calls of one compiled program (a tail
    # call, compiled apart, is the single-run test's above, and would cost ~8 s more here).
    config = load_config(SMOKE + ",num_epochs=1,loss=[ce,flsd53],multi_mode=sequential,"
                         "steps_per_call=2,scan_unroll=2,param_layout=flat")
    assert [name for name, _ in train.run_members(config)] == ["ce", "flsd53"]
    train.train_and_evaluate(config, tmp_path)
    assert json.loads((tmp_path / "members.json").read_text())["members"] == ["ce", "flsd53"]
    for name in ("ce", "flsd53"):
        member_config = json.loads((tmp_path / name / "config.json").read_text())
        assert member_config["loss"] == name and member_config["num_epochs"] == 1
        assert json_epochs((tmp_path / name / "log.jsonl").read_text().splitlines()) == [1]
    template = train.state_for_config(load_config(SMOKE), 4, (32, 32, 3))
    single, _ = checkpoints.RunCheckpoints(evaluated_runs / "cifar10" / "resnet50" / "ce").restore(
        template, 1)
    member, meta = checkpoints.RunCheckpoints(tmp_path / "ce").restore(template)
    assert meta["epoch"] == 1 and meta["final"]
    assert len(calls) == 4 and all(c["unroll"] == 2 and c["num_steps"] == 2 and c["flat_params"]
                                   for c in calls)
    # Measured 0 at the test session's XLA level 0 and 4.0e-7 at XLA's default level (vmapped
    # members: 3.5e-3, the rounding of grouped convolutions after eight steps at lr 0.1,
    # where a stem activation at ~0 lands on the other side of its ReLU; another seed or
    # batch order gives order 1).
    assert relative_error(member.params, single.params) < 1e-4
    logged = [json.loads((d / "log.jsonl").read_text().splitlines()[0])["train_loss_per_image"]
              for d in (tmp_path / "ce", evaluated_runs / "cifar10" / "resnet50" / "ce")]
    np.testing.assert_allclose(*logged, rtol=1e-3)
    assert [p.name for p in evaluate.member_dirs(tmp_path)] == ["ce", "flsd53"]
    # The loop validated both members in one pass over the group (predict_members): its
    # logged metrics are those of each saved member's own forward pass.
    from calib_jax.data import datasets
    val = datasets.load(config.dataset, "val", data_dir=config.data_dir or None,
                        **train.dataset_options(config))
    mean, std = train.input_normalization(config, "train")
    for name in ("ce", "flsd53"):
        saved, _ = checkpoints.RunCheckpoints(tmp_path / name).restore(template)
        expected = train._validation_metrics(
            train.predict(saved, val.inputs, mean=mean, std=std,
                          batch_size=config.eval_batch_size), val.labels)
        line = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])
        assert line["val_accuracy"] == expected["val_accuracy"]
        np.testing.assert_allclose([line["val_nll"], line["val_ece"]],
                                   [expected["val_nll"], expected["val_ece"]], rtol=1e-4,
                                   atol=1e-6)


def test_members_listing_keeps_the_members_of_earlier_programs(tmp_path):
    """A row trained as two groups in one directory (sweep --vmap-rows after some cells were
    done) lists all four runs, so evaluate on the directory finds each; a member whose
    directory is gone is dropped, and a member trained again is listed once."""
    from calib_jax import evaluate

    def program(names):
        for name in names:
            (tmp_path / name).mkdir(exist_ok=True)
        train._write_members_listing(tmp_path, names, load_config(f"loss=[{','.join(names)}]"))

    program(["ce", "brier"])
    program(["focal3", "flsd53"])
    listing = json.loads((tmp_path / "members.json").read_text())
    assert listing["members"] == ["ce", "brier", "focal3", "flsd53"]
    assert listing["config"]["loss"] == "[focal3,flsd53]"
    assert [p.name for p in evaluate.member_dirs(tmp_path)] == ["ce", "brier", "focal3", "flsd53"]
    (tmp_path / "brier").rmdir()
    program(["ce", "mmce_weighted"])
    assert evaluate.member_dirs(tmp_path) == [tmp_path / n for n in
                                              ("focal3", "flsd53", "ce", "mmce_weighted")]


def test_member_lists_in_configs():
    config = load_config("loss=[ce,focal2.5],seeds=[1,2]")
    members = dict(train.run_members(config))
    assert list(members) == ["ce-seed1", "ce-seed2", "focal2.5-seed1", "focal2.5-seed2"]
    assert (members["focal2.5-seed2"].loss, members["focal2.5-seed2"].gamma,
            members["focal2.5-seed2"].seed) == ("focal", 2.5, 2)
    assert train.run_members(load_config("loss=flsd53")) == [("", load_config("loss=flsd53"))]
    [(name, one)] = train.run_members(load_config("loss=[focal2],seeds=[5]"))
    assert (name, one.loss, one.gamma, one.seed) == ("", "focal", 2.0, 5)
    # Where each lives: its own folder, or the work directory itself for a single run.
    assert train.member_dir("runs/row", "ce-seed1") == Path("runs/row/ce-seed1")
    assert train.member_dir("runs/one", name) == Path("runs/one")
    for bad, why in (("loss=[ce,foo]", "unknown loss 'foo'"), ("loss=[ce,ce]", "twice"),
                     ("seeds=[1,1]", "distinct"),
                     ("seeds=[1,2],train_subset=100", "own subset")):
        with pytest.raises(train.ConfigError, match=why):
            train.validate_config(load_config(bad), 1)
    row = experiment_configs.load("paper", "cell=cifar10/resnet50/[ce,brier,focal],num_epochs=3")
    assert (row.loss, row.num_epochs) == ("[ce,brier,focal]", 3)
    with pytest.raises(ValueError, match="different recipes"):
        experiment_configs.load("paper", "cell=cifar10/wide_resnet_26_10/[ce,brier]")


def test_orbax_and_jax_info_records_are_dropped_and_their_warnings_kept():
    import logging
    import os
    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")

    def record(level, pathname):
        return logging.LogRecord("absl", level, pathname, 1, "message", None, None)

    logger, jax_logger = logging.getLogger("absl"), logging.getLogger("jax")
    before, jax_level = list(logger.filters), jax_logger.level
    try:
        jax_logger.setLevel(logging.NOTSET)  # as under absl.app: the root's INFO
        logging.getLogger().setLevel(logging.INFO)
        assert logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.INFO)
        train.quiet_library_info_logs()
        train.quiet_library_info_logs()  # idempotent: one filter
        assert len(logger.filters) == len(before) + 1
        assert not logger.filter(record(logging.INFO, orbax_file))
        assert logger.filter(record(logging.WARNING, orbax_file))
        assert logger.filter(record(logging.INFO, os.path.join("calib_jax", "train.py")))
        # JAX's start-up "Unable to initialize backend 'tpu'" is INFO; its warnings stay.
        assert not logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.INFO)
        assert logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.WARNING)
        assert logging.getLogger("calib_jax").isEnabledFor(logging.INFO)
    finally:
        logger.filters[:] = before
        jax_logger.setLevel(jax_level)


def test_progress_is_rewritten_on_a_terminal_and_a_line_of_its_own_in_a_log(capsys,
                                                                              monkeypatch):
    train._show_progress("epoch 1/2 step 8/8")
    assert capsys.readouterr().out == "epoch 1/2 step 8/8\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    train._show_progress("epoch 1/2 step 8/8")
    assert capsys.readouterr().out == "\repoch 1/2 step 8/8"


def test_an_epoch_sums_every_call_per_member_and_shows_progress_at_log_steps(capsys):
    """10 steps in calls of 4 (the last of 2), two members: every call's losses and correct
    counts are added to its member's sums, and progress is shown after the calls that cross a
    multiple of log_every_steps = 4 and after the last, but never after the first call (its
    rate would count no step)."""
    calls = []

    def run_chunk(state, orders, first, count, epoch):
        calls.append((first, count, epoch))
        steps = np.arange(first, first + count, dtype=np.float32)
        return state + 1, {"loss": np.stack([steps, 10 * steps], 1),
                           "correct": np.ones((count, 2), np.int32)}

    config = load_config(SMOKE + ",num_epochs=5,batch_size=2,log_every_steps=4")
    progress = train._EpochProgress(config, epoch=0, steps=10)
    state, loss_sums, correct, seconds = train._train_epoch(
        run_chunk, 0, None, 0, steps=10, per_call=4, num_members=2, wait_each_call=True,
        progress=progress)
    assert calls == [(0, 4, 0), (4, 4, 0), (8, 2, 0)] and state == 3
    np.testing.assert_array_equal(loss_sums, [45, 450])
    np.testing.assert_array_equal(correct, [10, 10])
    assert seconds > 0 and progress.shown
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" img/s")[0].rsplit(" ", 1)[0] for line in lines] == [
        "epoch 1/5 step 8/10", "epoch 1/5 step 10/10"]
    assert all(line.endswith(" min") and "ETA" in line for line in lines)


def test_a_diverging_run_stops_before_saving_the_nan_epoch(tmp_path):
    """Epoch 1 trains at lr 0.1, epoch 2 at 1e8 without clipping: the loss becomes NaN in
    epoch 2, and the run stops there, naming it, with epoch 1's log line and checkpoint
    intact (it used to crash in the validation metrics with "`logits` contains NaN", or, had
    the logits stayed finite, train on for the whole schedule, its NaN checkpoints pushing
    the good ones out)."""
    config = load_config(SMOKE + ",lr_boundaries=[1],lr_factor=1e9,clip_norm=0.0")
    with pytest.raises(train.TrainingDivergedError,
                       match=r"diverged in epoch 2 \(the run: training loss not finite\).*"
                             r"Checkpoints kept: up to epoch 1 .*learning_rate \(now 0.1\)"):
        train.train_and_evaluate(config, tmp_path)
    assert json_epochs((tmp_path / "log.jsonl").read_text().splitlines()) == [1]
    from calib_jax import checkpoints
    assert checkpoints.saved_epochs(tmp_path, "latest") == [1]
    assert checkpoints.saved_epochs(tmp_path, "best") == [1]


def test_divergence_message_names_the_members():
    config = load_config(SMOKE + ",dtype=bfloat16")
    finite = {"val_accuracy": 0.5, "val_nll": 1.0, "val_ece": 0.1}
    train._check_finite_epoch(config, 3, ["ce", "brier"], np.array([1.0, 2.0]),
                              [finite, finite], 2)  # all finite: nothing raised
    with pytest.raises(train.TrainingDivergedError) as info:
        train._check_finite_epoch(config, 3, ["ce", "brier", "focal3"],
                                  np.array([np.nan, 2.0, np.inf]), [None, None, finite], 0)
    message = str(info.value)
    assert ("epoch 3 (ce: training loss; brier: model (NaN or infinite validation logits); "
            "focal3: training loss not finite)") in message
    assert "Checkpoints kept: none" in message and "dtype float32 (now bfloat16)" in message
    assert "The other members (brier)" not in message  # brier diverged too
    with pytest.raises(train.TrainingDivergedError, match=r"The other members \(brier\) were "
                                                          r"finite.*--workdir <workdir>/<member>"):
        train._check_finite_epoch(config, 3, ["ce", "brier"], np.array([np.nan, 2.0]),
                                  [finite, finite], 0)


def test_a_training_call_failing_under_the_graph_option_names_the_switch(tmp_path,
                                                                        monkeypatch):
    """What a GPU user sees if cuDNN refuses to be traced into a CUDA graph (the error an
    H200 gave for the concurrent graph mode), simulated on CPU: the loop's first call fails,
    the error names --config.gpu_graph_convolutions=False and keeps XLA's error as its
    cause; nothing is logged or saved. Another error passes through unchanged."""
    def failing(message):
        def steps(*args, **kwargs):
            raise RuntimeError(message)
        return lambda options: (steps, steps)

    monkeypatch.setattr(train, "loop_compiler_options",
                        lambda platform, graph_convolutions=True: dict(
                            train.GPU_GRAPH_CONVOLUTIONS) if graph_convolutions else {})
    config = load_config(SMOKE)
    cudnn = "UNKNOWN: <unknown cudnn status: 5003> [executable_name='jit_train_steps']"
    monkeypatch.setattr(train, "_loop_jits", failing(cudnn))
    with pytest.raises(RuntimeError, match="--config.gpu_graph_convolutions=False") as info:
        train.train_and_evaluate(config, tmp_path / "a")
    assert "5003" in str(info.value.__cause__)
    assert not (tmp_path / "a" / "log.jsonl").exists() or \
        not (tmp_path / "a" / "log.jsonl").read_text()
    monkeypatch.setattr(train, "_loop_jits", failing("RESOURCE_EXHAUSTED: out of memory"))
    with pytest.raises(RuntimeError, match="^RESOURCE_EXHAUSTED: out of memory$"):
        train.train_and_evaluate(config, tmp_path / "b")
