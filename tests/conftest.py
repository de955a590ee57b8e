"""Shared test set-up: CPU only, XLA flags and a compilation cache for the session, a quick
deterministic hypothesis profile, the trained session fixtures."""

import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: XLA's CPU code generation at LLVM optimisation level 0, for this process and (inherited
#: through XLA_FLAGS, which the tests that set flags of their own extend, not replace) every
#: process a test starts: the suite's time is mostly compiling tiny programs once, not
#: running them (a training process of the multi-process test: 25.6 s -> 18.7 s, 33.5 ->
#: 22.8 s of CPU, measured). It changes how the CPU code is generated, not the HLO, its
#: fusions or the device layout the tests check; the comparisons of two runs (processes vs
#: one process, killed vs uninterrupted) hold because both sides use it.
#: CALIB_JAX_TEST_XLA_OPT0=0 tests under XLA's default optimisation instead.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0"
                  if os.environ.get("CALIB_JAX_TEST_XLA_OPT0", "1") != "0" else "")

if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# One persistent XLA compilation cache for the session. The processes the tests start
# (training CLIs, the multi-process group, the demo, the sweep, the benchmarks' parts) compile
# the same tiny programs as each other, ~60 of them, ~15 s of a ~25 s process on CI's two
# cores: they keep every program (threshold 0 s). The pytest processes keep only the programs
# that took over jax's default 1 s to compile (the train steps and other large ones), which
# are then compiled once for the suite instead of once per xdist worker and again after each
# fresh `jax.jit` of the same function or `jax.clear_caches`. Measured, three pairs of
# `make test` runs on a 2-core CPU whose speed changed over the day, without it for the
# workers -> with it: 629 -> 585 s, 712 -> 631 s, 780 -> 743 s (CPU time 1,215 -> 1,133 s,
# 1,374 -> 1,212 s, 1,491 -> 1,441 s); keeping all of the workers' thousands of small
# programs instead made the suite slower (832 s -> 1,231 s). The first process of the
# session makes the cache before its jax import (it, the xdist workers and the processes the
# tests start read the variables) and removes it at the end; a cache the caller set is used
# and kept. The size limit turns on jax's file lock around each entry's read and write (the
# `filelock` test extra): without it one process could read an entry another is still
# writing; where it is not installed nothing is cached (only slower). A program loaded from
# the cache still counts as compiled for compile_counter. Tests that must compile afresh
# (init_bench's timings) remove the variable from their processes' environment.
_OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and importlib.util.find_spec("filelock"):
    _OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="calib_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILATION_CACHE
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Four CPU devices for the multi-device tests (set before the backend starts).
jax.config.update("jax_num_cpu_devices", 4)
# The pytest processes keep only the programs that took over 1 s to compile (see above).
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


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
    for _module in ("sklearn.metrics", "tensorflow_datasets", "nbclient", "nbformat", "ipykernel",
                    "filelock"):
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


def pytest_unconfigure(config):
    if _OWN_COMPILATION_CACHE is not None:
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)
