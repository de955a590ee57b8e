"""Kernels and memory traffic of the training loop's compiled call on an H200 / H100,
compiled **without a GPU**: XLA:GPU's fusion decisions, read from its optimised HLO.

For the code and XLA-option variants of ``gpu_profile.py`` (default: the headline call,
ResNet-50, batch 128, bfloat16, CE, 39 steps per call), this compiles ``train.train_steps``
for a described card through PJRT's deviceless topology (``jax.experimental.topologies``)
and counts, per training step of the loop body (which holds as many steps as the scan's
unroll), every kernel XLA launches (its fusions and library calls: cuDNN convolutions, cuBLAS
products) with the bytes it writes (its outputs) and reads (its operands, whole, once per
kernel), grouped by part of the step as ``gpu_profile.py`` groups a trace. No timing: a
kernel count and a traffic estimate, to choose what to measure on a lent GPU, not a
prediction of time. (1,284 -> 810 kernels per step measured no faster on an H200: a fusion
that reads an operand once per slice of a stack counts it once here; benchmarks/NOTES.md.)
Convolution autotuning needs a device and is off here (``xla_gpu_autotune_level=0``), so
cuDNN's algorithms (and their workspaces, not counted) are heuristic; XLA's own fusions do
not depend on them.

Set-up (a separate environment; nothing here needs a GPU or its driver):
    python3 -m venv /tmp/venv-gpu-hlo && /tmp/venv-gpu-hlo/bin/pip install \
        "jax[cuda12]==<this machine's jax>" flax optax chex
    PYTHONPATH=$PWD /tmp/venv-gpu-hlo/bin/python benchmarks/hlo_static.py
Options: ``--variants default,unfused_relu,...``, ``--card h100``, ``--json out.json``,
``--hlo-dir DIR`` (keeps each variant's optimised HLO, gzipped).
"""

from __future__ import annotations

import os

# Before jax is imported: no device is wanted (the CUDA plugin would otherwise try the
# driver, and fail without one); CPU is the default backend, CUDA only a compile target.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu,cuda")

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_profile import VARIANTS, kernel_part, lower_variant, variant_unroll  # noqa: E402
from train_throughput import NUM_TRAIN, model_and_optimizer  # noqa: E402

from calib_jax import models, train  # noqa: E402

# XLA's GPU target description (gpu_device_info + dnn version), per card.
_CARD = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""
CARDS = {
    "h200": _CARD.format(bandwidth=4_800_000_000_000, memory=150_000_000_000,
                         name="NVIDIA H200"),
    "h100": _CARD.format(bandwidth=3_352_320_000_000, memory=84_929_347_584,
                         name="NVIDIA H100 80GB HBM3"),
}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_LAUNCHING = ("fusion", "custom-call", "copy", "transpose", "reduce", "convolution",
              "all-reduce", "sort", "scatter")


