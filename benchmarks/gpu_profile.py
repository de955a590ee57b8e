"""Where the training loop's compiled call spends device time, and what XLA options change.

For one configuration (default: ResNet-50, batch 128, bfloat16, CE, 39 steps per call,
i.e. the headline row of ``train_throughput.py``):

1. ``--variants``: compiles ``train.train_steps`` once per variant -- XLA compiler options
   passed to that one compilation (``Lowered.compile(compiler_options=...)``: no process
   restart, so the convolution autotuning of the first compile is reused), or a code option
   (``unroll1`` / ``unroll2``: the scan's unroll, where ``default`` takes the training loop's
   own, ``train.default_unroll``; earlier code swapped in while lowering,
   :func:`variant_code`: ``autodiff_bn``, ``unfused_relu``, ``per_leaf_norm``, ...; or the
   training loop's GPU defaults taken away: ``separate_sums``, ``tree_params``,
   ``no_graph_conv``, all three: ``before_lean``) -- and prints its images/s, compile
   time, and how far its first call's losses are from the default variant's (same state,
   same batches). Every variant starts from what the training loop compiles
   (``train.loop_functions``: the XLA options of ``train.loop_compiler_options``, the flat
   parameter vector of ``train.default_flat_params``) and changes one thing;
2. (unless ``--no-profile``) traces one call of the default variant with ``jax.profiler`` and prints
   where the device time goes (device busy share of the traced window; top kernels; kernels
   by kind: convolutions, matrix products, XLA's own fusions, copies; XLA ops), per step.
   The trace (gzipped ``.xplane.pb``) and the optimised HLO are written beside the JSON
   for offline reading (``jax.profiler.ProfileData.from_serialized_xspace``);
3. ``--rounds``: times the compiled variants again, one call each per round, in turn, and
   prints each one's median against the default's (the comparison that the machine's drift
   does not bias);
4. (unless ``--no-profile``) traces ``--trace-variants`` too (default: ``before_lean`` where
   it runs), last: ``trace_<name>.xplane.pb.gz``, ``gpu_profile_<name>.txt``.

On an H200 with jax 0.11.2 XLA kept its command buffers (CUDA graphs) while tracing: the
kernels carry graph ids, so the trace shows the real execution, with the gaps where a graph
ends (the traced call ran ~9% slower than untraced ones).
By default XLA records cuDNN's convolution calls outside its graphs (each one splits the
step's graph: ~70 graphs and ~290 single launches per step at batch 128, ``hlo_static.py
--launches``); the training loop records them too on GPU (``train.GPU_GRAPH_CONVOLUTIONS``:
half a graph per step, one per loop trip of two steps; ``no_graph_conv`` takes that away),
``graph_conv_while`` makes the whole call one graph, ``graph_conv_concurrent`` lets the
graph run independent kernels side by side (XLA's default keeps the schedule's order:
``xla_gpu_command_buffer_scheduling_mode=LHS``; on an H200 with jax 0.11.2 it failed at the
first call, ``<unknown cudnn status: 5003>``, benchmarks/NOTES.md).

Usage (GPU): python benchmarks/gpu_profile.py --out gpu_results
Usage (CPU smoke): python benchmarks/gpu_profile.py --model resnet8 --batch 16 \
    --steps-per-call 2 --variants default,unroll2 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
import warnings
from unittest.mock import patch

import jax
import numpy as np

from calib_jax import models, train
from calib_jax.models import layers
from calib_jax.files import atomic_write_bytes, atomic_write_text

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling script
from train_throughput import (DTYPES, IMAGE_MODELS, MEAN, NUM_TRAIN, STD,  # noqa: E402
                              _agreement_text, loss_agreement, model_and_optimizer, optimizer,
                              require_at_least_one, synthetic_train_data)

# The training loop's GPU option (train.GPU_GRAPH_CONVOLUTIONS): XLA's default command-buffer
# kinds (read from the DebugOptions that jaxlib 0.11.2 dumps) and CONVOLUTION.
_GRAPH_CONV = dict(train.GPU_GRAPH_CONVOLUTIONS)
_DEFAULT_GRAPH_KINDS = _GRAPH_CONV["xla_gpu_enable_command_buffer"].removesuffix(",CONVOLUTION")
# Earlier code put back for a before/after (variant_code): no XLA options of their own.
CODE_VARIANTS = ("autodiff_bn", "unfused_relu", "per_leaf_norm", "convert_residual", "mask_from_y",
                 "before_bytes", "separate_sums", "tree_params")
# name -> (XLA compiler options over the training loop's own, the scan's unroll: None = the
# training loop's default for the platform compiled for, train.default_unroll).
VARIANTS = {
    "default": ({}, None),
    # Convolutions launched outside the graphs again (XLA's default kinds).
    "no_graph_conv": ({"xla_gpu_enable_command_buffer": _DEFAULT_GRAPH_KINDS}, None),
    # The loop's code and options before the third GPU session (f1febd2): separate sums,
    # the parameters' tree, convolutions outside the graphs.
    "before_lean": ({"xla_gpu_enable_command_buffer": _DEFAULT_GRAPH_KINDS}, None),
    "graph_while": ({"xla_gpu_enable_command_buffer": _DEFAULT_GRAPH_KINDS + ",WHILE"}, None),
    "graph_while_unrolled": ({"xla_gpu_enable_command_buffer": _DEFAULT_GRAPH_KINDS + ",WHILE",
                              "xla_gpu_command_buffer_unroll_loops": True}, None),
    # With WHILE the whole scan as one graph.
    "graph_conv_while": ({"xla_gpu_enable_command_buffer":
                          _DEFAULT_GRAPH_KINDS + ",CONVOLUTION,WHILE"}, None),
    # ... and the graph's nodes ordered by their data dependencies only (XLA's default, LHS,
    # keeps the schedule's order), so independent kernels may run at once: a step's weight
    # and input gradients, the members of a sequential group.
    "graph_conv_concurrent": ({**_GRAPH_CONV,
                               "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}, None),
    "graph_min1": ({"xla_gpu_graph_min_graph_size": 1}, None),
    "no_graph": ({"xla_gpu_enable_command_buffer": ""}, None),
    "conv_fusion": ({"xla_gpu_experimental_enable_conv_fusion": True}, None),
    # XLA keeps every bfloat16 rounding the program writes (its default lets it compute some
    # in float32 instead): what layers._upcast_exactly does for the shortcut alone.
    "no_excess_precision": ({"xla_allow_excess_precision": False}, None),
    "unroll1": ({}, 1),
    "unroll2": ({}, 2),
    **{name: ({}, None) for name in CODE_VARIANTS},
}
# Variants with XLA options and a code variant's code.
_CODE_OF = {"before_lean": "separate_sums"}
# Variants whose loop runs over the parameters' tree (else the loop's default layout).
_TREE_PARAMS = ("tree_params", "before_lean")


# Kernel kinds by name (cuDNN / CUTLASS / cuBLAS kernel names, XLA's fusion names).
KINDS = (
    ("convolution (cuDNN)", r"conv|fprop|dgrad|wgrad|cudnn|implicit|winograd|xmma_(?!gemm)"),
    ("matrix product (cuBLAS/Triton)", r"gemm|nvjet|cublas|triton_gemm|matmul|dot"),
    ("reduction fusion", r"reduce|reduction"),
    ("copy / transpose", r"copy|transpose|memcpy|memset"),
    ("other fusion", r"fusion|loop_|input_|wrapped_|kernel"),
)


def _fresh_train_steps():
    """A new jit of ``train.train_steps``' function: JAX's trace cache is keyed by the
    function, so a variant that swaps library code while it is lowered gets its own trace.
    Named as the library's (the compiled module is ``jit_train_steps``, which
    ``hlo_static.py --launches`` looks for in XLA's dump)."""
    def train_steps(*args, **kwargs):
        return train.train_steps.__wrapped__(*args, **kwargs)
    return jax.jit(train_steps, static_argnames=train._TRAIN_STEPS_STATIC,
                   donate_argnums=(0,))


