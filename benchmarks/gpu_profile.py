"""Where the training loop's compiled call spends device time, and what XLA options change.

For one configuration (default: ResNet-50, batch 128, bfloat16, CE, 39 steps per call,
i.e. the headline row of ``train_throughput.py``):

1. ``--variants``: compiles ``train.train_steps`` once per variant -- XLA compiler options
   passed to that one compilation (``Lowered.compile(compiler_options=...)``: no process
   restart, so the convolution autotuning of the first compile is reused), or a code option
   (``unroll``) -- and prints its images/s, compile time, and how far its first call's
   losses are from the default variant's (same state, same batches);
2. ``--profile``: traces one call of the default variant with ``jax.profiler`` and prints
   where the device time goes (device busy share of the traced window; top kernels; kernels
   by kind: convolutions, matrix products, XLA's own fusions, copies; XLA ops), per step.
   The trace (gzipped ``.xplane.pb``) and the optimised HLO are written beside the JSON
   for offline reading (``jax.profiler.ProfileData.from_serialized_xspace``).

While a trace is active XLA runs ops one by one instead of through command buffers (CUDA
graphs), so the trace shows the kernels and their gaps without graphs: the busy share is a
lower bound for the graph-enabled run that the timings measure.

Usage (GPU): python benchmarks/gpu_profile.py --out gpu_results
Usage (CPU smoke): python benchmarks/gpu_profile.py --model resnet8 --batch 16 \
    --steps-per-call 2 --variants default,unroll2 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from calib_jax import models, train
from calib_jax.data import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling script
from train_throughput import _agreement_text, loss_agreement  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NUM_TRAIN = 45000
# XLA's default command-buffer kinds (read from the DebugOptions that jaxlib 0.11.2 dumps),
# to which the graph variants add WHILE: the whole lax.scan as one CUDA graph.
_DEFAULT_GRAPH_KINDS = "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,DYNAMIC_SLICE_FUSION,CONDITIONAL"
VARIANTS = {
    "default": ({}, 1),
    "graph_while": ({"xla_gpu_enable_command_buffer": _DEFAULT_GRAPH_KINDS + ",WHILE"}, 1),
    "graph_while_unrolled": ({"xla_gpu_enable_command_buffer": _DEFAULT_GRAPH_KINDS + ",WHILE",
                              "xla_gpu_command_buffer_unroll_loops": True}, 1),
    "graph_min1": ({"xla_gpu_graph_min_graph_size": 1}, 1),
    "no_graph": ({"xla_gpu_enable_command_buffer": ""}, 1),
    "conv_fusion": ({"xla_gpu_experimental_enable_conv_fusion": True}, 1),
    "unroll2": ({}, 2),
}
# Kernel kinds by name (cuDNN / CUTLASS / cuBLAS kernel names, XLA's fusion names).
KINDS = (
    ("convolution (cuDNN)", r"conv|fprop|dgrad|wgrad|cudnn|implicit|winograd|xmma_(?!gemm)"),
    ("matrix product (cuBLAS/Triton)", r"gemm|nvjet|cublas|triton_gemm|matmul|dot"),
    ("reduction fusion", r"reduce|reduction"),
    ("copy / transpose", r"copy|transpose|memcpy|memset"),
    ("other fusion", r"fusion|loop_|input_|wrapped_|kernel"),
)


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


def summarize_xspace(data: bytes, steps: int, plane_prefix: str = "/device:GPU", top: int = 30):
    """Device-time summary of a serialized XSpace: per line, per kernel, per kind; times
    are per training step (``steps`` steps were traced)."""
    from jax.profiler import ProfileData
    profile = ProfileData.from_serialized_xspace(data)
    out = {"planes": []}
    for plane in profile.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        lines = {}
        kernels = collections.defaultdict(lambda: [0, 0.0])
        ops = collections.defaultdict(lambda: [0, 0.0])
        kinds = collections.defaultdict(float)
        intervals, first, last = [], None, None
        for line in plane.lines:
            events = [(e.name, float(e.start_ns), float(e.duration_ns)) for e in line.events]
            if not events:
                continue
            lines[line.name] = {"events": len(events),
                                "ms_per_step": sum(d for _, _, d in events) / 1e6 / steps}
            if line.name == "XLA Ops":
                for name, _, d in events:
                    key = re.sub(r"[.\d]+$", "", name.split(" ")[0].lstrip("%"))
                    ops[key][0] += 1
                    ops[key][1] += d
            elif line.name.startswith("Stream") or "stream" in line.name.lower():
                for name, start, d in events:
                    kernels[name][0] += 1
                    kernels[name][1] += d
                    kinds[kernel_kind(name)] += d
                    intervals.append((start, start + d))
                    first = start if first is None else min(first, start)
                    last = start + d if last is None else max(last, start + d)
        busy = _union_ns(intervals)
        window = (last - first) if intervals else 0.0
        total_kernel = sum(v[1] for v in kernels.values()) or 1.0
        out["planes"].append({
            "plane": plane.name, "lines": lines,
            "window_ms_per_step": window / 1e6 / steps,
            "busy_ms_per_step": busy / 1e6 / steps,
            "busy_share": busy / window if window else None,
            "kernels_per_step": sum(v[0] for v in kernels.values()) / steps,
            "kinds_ms_per_step": {k: v / 1e6 / steps for k, v in
                                  sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "calls_per_step": c / steps,
                             "ms_per_step": d / 1e6 / steps, "share": d / total_kernel}
                            for n, (c, d) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
            "top_ops": [{"op": n, "calls_per_step": c / steps, "ms_per_step": d / 1e6 / steps}
                        for n, (c, d) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]],
        })
    return out


def format_summary(summary) -> str:
    rows = []
    for p in summary["planes"]:
        share = p["busy_share"]
        rows.append(f"{p['plane']}: window {p['window_ms_per_step']:.2f} ms/step, kernels busy "
                    f"{p['busy_ms_per_step']:.2f} ms/step "
                    f"({'-' if share is None else f'{share:.0%}'}), "
                    f"{p['kernels_per_step']:.0f} kernels/step")
        rows.append("  lines: " + "; ".join(f"{n} {v['events']} ev {v['ms_per_step']:.2f} ms/step"
                                             for n, v in p["lines"].items()))
        rows.append("  by kind (ms/step): " + "; ".join(
            f"{k} {v:.2f}" for k, v in p["kinds_ms_per_step"].items()))
        rows.append("  top kernels (ms/step, calls/step, share):")
        rows += [f"    {k['ms_per_step']:.3f} {k['calls_per_step']:.0f} {k['share']:.1%} {k['name']}"
                 for k in p["top_kernels"]]
        rows.append("  top XLA ops (ms/step, calls/step):")
        rows += [f"    {o['ms_per_step']:.3f} {o['calls_per_step']:.0f} {o['op']}"
                 for o in p["top_ops"]]
    return "\n".join(rows) if rows else "no device plane in the trace"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--steps-per-call", type=int, default=39)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per variant")
    parser.add_argument("--variants", default="default,graph_while,no_graph,conv_fusion,"
                        "unroll2,graph_min1,graph_while_unrolled",
                        help=f"comma-separated, in order, from {sorted(VARIANTS)}")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--plane-prefix", default="/device:GPU",
                        help="trace planes to summarise ('/host:CPU' for a CPU smoke run)")
    parser.add_argument("--out", default="gpu_results")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    rng = np.random.default_rng(0)
    x_dev, y_dev = pipeline.put_on_device(
        rng.integers(0, 256, (NUM_TRAIN, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, NUM_TRAIN))
    order = pipeline.epoch_order(0, 0, NUM_TRAIN)
    model = models.get(args.model, 10, dtype=DTYPES[args.dtype])
    tx = train.make_optimizer(train.piecewise_lr(0.1, NUM_TRAIN // 128))
    n = max(1, min(args.steps_per_call, NUM_TRAIN // args.batch))
    report = {"device": device.device_kind, "jax": jax.__version__, "model": args.model,
              "batch": args.batch, "dtype": args.dtype, "loss": args.loss,
              "steps_per_call": n, "variants": []}
    json_path = os.path.join(args.out, "gpu_profile.json")

    def save():
        with open(json_path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(json_path + ".tmp", json_path)

    def fresh_state():
        return train.create_train_state(jax.random.PRNGKey(0), model, tx,
                                        models.input_shape(args.model))

    def compile_variant(options, unroll):
        lowered = train.train_steps.lower(
            fresh_state(), x_dev, y_dev, order, 0, 0, 0, num_steps=n, loss_name=args.loss,
            batch_size=args.batch, mean=MEAN, std=STD, dtype=DTYPES[args.dtype], unroll=unroll)
        return lowered.compile(compiler_options=options) if options else lowered.compile()

    def run(compiled, state):
        return compiled(state, x_dev, y_dev, order, 0, 0, 0)

    def profile(compiled):
        """Traces one call (after a warm one) and summarises the device time."""
        state = fresh_state()
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
        with gzip.open(os.path.join(args.out, "trace.xplane.pb.gz"), "wb") as f:
            f.write(data)
        summary = summarize_xspace(data, n, args.plane_prefix)
        report["profile"] = summary
        save()
        text = format_summary(summary)
        with open(os.path.join(args.out, "gpu_profile.txt"), "w") as f:
            f.write(text + "\n")
        print(text, flush=True)

    reference_losses = None
    print("| variant | img/s | compile (s) | losses vs default |", flush=True)
    for name in names:
        options, unroll = VARIANTS[name]
        try:
            start = time.perf_counter()
            compiled = compile_variant(options, unroll)
            compile_s = time.perf_counter() - start
            state, metrics = run(compiled, fresh_state())
            losses = np.asarray(jax.device_get(metrics["loss"]))
            start = time.perf_counter()
            for _ in range(args.calls):
                state, metrics = run(compiled, state)
            jax.block_until_ready(metrics)
            rate = n * args.batch * args.calls / (time.perf_counter() - start)
            if reference_losses is None:
                reference_losses = losses
            row = {"variant": name, "options": options, "unroll": unroll, "img_per_s": rate,
                   "compile_s": compile_s,
                   "losses_vs_default": loss_agreement(losses, reference_losses)}
            if name == "default":
                with gzip.open(os.path.join(args.out, "train_steps_hlo.txt.gz"), "wt") as f:
                    f.write(compiled.as_text())
            del state, metrics
        except Exception as error:  # a variant XLA rejects must not cost the others
            row = {"variant": name, "options": options, "error": f"{type(error).__name__}: "
                   f"{str(error)[:500]}"}
        report["variants"].append(row)
        save()
        if "error" in row:
            print(f"| {name} | failed: {row['error'][:200]} | | |", flush=True)
        else:
            print(f"| {name} | {row['img_per_s']:,.0f} | {row['compile_s']:.1f} | "
                  f"{_agreement_text(row['losses_vs_default'])} |", flush=True)
            if name == "default" and not args.no_profile:
                # Right after the default variant, so a run cut short still has it.
                try:
                    profile(compiled)
                except Exception as error:  # the variants still run; the error is shown
                    print(f"profile failed: {type(error).__name__}: {error}", flush=True)
                print("| variant | img/s | compile (s) | losses vs default |",
                      flush=True)


if __name__ == "__main__":
    main()
