"""calib_jax.train: loss names and reductions, optimiser recipe, a real step on tiny data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiment_configs
from calib_jax import losses, models, train
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


@pytest.mark.parametrize("loss_name", train.LOSS_NAMES)
def test_one_epoch_on_tiny_data_for_every_loss(loss_name):
    rng = np.random.default_rng(0)
    n, bs = 64, 16
    # Learnable toy task: the label is which quadrant is brightest.
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, (y // 2) * 16:(y // 2 + 1) * 16, (y % 2) * 16:(y % 2 + 1) * 16] += 150
    model = models.get("resnet8", 4)
    tx = train.make_optimizer(0.05)
    state = train.create_train_state(jax.random.PRNGKey(0), model, tx, (1, 32, 32, 3))
    x, y = pipeline.put_on_device(images, labels)
    first = None
    for epoch in range(1):
        order = pipeline.epoch_order(0, epoch, n)
        for step in range(pipeline.steps_per_epoch(n, bs)):
            xb, yb = pipeline.train_batch(x, y, order, step, seed=0, epoch=epoch, batch_size=bs,
                                          augment=False)
            state, m = train.train_step(state, xb, yb, epoch, loss_name=loss_name, mean=MEAN,
                                        std=STD)
            m = jax.device_get(m)
            assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
            first = m["loss"] if first is None else first
    assert int(state.step) == 4
    logits = train.predict(state, images, mean=MEAN, std=STD, batch_size=24)
    assert logits.shape == (n, 4) and np.all(np.isfinite(logits))


def test_data_parallel_step_equals_single_device():
    """jit + NamedSharding: replicated state, batch split over 4 CPU devices. Gradients,
    BatchNorm statistics (global batch) and MMCE (global batch) must match one device."""
    n_dev = len(jax.devices())
    assert n_dev >= 2
    rng = np.random.default_rng(1)
    n, bs = 64, 32
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, n)
    model = models.get("resnet8", 4)
    mesh = pipeline.data_mesh()
    results = []
    for sharded in (False, True):
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
        for step in range(2):
            xb, yb = pipeline.train_batch(x, y, order, step, seed=0, epoch=0, batch_size=bs,
                                          sharding=batch_sharding)
            state, m = train.train_step(state, xb, yb, 0, loss_name="mmce_weighted", mean=MEAN,
                                        std=STD)
            m = jax.device_get(m)  # wait for each sharded step (2-core CPU collectives)
        results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), m))
    (p1, b1, m1), (p2, b2, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((p1, b1)), jax.tree_util.tree_leaves((p2, b2))):
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
SMOKE = "dataset=synthetic,model=resnet8,num_epochs=2,batch_size=64,checkpoint_every_epochs=1"


def load_config(arg):
    return experiment_configs.load("cifar10", arg)


def run_cli(workdir, *extra, wait=True):
    cmd = [sys.executable, "-m", "calib_jax.train", f"--config={CONFIG}:{SMOKE}",
           f"--workdir={workdir}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
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


def test_sigkill_and_restart_gives_exactly_the_uninterrupted_parameters(tmp_path):
    whole = run_cli(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = run_cli(killed, wait=False)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "1").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "1").exists()
    resumed = run_cli(killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = final_params(tmp_path / "whole"), final_params(killed)
    from calib_jax import checkpoints
    assert checkpoints.tree_equal(a, b)
    log = (killed / "log.jsonl").read_text().splitlines()
    assert json_epochs(log)[-1] == 2


def json_epochs(lines):
    return [json.loads(line)["epoch"] for line in lines]


@pytest.mark.parametrize("override,field", [
    ("loss=focal_loss", "loss"), ("model=resnet51", "model"), ("learning_rate=-0.1", "learning_rate"),
    ("batch_size=6", "batch_size"), ("dtype=float16", "dtype"), ("num_epochs=0", "num_epochs"),
])
def test_bad_config_fails_before_any_compute(override, field, tmp_path, monkeypatch):
    config = load_config(SMOKE + "," + override)
    from calib_jax.data import datasets
    monkeypatch.setattr(datasets, "load", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ValueError, match=f"config.{field}"):
        train.train_and_evaluate(config, tmp_path)  # 4 CPU devices: batch 6 is not divisible
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_field_is_rejected():
    with pytest.raises(ValueError, match="unknown config field 'lossy'"):
        load_config("lossy=ce")


SHARED = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "20news").is_dir(), reason=f"no 20news copy at {SHARED}")
def test_text_run_on_20_newsgroups(tmp_path):
    config = experiment_configs.load("news20",
                                     "train_subset=256,num_epochs=1,batch_size=64,loss=flsd53")
    assert (config.optimizer, config.loss_mean, config.flsd_threshold) == ("adam", True, 0.19)
    state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 4
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert 0 <= record["val_ece"] <= 1 and np.isfinite(record["val_nll"])
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


@pytest.mark.skipif(not (SHARED / "sst").is_dir(), reason=f"no SST copy at {SHARED}")
def test_tree_lstm_run_on_sst(tmp_path):
    config = experiment_configs.load("sst", "train_subset=64,num_epochs=1,batch_size=16,"
                                     "loss=flsc531,mem_dim=8,embed_dim=8,eval_batch_size=436")
    assert (config.optimizer, tuple(config.gamma_boundaries)) == ("adagrad", (3, 7))
    state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 4
    record = json.loads((tmp_path / "log.jsonl").read_text())
    # Epoch 0 of FLSc-531 is focal loss with gamma 5: about 0.5 ** 5 * log 2 per sentence.
    assert 0.005 < record["train_loss_per_image"] < 0.2
    assert 0 <= record["val_ece"] <= 1


def test_vmapped_runs_equal_their_single_runs():
    """K runs that differ in loss, as one vmapped program, match K separate runs."""
    rng = np.random.default_rng(5)
    n, bs = 32, 16
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, n)
    model = models.get("resnet8", 4)
    # Not mmce_weighted here: its MMD is a difference of nearly equal sums, so a batched
    # matmul's other summation order moves its gradient by ~1e-5 relative (measured), which
    # two clipped steps turn into ~1 % of the smallest parameters. Its vmapped value is
    # checked in test_vmapped_mmce_member_matches_within_its_conditioning below.
    names = ("ce", "flsd53", "brier")
    x, y = pipeline.put_on_device(images, labels)
    order = pipeline.epoch_order(0, 0, n)
    batches = [pipeline.train_batch(x, y, order, s, seed=0, epoch=0, batch_size=bs)
               for s in range(2)]

    def fresh(seed):
        return train.create_train_state(jax.random.PRNGKey(seed), model, train.make_optimizer(0.05),
                                        (1, 32, 32, 3))

    singles = []
    for k, name in enumerate(names):
        state = fresh(k)
        for xb, yb in batches:
            state, m = train.train_step(state, xb, yb, 0, loss_name=name, mean=MEAN, std=STD)
        singles.append((jax.device_get(state.params), float(m["loss"])))
    stacked = train.stack_states([fresh(k) for k in range(len(names))])
    for xb, yb in batches:
        stacked, m = train.multi_train_step(stacked, xb, yb, 0, losses_=names, mean=MEAN, std=STD)
    assert m["loss"].shape == (len(names),)
    for k, (params, loss) in enumerate(singles):
        member = jax.device_get(train.unstack_state(stacked, k).params)
        np.testing.assert_allclose(float(m["loss"][k]), loss, rtol=1e-4)
        # Whole-model relative error: leaves whose gradient is a near-cancelling sum (BN
        # biases under a mean-reduced loss) carry float32 noise of a few 1e-3 of their size.
        a = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(member)])
        b = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(params)])
        error = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert error < 1e-4, (names[k], error)  # measured: ce, flsd53 < 2e-6; brier 1.5e-5


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