@contextlib.contextmanager
def variant_code(name, tx):
    """Yields ``(train_steps function, optimiser)`` for variant ``name``: the library's own
    for XLA-option variants, or the code of an earlier version swapped in while the caller
    lowers (a before/after in one process):

    * ``autodiff_bn``: BatchNorm's (and its fused ReLU's) gradient by autodiff of the
      forward formula (before the closed form);
    * ``unfused_relu``: BatchNorm, then the shortcut add and ReLU as separate layers in the
      model's dtype (before ``BatchNorm(relu=True)`` took them);
    * ``per_leaf_norm``: optax's ``clip_by_global_norm`` (one norm reduction per leaf;
      before ``train.clip_by_global_norm``);
    * ``convert_residual``: BatchNorm widens a bfloat16 shortcut with a plain conversion,
      which XLA folds into the float32 value before its rounding (before
      ``layers._upcast_exactly``);
    * ``mask_from_y``: BatchNorm's backward pass reads every fused ReLU's mask from the
      saved output ``y`` (before it recomputed the mask from ``x`` where no shortcut was
      added, and saved it as bits where one was);
    * ``before_bytes``: both of the last two (the code before they cut the bytes);
    * ``separate_sums``: BatchNorm's per-channel sums as one reduction per term on every
      platform (``layers._separate_sums``; the library sums per image first on CUDA);
    * ``tree_params``: no code of its own: :func:`lower_variant` lowers it over the
      parameters' tree (``flat_params=False``);
    * ``before_lean``: ``separate_sums`` and ``tree_params``, with ``no_graph_conv``'s
      options (the library before the third GPU session)."""
    name = _CODE_OF.get(name, name)
    if name == "autodiff_bn":
        def autodiff(x, scale, bias, epsilon, axis_name, dtype, *, residual=None, relu=False):
            return layers._batch_norm_forward(x, scale, bias, residual, epsilon, axis_name, dtype,
                                              relu)[:3]
        with patch.object(layers, "batch_norm_train", autodiff):
            yield _fresh_train_steps(), tx
    elif name == "unfused_relu":
        fused = layers.batch_norm_train

        def unfused(x, scale, bias, epsilon, axis_name, dtype, *, residual=None, relu=False):
            y, mean, var = fused(x, scale, bias, epsilon, axis_name, dtype)
            y = y if residual is None else y + residual
            return (jax.nn.relu(y) if relu else y), mean, var
        with patch.object(layers, "batch_norm_train", unfused):
            yield _fresh_train_steps(), tx
    elif name == "per_leaf_norm":
        import optax
        with patch.object(train, "clip_by_global_norm", optax.clip_by_global_norm):
            per_leaf_tx = optimizer()
        yield train.train_steps, per_leaf_tx
    elif name == "separate_sums":
        with patch.object(layers, "_channel_sums", layers._separate_sums):
            yield _fresh_train_steps(), tx
    elif name in ("convert_residual", "mask_from_y", "before_bytes"):
        with contextlib.ExitStack() as stack:
            if name != "mask_from_y":
                stack.enter_context(patch.object(layers, "_upcast_exactly",
                                                 lambda x, dtype: x.astype(dtype)))
            if name != "convert_residual":
                stack.enter_context(patch.object(layers, "_batch_norm_closed_form",
                                                 _closed_form_saving_y(layers)))
            yield _fresh_train_steps(), tx
    else:
        yield train.train_steps, tx


