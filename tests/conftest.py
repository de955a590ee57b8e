"""Shared test set-up: CPU only, quick deterministic hypothesis profile."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Four CPU devices for the multi-device tests (set before the backend starts).
jax.config.update("jax_num_cpu_devices", 4)

settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def evaluated_runs(tmp_path_factory):
    """A results root with one tiny trained + evaluated run at cifar10/resnet50/ce (the
    layout of experiments/sweep.py), shared by the evaluation and notebook tests."""
    import experiment_configs
    from calib_jax import evaluate, train
    config = experiment_configs.load("cifar10", experiment_configs.TINY_RUN)
    root = tmp_path_factory.mktemp("results")
    workdir = root / "cifar10" / "resnet50" / "ce"
    train.train_and_evaluate(config, workdir)
    evaluate.evaluate_run(workdir, which="final")
    return root
