"""README.md: its Python examples run as written (a user copies them; an API change that
breaks one must fail here, not in the user's hands)."""

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 7
    assert any("losses.adaptive_focal_loss" in b for b in blocks)
    assert any("calibration.temperature_grid_search" in b for b in blocks)


def test_readme_python_examples_run_in_order(monkeypatch):
    """The blocks run one after another in one namespace, as a reader pastes them; the
    names they take as given (a validation split's logits, images, ...) are small arrays."""
    if not (SHARED / "cifar10").is_dir() and not os.environ.get("CALIB_JAX_DATA_DIR"):
        pytest.skip(f"the data example needs CIFAR-10 (no copy at {SHARED})")
    rng = np.random.default_rng(0)
    # Validation logits of a model better than chance (its labels' logits raised), as the
    # examples assume: random ones have no finite NLL-optimal T (fit_temperature warns).
    val_labels = rng.integers(0, 10, 200)
    val_logits = rng.normal(size=(200, 10)) * 3
    val_logits[np.arange(200), val_labels] += 3.0
    namespace = {
        "val_logits": jnp.asarray(val_logits, jnp.float32),
        "val_labels": jnp.asarray(val_labels),
        "test_logits": jnp.asarray(rng.normal(size=(100, 10)) * 3, jnp.float32),
        "test_labels": jnp.asarray(rng.integers(0, 10, 100)),
        "in_logits": jnp.asarray(rng.normal(size=(50, 10)) * 4, jnp.float32),
        "out_logits": jnp.asarray(rng.normal(size=(40, 10)), jnp.float32),
        "images": jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
    }
    if (SHARED / "cifar10").is_dir():
        monkeypatch.setenv("CALIB_JAX_DATA_DIR", str(SHARED))
    for number, block in enumerate(python_blocks()):
        # The model example's calls with the small ResNet-8: ResNet-50's compiles take ~6 s
        # more of this suite's CPU and test nothing more of the API.
        block = block.replace('models.get("resnet50"', 'models.get("resnet8"')
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {number} fails:\n{block}") from error
    # A few of the values the comments promise.
    assert namespace["grads"].shape == (2, 3) and bool(jnp.isfinite(namespace["grads"]).all())
    assert namespace["gamma"] == 3.0  # FLSc-531 at epoch 120
    assert 0.1 <= float(namespace["search"].temperature) <= 10.0
    assert 0.1 <= float(namespace["fit"].temperature) <= 10.0
    assert namespace["logits"].shape == (2, 10)  # the model block's logits replace the toy ones
    assert len(namespace["train"].labels) == 45000 and len(namespace["val"].labels) == 5000
    assert isinstance(namespace["err"], jax.experimental.checkify.Error)
    assert namespace["result"].low <= namespace["result"].high
    assert namespace["gap"].samples.shape == (1000,)
    detection = namespace["detection"]
    assert detection.low <= detection.value <= detection.high and detection.std > 0