def _closed_form_saving_y(layers):
    """``layers._batch_norm_closed_form`` as it was before the ReLU's mask was recomputed
    from ``x`` or saved as bits: the forward rule saves the output ``y`` for every fused
    ReLU (the backward rule reads a float mask as ``y > 0``)."""
    def forward(x, scale, bias, residual, epsilon, dtype, relu):
        outputs, saved = layers._batch_norm_closed_form_fwd(x, scale, bias, residual, epsilon,
                                                            dtype, relu)
        return outputs, saved[:5] + ((outputs[0] if relu else None),) + saved[6:]
    closed_form = jax.custom_vjp(layers._batch_norm_closed_form.fun, nondiff_argnums=(4, 5, 6))
    closed_form.defvjp(forward, layers._batch_norm_closed_form_bwd)
    return closed_form


def variant_options(name: str, platform: str) -> dict:
    """The XLA options variant ``name`` compiles with for ``platform``: the training loop's
    (``train.loop_compiler_options``), updated with the variant's own."""
    return {**train.loop_compiler_options(platform), **VARIANTS[name][0]}


def xla_flags(name: str, platform: str = "gpu") -> str:
    """Variant ``name``'s XLA options (:func:`variant_options`) as ``XLA_FLAGS`` for a whole
    process."""
    options = variant_options(name, platform)
    return " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in options.items())


def variant_unroll(name, platform):
    """The scan unroll variant ``name`` compiles with for ``platform``."""
    unroll = VARIANTS[name][1]
    return train.default_unroll(platform) if unroll is None else unroll