def shape_bytes(shape: str, skip_u8: bool = False) -> int:
    """Bytes of an HLO shape (a tuple's elements summed); ``skip_u8`` leaves out u8 arrays
    (a library call's scratch workspace)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dtype not in _BYTES or (skip_u8 and dtype == "u8"):
            continue
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES[dtype]
    return total


def step_kernels(hlo_text: str):
    """``[(part, bytes written, bytes read)]`` of every kernel of the loop body (the
    computation holding the most convolutions: as many training steps as the scan's
    unroll)."""
    computations = re.split(r"\n(?=\S)", hlo_text)
    body = max(computations, key=lambda c: c.count("custom_call_target=\"__cudnn$conv"))
    shapes, kernels = {}, []
    for line in body.split("\n")[1:]:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(?:, |$)",
                     line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        shapes[name] = shape
        if op not in _LAUNCHING:
            continue
        library = op == "custom-call"
        read = sum(shape_bytes(shapes.get(o, ""), skip_u8=True)
                   for o in re.findall(r"%([\w.\-]+)", operands))
        op_name = re.search(r'op_name="([^"]*)"', line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        if library:
            part = "library " + (target.group(1) if target else "call")
        else:
            part = kernel_part(op_name.group(1) if op_name else "", name)
        kernels.append((part, shape_bytes(shape, skip_u8=library), read))
    return kernels


def summarize(kernels, steps=1):
    """Kernels and MB per training step of a loop body holding ``steps`` steps (the
    scan's unroll)."""
    parts = collections.defaultdict(lambda: [0, 0, 0])
    for part, written, read in kernels:
        parts[part][0] += 1
        parts[part][1] += written
        parts[part][2] += read
    mb = 2**20 * steps
    return {"kernels": len(kernels) / steps, "written_mb": sum(k[1] for k in kernels) / mb,
            "read_mb": sum(k[2] for k in kernels) / mb,
            "parts": {p: {"kernels": c / steps, "written_mb": w / mb, "read_mb": r / mb}
                      for p, (c, w, r) in sorted(parts.items(),
                                                 key=lambda kv: -kv[1][1] - kv[1][2])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--steps-per-call", type=int, default=39)
    parser.add_argument("--variants",
                        default="default,unroll1,autodiff_bn,unfused_relu,per_leaf_norm")
    parser.add_argument("--card", default="h200", choices=sorted(CARDS))
    parser.add_argument("--top", type=int, default=14, help="parts listed per variant")
    parser.add_argument("--json", default=None)
    parser.add_argument("--hlo-dir", default=None)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    from jax.experimental import topologies
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=CARDS[args.card],
                                                topology="1x1x1")
    except Exception as error:  # no CUDA plugin in this environment
        sys.exit(f"no deviceless CUDA compiler here ({type(error).__name__}: {error}); "
                 "install jax[cuda12] at this jax's version (see the module docstring).")
    mesh = topologies.make_mesh(topology, (1,), ("data",))
    on_card = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def abstract(tree):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_card), tree)

    model, tx = model_and_optimizer(args.model, args.dtype)

    def state_fn(variant_tx):
        return abstract(jax.eval_shape(lambda: train.create_train_state(
            jax.random.PRNGKey(0), model, variant_tx, models.input_shape(args.model))))

    data = abstract((jax.ShapeDtypeStruct((NUM_TRAIN, 32, 32, 3), jnp.uint8),
                     jax.ShapeDtypeStruct((NUM_TRAIN,), jnp.int32),
                     jax.ShapeDtypeStruct((NUM_TRAIN,), jnp.int32)))
    n = max(1, min(args.steps_per_call, NUM_TRAIN // args.batch))
    report = {"card": args.card, "jax": jax.__version__, "model": args.model,
              "batch": args.batch, "dtype": args.dtype, "loss": args.loss, "variants": {}}
    print(f"{args.model}, batch {args.batch}, {args.dtype}, {args.loss}: one training step "
          f"of train_steps as XLA:GPU compiles it for {args.card} (jax {jax.__version__}; "
          "no device: autotuning off)", flush=True)
    for name in names:
        lowered, options, _ = lower_variant(name, state_fn, data, num_steps=n, loss=args.loss,
                                            batch=args.batch, dtype=args.dtype, tx=tx,
                                            platform="gpu")
        hlo = lowered.compile(compiler_options={**options, "xla_gpu_autotune_level": 0}).as_text()
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with gzip.open(os.path.join(args.hlo_dir, f"{name}.hlo.txt.gz"), "wt") as f:
                f.write(hlo)
        summary = summarize(step_kernels(hlo), steps=variant_unroll(name, "gpu"))
        report["variants"][name] = summary
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(args.json + ".tmp", args.json)
        print(f"\n{name}: {summary['kernels']:g} kernels per step, {summary['written_mb']:,.0f} MB "
              f"written, {summary['read_mb']:,.0f} MB read (operands, whole)", flush=True)
        print("| part | kernels | MB written | MB read |\n| --- | --- | --- | --- |")
        for part, v in list(summary["parts"].items())[:args.top]:
            print(f"| {part} | {v['kernels']:g} | {v['written_mb']:,.0f} | {v['read_mb']:,.0f} |")


if __name__ == "__main__":
    main()
