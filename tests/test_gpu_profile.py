"""benchmarks/gpu_profile.py: the pieces its GPU comparisons rest on (its timings need a
GPU: benchmarks/NOTES.md), checked on CPU."""

import collections
import json
import os
import re
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
gpu_profile = pytest.importorskip("gpu_profile")
import init_bench  # noqa: E402  (gpu_profile's siblings, on the path above)
import train_throughput  # noqa: E402

from calib_jax.models import layers  # noqa: E402


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
    assert gpu_profile.xla_flags("default", "cpu") == ""
    assert gpu_profile.xla_flags("no_excess_precision", "cpu") == \
        "--xla_allow_excess_precision=false"
    assert gpu_profile.xla_flags("default") == (
        "--xla_gpu_enable_command_buffer=" + train_throughput.train.GPU_GRAPH_CONVOLUTIONS[
            "xla_gpu_enable_command_buffer"])
    flags = gpu_profile.xla_flags("graph_conv_concurrent")
    assert "--xla_gpu_enable_command_buffer=" in flags and ",CONVOLUTION" in flags
    assert "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT" in flags


def test_variants_start_from_the_training_loops_gpu_defaults():
    """Each variant is the loop's GPU compile (its options, its flat parameters) with one
    thing changed; before_lean takes all three GPU defaults away."""
    from calib_jax import train
    assert gpu_profile.variant_options("default", "gpu") == train.GPU_GRAPH_CONVOLUTIONS
    assert gpu_profile.variant_options("default", "cpu") == {}
    for name in ("no_graph_conv", "before_lean"):
        kinds = gpu_profile.variant_options(name, "gpu")["xla_gpu_enable_command_buffer"]
        assert "CUDNN" in kinds and "CONVOLUTION" not in kinds
    concurrent = gpu_profile.variant_options("graph_conv_concurrent", "gpu")
    assert ",CONVOLUTION" in concurrent["xla_gpu_enable_command_buffer"]
    assert concurrent["xla_gpu_command_buffer_scheduling_mode"] == "CONCURRENT"
    assert gpu_profile._TREE_PARAMS == ("tree_params", "before_lean")
    assert gpu_profile._CODE_OF["before_lean"] == "separate_sums"


def test_separate_sums_variant_lowers_no_per_image_stage_for_cuda():
    """The before of the per-image sums, checked where it matters (a CUDA lowering, here
    without a GPU): the library's stage is there, the variant's is not."""
    from calib_jax import train
    from calib_jax.models import layers
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 9, 9, 4))

    def cuda_text():
        return jax.jit(lambda t: layers._channel_sums(t, t * t)).trace(x).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "tensor<8x4xf32>" in cuda_text()
    with gpu_profile.variant_code("separate_sums", None) as (steps, _):
        assert "tensor<8x4xf32>" not in cuda_text()
        assert steps is not train.train_steps  # a fresh jit: its own trace
    assert "tensor<8x4xf32>" in cuda_text()


def _gpu_check_script() -> str:
    return open(os.path.join(os.path.dirname(gpu_profile.__file__), "gpu_check.sh")).read()


def test_gpu_check_script_names_only_known_variants_models_and_losses():
    """A misspelt name in gpu_check.sh would cost a GPU session's scarce minutes (the
    script runs only on the lent machine): every variant, model and loss it passes must
    exist."""
    from calib_jax import models, train
    script = _gpu_check_script()
    variants = [v for m in re.findall(r"--(?:trace-)?variants (\S+)", script)
                for v in m.split(",")] + re.findall(r'xla_flags\("(\w+)"\)', script)
    assert {"default", "before_lean", "separate_sums", "tree_params", "no_graph_conv"} <= \
        set(variants)
    assert set(variants) <= set(gpu_profile.VARIANTS), set(variants) - set(gpu_profile.VARIANTS)
    names = [n for m in re.findall(r"--models (\S+)", script) for n in m.split(",")]
    assert {"resnet50", "resnet110", "wide_resnet_26_10", "densenet121"} == set(names)
    assert set(names) <= set(models.names())
    used = {n for m in re.findall(r"--(?:losses|multi) (\S+)", script) for n in m.split(",")}
    assert {"ce", "flsd53", "mmce_weighted"} <= used
    assert used <= set(train.LOSS_NAMES), used - set(train.LOSS_NAMES)