def lower_variant(name, state_fn, data, *, num_steps, loss, batch, dtype, tx, platform):
    """``(Lowered, compiler options, optimiser)`` of ``train_steps`` for variant ``name``
    compiled for ``platform`` ("gpu", "cpu": it picks the default unroll); ``state_fn(tx)``
    makes the state (concrete, or abstract for a compile without a GPU)."""
    options = variant_options(name, platform)
    unroll = variant_unroll(name, platform)
    flat_params = name not in _TREE_PARAMS and train.default_flat_params(platform)
    x_dev, y_dev, order = data
    with variant_code(name, tx) as (steps, variant_tx):
        lowered = steps.lower(state_fn(variant_tx), x_dev, y_dev, order, 0, 0, 0,
                              num_steps=num_steps, loss_name=loss, batch_size=batch, mean=MEAN,
                              std=STD, dtype=DTYPES[dtype], unroll=unroll,
                              flat_params=flat_params)
    return lowered, options, variant_tx


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def _union_ns(intervals):
    """Total length of the union of ``(start, end)`` intervals."""
    total, current_start, current_end = 0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Kernel name -> the ``op_name`` metadata of its fusion in the optimised HLO (XLA
    names a fusion's kernel after the fusion, ``.`` written ``_``)."""
    return {m.group(1).replace(".", "_"): m.group(2) for m in re.finditer(
        r'\n\s*%?([\w.\-]+) = [^\n]*? fusion\([^\n]*?op_name="([^"]*)"', hlo_text)}


def kernel_part(op_name: str | None, kernel: str) -> str:
    """Which part of the training step a kernel belongs to, from its fusion's op_name:
    forward / backward (``transpose(...)``), BatchNorm / other, reduction / elementwise."""
    if not op_name:
        return "library (cuDNN convolutions, cuBLAS products, copies)"
    phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "step"
    layer = "BatchNorm" if "BatchNorm" in op_name else op_name.rsplit("/", 1)[-1][:30]
    work = "reduction" if "reduce" in kernel else "elementwise"
    return f"{phase} {layer} {work}"


def _graph_id(event):
    try:
        with warnings.catch_warnings():
            # jaxlib's event_stats type lacks __module__, which Python 3.12 reports (as a
            # DeprecationWarning) on the first read of an event's stats: not ours to fix.
            warnings.filterwarnings("ignore", "builtin type .* has no __module__",
                                    DeprecationWarning)
            return dict(event.stats).get("cuda_graph_id")
    except Exception:  # stats of another shape: no graph information
        return None


def summarize_xspace(data: bytes, steps: int, plane_prefix: str = "/device:GPU", top: int = 30,
                     hlo_text: str | None = None):
    """Device-time summary of a serialized XSpace: per line, per kernel, per kind, per part
    of the step (with ``hlo_text``), and the gaps inside and between CUDA graphs; times are
    per training step (``steps`` steps were traced)."""
    from jax.profiler import ProfileData
    profile = ProfileData.from_serialized_xspace(data)
    op_names = hlo_op_names(hlo_text) if hlo_text else {}
    out = {"planes": []}
    for plane in profile.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        lines = {}
        kernels = collections.defaultdict(lambda: [0, 0.0])
        kinds = collections.defaultdict(float)
        parts = collections.defaultdict(lambda: [0, 0.0])
        intervals = []
        for line in plane.lines:
            events = [(e.name, float(e.start_ns), float(e.duration_ns), _graph_id(e))
                      for e in line.events]
            if not events:
                continue
            lines[line.name] = {"events": len(events),
                                "ms_per_step": sum(e[2] for e in events) / 1e6 / steps}
            if not (line.name.startswith("Stream") or "stream" in line.name.lower()):
                continue
            for name, start, d, graph in events:
                kernels[name][0] += 1
                kernels[name][1] += d
                kinds[kernel_kind(name)] += d
                part = parts[kernel_part(op_names.get(name), name)] if op_names else None
                if part is not None:
                    part[0] += 1
                    part[1] += d
                intervals.append((start, start + d, graph))
        intervals.sort()
        busy = _union_ns([(a, b) for a, b, _ in intervals])
        window = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
        inside = between = switches = 0.0
        for (_, end, graph), (start, _, next_graph) in zip(intervals, intervals[1:]):
            gap = max(0.0, start - end)
            if graph is not None and graph == next_graph:
                inside += gap
            else:
                between += gap
                switches += graph != next_graph
        total_kernel = sum(v[1] for v in kernels.values()) or 1.0
        per_step = lambda ns: ns / 1e6 / steps  # noqa: E731
        out["planes"].append({
            "plane": plane.name, "lines": lines,
            "window_ms_per_step": per_step(window),
            "busy_ms_per_step": per_step(busy),
            "busy_share": busy / window if window else None,
            "kernels_per_step": sum(v[0] for v in kernels.values()) / steps,
            "kernels_outside_graphs_per_step": sum(g is None for *_, g in intervals) / steps,
            "gap_ms_per_step_inside_graphs": per_step(inside),
            "gap_ms_per_step_between_graphs_or_ungraphed": per_step(between),
            "graph_switches_per_step": switches / steps,
            "kinds_ms_per_step": {k: per_step(v) for k, v in
                                  sorted(kinds.items(), key=lambda kv: -kv[1])},
            "parts": [{"part": k, "kernels_per_step": c / steps, "ms_per_step": per_step(d)}
                      for k, (c, d) in sorted(parts.items(), key=lambda kv: -kv[1][1])[:top]],
            "top_kernels": [{"name": n[:160], "calls_per_step": c / steps,
                             "ms_per_step": per_step(d), "share": d / total_kernel}
                            for n, (c, d) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
        })
    return out


def format_summary(summary) -> str:
    rows = []
    for p in summary["planes"]:
        share = p["busy_share"]
        rows.append(f"{p['plane']}: window {p['window_ms_per_step']:.2f} ms/step, kernels busy "
                    f"{p['busy_ms_per_step']:.2f} ms/step "
                    f"({'-' if share is None else f'{share:.0%}'}), "
                    f"{p['kernels_per_step']:.0f} kernels/step "
                    f"({p['kernels_outside_graphs_per_step']:.0f} outside CUDA graphs)")
        rows.append(f"  gaps: {p['gap_ms_per_step_inside_graphs']:.2f} ms/step inside graphs, "
                    f"{p['gap_ms_per_step_between_graphs_or_ungraphed']:.2f} between graphs or "
                    f"ungraphed kernels; {p['graph_switches_per_step']:.0f} graph switches/step")
        rows.append("  lines: " + "; ".join(f"{n} {v['events']} ev {v['ms_per_step']:.2f} ms/step"
                                             for n, v in p["lines"].items()))
        rows.append("  by kind (ms/step): " + "; ".join(
            f"{k} {v:.2f}" for k, v in p["kinds_ms_per_step"].items()))
        if p["parts"]:
            rows.append("  by part of the step (ms/step, kernels/step):")
            rows += [f"    {q['ms_per_step']:.3f} {q['kernels_per_step']:.0f} {q['part']}"
                     for q in p["parts"]]
        rows.append("  top kernels (ms/step, calls/step, share):")
        rows += [f"    {k['ms_per_step']:.3f} {k['calls_per_step']:.0f} {k['share']:.1%} {k['name']}"
                 for k in p["top_kernels"]]
    return "\n".join(rows) if rows else "no device plane in the trace"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``; None: ``sys.argv``), checked: unknown variants, a negative
    ``--rounds`` and ``--trace-variants`` outside ``--variants`` are usage errors (exit 2).
    ``variants`` and ``trace_variants`` come back as lists of names."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--steps-per-call", type=int, default=39)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per variant")
    parser.add_argument("--rounds", type=int, default=5,
                        help="then this many rounds of one call per variant, in turn (0: none)")
    parser.add_argument("--variants", default="default,before_lean,separate_sums,tree_params,"
                        "no_graph_conv,graph_conv_while,unroll1,before_bytes,"
                        "autodiff_bn,unfused_relu,per_leaf_norm,conv_fusion,no_graph",
                        help=f"comma-separated, in order, from {sorted(VARIANTS)} (a name may "
                        "come twice)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--trace-variants", default=None,
                        help="comma-separated variants (of --variants) traced too, after the "
                        "rounds (the default's trace comes first, right after it runs); "
                        "by default before_lean where it is among --variants")
    parser.add_argument("--plane-prefix", default="/device:GPU",
                        help="trace planes to summarise ('/host:CPU' for a CPU smoke run)")
    parser.add_argument("--out", default="gpu_results")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if args.rounds < 0:
        parser.error(f"--rounds must be >= 0, got {args.rounds}")
    if args.model not in IMAGE_MODELS:
        parser.error(f"--model: unknown {args.model}; choose from {', '.join(IMAGE_MODELS)}")
    if args.loss not in train.LOSS_NAMES:
        parser.error(f"--loss: unknown {args.loss}; choose from {', '.join(train.LOSS_NAMES)}")
    require_at_least_one(parser, args, ("batch", "steps_per_call", "calls"))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    trace_names = ([v for v in args.trace_variants.split(",") if v]
                   if args.trace_variants is not None
                   else [v for v in ("before_lean",) if v in names])
    if "default" in trace_names or not set(trace_names) <= set(names):
        parser.error(f"--trace-variants: {trace_names} must be other variants of --variants "
                     f"({names}); the default is traced anyway (unless --no-profile)")
    args.variants, args.trace_variants = names, trace_names
    return args


