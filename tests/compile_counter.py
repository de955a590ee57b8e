"""Counts XLA compilations per training epoch, for the tests that guard against recompiling.

A training loop that compiles again in every epoch still trains correctly, so only a count
shows it; on a GPU each compile of the ResNet-50 loop costs 15-40 s (benchmarks/NOTES.md),
over 350 epochs hours.
"""

import contextlib

import jax
import pytest

from calib_jax.data import pipeline

#: What jax records once per XLA compilation (jax/_src/dispatch.py, jax 0.10 - 0.12), also
#: when the program is loaded from a persistent compilation cache (the test session keeps one,
#: conftest.py): a loop that asks for its program again each epoch is the same bug whether
#: XLA compiles it or the cache loads it (test_train.py checks that both are counted).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
#: What jax records besides when the program came from the persistent cache.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def compiles_per_epoch():
    """Within the block, counts XLA compilations, split where each training epoch starts.

    Yields a list that is filled when the block ends: its first entry counts the
    compilations before the first epoch (building the state, the data on the device), entry
    ``i`` those of the ``i``-th epoch started in the block (an epoch starts when the loop asks
    ``pipeline.epoch_order`` for its order), until the next one starts or the block ends.
    """
    events, starts, counts = [], {}, []

    def listener(name, *args, **kwargs):
        if name == COMPILE_EVENT:
            events.append(name)

    def epoch_order(seed, epoch, num_examples):
        starts.setdefault(int(epoch), len(events))  # several seeds ask once each
        return original(seed, epoch, num_examples)

    original = pipeline.epoch_order
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline, "epoch_order", epoch_order)
            yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    bounds = [0, *starts.values(), len(events)]
    counts.extend(b - a for a, b in zip(bounds, bounds[1:]))