def _gpu_check_command_lines():
    """``(script, argv)`` of every Python command in gpu_check.sh, ``$OUT`` spelled out."""
    joined = _gpu_check_script().replace("\\\n", " ")
    found = re.findall(r'"\$PYTHON" benchmarks/(\w+)\.py ([^\n|]*?)\s*(?:2>&1|\n|$)', joined)
    return [(name, shlex.split(args.replace("$OUT", "/tmp/out"))) for name, args in found]


def test_gpu_check_command_lines_parse():
    """Every flag gpu_check.sh passes exists, with valid values: a usage error would
    only show on the lent machine."""
    lines = _gpu_check_command_lines()
    assert sorted(collections.Counter(name for name, _ in lines).items()) == \
        [("gpu_profile", 2), ("init_bench", 1), ("train_throughput", 2)]
    parsers = {"gpu_profile": gpu_profile.parse_args, "train_throughput": train_throughput.parse_args,
               "init_bench": init_bench.parse_args}
    for name, argv in lines:
        args = parsers[name](argv)  # exits (SystemExit 2) on an unknown flag or a bad value
        assert args.out.startswith("/tmp/out") if name == "gpu_profile" else \
            args.json.startswith("/tmp/out")


def test_profile_part_runs_and_a_failed_variant_sets_the_exit_status(tmp_path, monkeypatch,
                                                                    capsys, recwarn):
    """gpu_check.sh profile's flow at ResNet-8 size on CPU, with a variant that fails to
    compile between two that run: the default and its trace, the failure recorded, the next
    variant, the interleaved rounds of the two that ran, the next one's trace; exit status 1.
    Under Python 3.12 the trace's summary prints no DeprecationWarning for jaxlib's
    ``event_stats`` type (``_graph_id`` silences it; recorded here, not raised: an exception
    inside jaxlib's attribute read aborts the process)."""
    monkeypatch.setattr(gpu_profile, "NUM_TRAIN", 512)
    monkeypatch.setattr(train_throughput, "NUM_TRAIN", 512)
    real = gpu_profile.lower_variant

    def lower(name, *args, **kwargs):
        if name == "before_bytes":
            raise RuntimeError("XLA rejected an option")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(gpu_profile, "lower_variant", lower)
    out = tmp_path / "profile"
    # One step per call: on CPU the default variant's rolled loop would run its convolutions
    # through XLA:CPU's slow in-loop path (jax-ml/jax#12868), ten times slower again at the
    # test session's XLA level 0 (this test took 59 s with two steps per call, 16 s with one).
    status = gpu_profile.main([
        "--model", "resnet8", "--batch", "8", "--steps-per-call", "1", "--calls", "1",
        "--rounds", "1", "--plane-prefix", "/host:CPU", "--out", str(out),
        "--variants", "default,before_bytes,before_lean", "--trace-variants", "before_lean"])
    printed = capsys.readouterr().out
    assert status == 1, printed[-2000:]
    assert "failed: variant before_bytes" in printed
    report = json.loads((out / "gpu_profile.json").read_text())
    default, failed, candidate = report["variants"]
    assert failed == {"variant": "before_bytes", "options": {},
                      "error": "RuntimeError: XLA rejected an option"}
    for row in (default, candidate):
        assert "error" not in row and row["img_per_s"] > 0
        assert len(row["interleaved_img_per_s"]) == 1
    assert candidate["variant"] == "before_lean"
    assert "profile" in report and "before_lean" in report["profiles"]
    assert (out / "trace.xplane.pb.gz").exists()
    assert (out / "trace_before_lean.xplane.pb.gz").exists()
    assert not [w for w in recwarn if "has no __module__" in str(w.message)]


@pytest.mark.parametrize("argv,why", [
    (["--rounds", "-1"], "--rounds must be >= 0"),
    (["--variants", "default,lena"], "--variants: unknown ['lena']"),
    (["--variants", "default,before_lean", "--trace-variants", "tree_params"],
     "--trace-variants"),
    (["--model", "resnet5"], "--model: unknown resnet5"),
    (["--loss", "flsd35"], "--loss: unknown flsd35"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--calls", "0"], "--calls must be >= 1"),
])
def test_bad_arguments_are_usage_errors(argv, why, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_profile.parse_args(argv)
    assert exit_info.value.code == 2 and why in capsys.readouterr().err
