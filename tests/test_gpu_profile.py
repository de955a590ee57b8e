"""benchmarks/gpu_profile.py: the pieces its GPU comparisons rest on (its timings need a
GPU: benchmarks/NOTES.md), checked on CPU."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
gpu_profile = pytest.importorskip("gpu_profile")

from calib_jax.models import layers  # noqa: E402


@pytest.mark.parametrize("shape", [(4, 9, 9, 8), (4, 3, 3, 8), (50, 8)])
def test_channel_sums_by_image_equal_the_library_sums(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    terms = (x, jnp.square(x), x * 0.5 - 1)
    got = jax.jit(gpu_profile._channel_sums_by_image)(*terms)
    want = layers._channel_sums(*terms)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == (shape[-1],)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_closed_form_saving_y_has_the_library_gradient():
    # The "before" BatchNorm of the mask_from_y / before_bytes variants (every ReLU mask read
    # from y) must differentiate as the library's (masks recomputed or saved as bits).
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (8, 4, 4, 16))
    residual = jax.random.normal(k[1], x.shape)
    w = jax.random.normal(k[2], x.shape)
    scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.2, 0.2, 16)
    saving_y = gpu_profile._closed_form_saving_y(layers)
    for r in (None, residual):
        def objective(fn, x, s, b):
            return jnp.sum(fn(x, s, b, r, 1e-5, jnp.float32, True)[0] * w)
        got = jax.grad(objective, argnums=(1, 2, 3))(saving_y, x, scale, bias)
        want = jax.grad(objective, argnums=(1, 2, 3))(layers._batch_norm_closed_form, x, scale,
                                                      bias)
        for g, v in zip(got, want):
            np.testing.assert_allclose(g, v, rtol=1e-6, atol=1e-6)


def test_xla_flags_spell_a_variants_options():
    assert gpu_profile.xla_flags("default") == ""
    assert gpu_profile.xla_flags("no_excess_precision") == "--xla_allow_excess_precision=false"
    flags = gpu_profile.xla_flags("graph_conv_concurrent")
    assert "--xla_gpu_enable_command_buffer=" in flags and ",CONVOLUTION" in flags
    assert "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT" in flags
