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

if os.environ.get("CALIB_JAX_REQUIRE_TEST_EXTRAS"):
    # Set by `make test` (what CI runs), which installs the test extras: there, an extra that
    # does not import (e.g. a release built for another numpy) must fail the run instead of
    # quietly skipping the tests that compare against it (pytest.importorskip).
    import importlib

    for _module in ("sklearn.metrics", "tensorflow_datasets", "nbclient", "nbformat", "ipykernel"):
        try:
            importlib.import_module(_module)
        except Exception as _error:
            raise ImportError(
                f"test extra {_module!r} does not import ({type(_error).__name__}: {_error}); "
                f"reinstall the extras: pip install -e '.[test]' (CALIB_JAX_REQUIRE_TEST_EXTRAS "
                f"is set, as `make test` does)") from _error


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(root, compiles)``: a results root with one tiny trained run at cifar10/resnet50/ce
    (the layout of experiments/sweep.py; ``experiment_configs.TINY_RUN``, two epochs), and
    the XLA compilations its training took before its first epoch and in each epoch
    (``compile_counter.compiles_per_epoch``)."""
    import compile_counter
    import experiment_configs
    from calib_jax import train
    config = experiment_configs.load("cifar10", experiment_configs.TINY_RUN)
    root = tmp_path_factory.mktemp("results")
    # A test before this one in the same process may have compiled some of the run's calls:
    # start from empty caches, so that the first epoch compiles all of them.
    jax.clear_caches()
    with compile_counter.compiles_per_epoch() as compiles:
        train.train_and_evaluate(config, root / "cifar10" / "resnet50" / "ce")
    return root, compiles


@pytest.fixture(scope="session")
def evaluated_runs(tiny_run):
    """The tiny run's results root, the run evaluated (final checkpoint), shared by the
    evaluation and notebook tests."""
    from calib_jax import evaluate
    root, _ = tiny_run
    evaluate.evaluate_run(root / "cifar10" / "resnet50" / "ce", which="final")
    return root
