"""Two processes on 127.0.0.1 (jax.distributed, CPU, gloo) train a two-member group exactly
like one process with the same two devices. Each process runs under `timeout -k`: JAX can
ignore SIGTERM in a hung collective (and a barrier clash of Orbax's background saves hangs)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax

import experiment_configs
from checkpoint_damage import damage
from calib_jax import checkpoints, train

REPO = Path(__file__).resolve().parents[1]
# Two members, two epochs of 3 steps (a 96-image subset at batch 32: the collectives and saves,
# not the amount of training, are what this test checks), a checkpoint every epoch: eight Orbax
# managers' background saves in flight together (periodic + best, per member) while the next
# epoch trains.
OVERRIDES = ("dataset=synthetic,model=resnet8,num_epochs=2,batch_size=32,checkpoint_every_epochs=1,"
             "train_subset=96,eval_batch_size=128,loss=[ce,flsd53]")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir):
    config = REPO / "experiments" / "configs" / "cifar10.py"
    return ["timeout", "-k", "10", "300", sys.executable, "-m", "calib_jax.train",
            f"--config={config}:{OVERRIDES}", f"--workdir={workdir}"]


def clean_env(*xla_flags, **extra):
    # The session's compilation cache with its settings (conftest: every program kept, not
    # only those compiled in over a second) and XLA flags are kept: the rerun loads the
    # programs the first pair compiled, and all five processes generate their code alike.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_"))
           or k.startswith(("JAX_COMPILATION_CACHE_", "JAX_PERSISTENT_CACHE_"))}
    extra["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *xla_flags]).strip()
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def run_two_processes(workdir, expect_status=0):
    port = free_port()
    procs = [subprocess.Popen(
        command(workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=clean_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        for i in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == expect_status, out[-3000:]
    return outputs


def test_a_workdir_in_use_stops_every_process(tmp_path):
    """Process 0 finds the work directory locked by another training process: both processes
    stop with the refusal (the other one does not go on alone, to hang in a collective)."""
    from calib_jax import files
    with files.hold_directory_lock(tmp_path / "multi", "training"):
        outputs = run_two_processes(tmp_path / "multi", expect_status=1)
    assert f"DirectoryInUseError: {tmp_path / 'multi'} is in use by another process (pid " \
        f"{os.getpid()}" in outputs[0], outputs[0][-3000:]
    assert "DirectoryInUseError: process 0 found" in outputs[1], outputs[1][-3000:]
    assert not (tmp_path / "multi" / "ce").exists()


def test_two_processes_equal_one_process(tmp_path):
    """Also: rerun with one member's final checkpoint damaged and the other's best checkpoint,
    the two processes resume from epoch 1 and replace the first together (process 0 moves the
    damaged files aside, both wait for that before saving) and rewrite the second from its
    epoch's periodic checkpoint together (RunCheckpoints.mend_best), ending where one
    process does."""
    run_two_processes(tmp_path / "multi")
    damage(tmp_path / "multi" / "ce" / "checkpoints" / "2")
    (best_epoch,) = checkpoints.saved_epochs(tmp_path / "multi" / "flsd53", "best")
    damage(tmp_path / "multi" / "flsd53" / "best" / str(best_epoch))
    outputs = run_two_processes(tmp_path / "multi")
    assert "moved to" in outputs[0] and "resumed from" in outputs[0], outputs[0][-3000:]
    assert [p.name for p in (tmp_path / "multi" / "ce" / "unreadable").iterdir()] == \
        ["checkpoints-2"]
    assert [p.name for p in (tmp_path / "multi" / "flsd53" / "unreadable").iterdir()] == \
        [f"best-{best_epoch}"]
    assert f"replaced by a copy of {tmp_path / 'multi' / 'flsd53' / 'checkpoints'}/" \
        f"{best_epoch}" in outputs[0], outputs[0][-3000:]
    single = subprocess.run(command(tmp_path / "single"), cwd=REPO, capture_output=True,
                            text=True,
                            env=clean_env("--xla_force_host_platform_device_count=2"))
    assert single.returncode == 0, single.stderr[-3000:]
    config = experiment_configs.load("cifar10", OVERRIDES)
    template = train.state_for_config(config, 4, (32, 32, 3))
    for member in ("ce", "flsd53"):
        # Only process 0 writes the log (the rerun recomputed epoch 2's line).
        assert len((tmp_path / "multi" / member / "log.jsonl").read_text().splitlines()) == 2
        multi, meta = checkpoints.RunCheckpoints(tmp_path / "multi" / member).restore(template)
        assert meta["epoch"] == 2
        one, _ = checkpoints.RunCheckpoints(tmp_path / "single" / member).restore(template)
        assert checkpoints.tree_equal(jax.device_get(multi.params), jax.device_get(one.params))
        assert checkpoints.tree_equal(jax.device_get(multi.batch_stats),
                                      jax.device_get(one.batch_stats))
        (multi, multi_meta), (one, one_meta) = [
            checkpoints.RunCheckpoints(tmp_path / run / member).restore(template, "best")
            for run in ("multi", "single")]
        assert multi_meta == one_meta
        assert checkpoints.tree_equal(jax.device_get(multi.params), jax.device_get(one.params))