def main(argv=None) -> int:
    """Compiles, times (and traces) the variants (see the module docstring); returns the exit
    status: 1 when a variant, a trace or the rounds failed (what ran is printed and in
    ``gpu_profile.json``), else 0."""
    args = parse_args(argv)
    names, trace_names = args.variants, args.trace_variants
    failures = []  # what went wrong, for the exit status and the last line
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    x_dev, y_dev, order = synthetic_train_data()
    # One model and optimiser for every state: the compiled call is keyed by both.
    model, tx = model_and_optimizer(args.model, args.dtype)
    n = max(1, min(args.steps_per_call, NUM_TRAIN // args.batch))
    report = {"device": device.device_kind, "jax": jax.__version__, "model": args.model,
              "batch": args.batch, "dtype": args.dtype, "loss": args.loss,
              "steps_per_call": n, "variants": []}
    json_path = os.path.join(args.out, "gpu_profile.json")

    def save():
        atomic_write_text(json_path, json.dumps(report, indent=2))

    def fresh_state(variant_tx=tx):
        return train.create_train_state(jax.random.PRNGKey(0), model, variant_tx,
                                        models.input_shape(args.model))

    def compile_variant(name):
        """(compiled call, the optimiser its state must carry)."""
        lowered, options, variant_tx = lower_variant(
            name, fresh_state, (x_dev, y_dev, order), num_steps=n, loss=args.loss,
            batch=args.batch, dtype=args.dtype, tx=tx, platform=device.platform)
        return (lowered.compile(compiler_options=options) if options else lowered.compile(),
                variant_tx)

    def run(compiled, state):
        return compiled(state, x_dev, y_dev, order, 0, 0, 0)

    def profile(compiled, hlo, name="default", state=None):
        """Traces one call of variant ``name`` (after a warm one) and summarises the device
        time; returns the state after the calls. The default's trace is ``trace.xplane.pb.gz``
        and ``gpu_profile.txt`` (report["profile"]), another's carries its name."""
        state = fresh_state() if state is None else state
        state, metrics = run(compiled, state)  # warm: nothing of the first call traced
        jax.block_until_ready(metrics)
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir)
            state, metrics = run(compiled, state)
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
            (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
            with open(path, "rb") as f:
                data = f.read()
        suffix = "" if name == "default" else f"_{name}"
        atomic_write_bytes(os.path.join(args.out, f"trace{suffix}.xplane.pb.gz"),
                           gzip.compress(data))
        summary = summarize_xspace(data, n, args.plane_prefix, hlo_text=hlo)
        if name == "default":
            report["profile"] = summary
        else:
            report.setdefault("profiles", {})[name] = summary
        save()
        text = format_summary(summary)
        atomic_write_text(os.path.join(args.out, f"gpu_profile{suffix}.txt"), text + "\n")
        print(("" if name == "default" else f"trace of {name}:\n") + text, flush=True)
        return state

    reference_losses = reference_hlo = None
    timed = []  # [row, compiled, state] of each variant that ran, for the rounds
    print("| variant | img/s | compile (s) | losses vs default |", flush=True)
    for name in names:
        options = variant_options(name, device.platform)
        unroll = variant_unroll(name, device.platform)
        try:
            start = time.perf_counter()
            compiled, variant_tx = compile_variant(name)
            compile_s = time.perf_counter() - start
            state, metrics = run(compiled, fresh_state(variant_tx))
            losses = np.asarray(jax.device_get(metrics["loss"]))
            start = time.perf_counter()
            for _ in range(args.calls):
                state, metrics = run(compiled, state)
            jax.block_until_ready(metrics)
            rate = n * args.batch * args.calls / (time.perf_counter() - start)
            if reference_losses is None:
                reference_losses = losses
            hlo = compiled.as_text()
            if reference_hlo is None:
                reference_hlo = hlo
            row = {"variant": name, "options": options, "unroll": unroll, "img_per_s": rate,
                   "compile_s": compile_s, "same_hlo_as_default": hlo == reference_hlo,
                   "losses_vs_default": loss_agreement(losses, reference_losses)}
            if name == "default" and not any(r["variant"] == "default"
                                              for r in report["variants"]):
                atomic_write_bytes(os.path.join(args.out, "train_steps_hlo.txt.gz"),
                                   gzip.compress(hlo.encode()))
            timed.append([row, compiled, state])
            del state, metrics
        except Exception as error:  # a variant XLA rejects must not cost the others
            row = {"variant": name, "options": options, "error": f"{type(error).__name__}: "
                   f"{str(error)[:500]}"}
        report["variants"].append(row)
        save()
        if "error" in row:
            failures.append(f"variant {name}")
            print(f"| {name} | failed: {row['error'][:200]} | | |", flush=True)
        else:
            print(f"| {name} | {row['img_per_s']:,.0f} | {row['compile_s']:.1f} | "
                  f"{_agreement_text(row['losses_vs_default'])}"
                  f"{'' if name == 'default' or not row['same_hlo_as_default'] else ' (same HLO)'}"
                  " |", flush=True)
            if name == "default" and not args.no_profile and "profile" not in report:
                # Right after the default variant, so a run cut short still has it.
                try:
                    profile(compiled, hlo)
                except Exception as error:  # the variants still run; the error is shown
                    failures.append("trace of default")
                    print(f"profile failed: {type(error).__name__}: {error}", flush=True)
                print("| variant | img/s | compile (s) | losses vs default |",
                      flush=True)
    if args.rounds and len(timed) > 1:
        try:
            interleaved_rounds(timed, args.rounds, run, n * args.batch, save)
        except Exception as error:  # the rows above are saved; the rounds' so far too
            failures.append("interleaved rounds")
            print(f"interleaved rounds failed: {type(error).__name__}: {error}", flush=True)
    # Last, as the least needed: traces of other variants (what is left once they change
    # the step), each from its own compiled call and state.
    for name in [] if args.no_profile else trace_names:
        entry = next((e for e in timed if e[0]["variant"] == name), None)
        if entry is None:
            print(f"no trace of {name}: it did not run", flush=True)
            continue
        try:
            entry[2] = profile(entry[1], entry[1].as_text(), name, state=entry[2])
        except Exception as error:
            failures.append(f"trace of {name}")
            print(f"trace of {name} failed: {type(error).__name__}: {error}", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", flush=True)
    return 1 if failures else 0


def interleaved_rounds(timed, rounds, run, images_per_call, save):
    """Times one call of every compiled variant per round, ``rounds`` times, in turn: each
    variant sees the same drift of the machine (clocks, temperature, other tenants), which
    the one-after-another figures above do not cancel (the first H200 sessions saw ~4%).
    Adds ``interleaved_img_per_s`` to each row and prints the medians against the
    default's."""
    for _ in range(rounds):
        for entry in timed:
            row, compiled, state = entry
            start = time.perf_counter()
            state, metrics = run(compiled, state)
            jax.block_until_ready(metrics)
            row.setdefault("interleaved_img_per_s", []).append(
                images_per_call / (time.perf_counter() - start))
            entry[2] = state
        save()
    medians = [float(np.median(row["interleaved_img_per_s"])) for row, _, _ in timed]
    reference = next((m for (row, _, _), m in zip(timed, medians)
                      if row["variant"] == "default"), medians[0])
    print(f"interleaved ({rounds} rounds, one call of each variant per round):\n"
          "| variant | median img/s | range | vs default |", flush=True)
    for (row, _, _), median in zip(timed, medians):
        rates = row["interleaved_img_per_s"]
        print(f"| {row['variant']} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
              f"{median / reference - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
