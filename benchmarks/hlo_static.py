"""Kernels and memory traffic of the training loop's compiled call on an H200 / H100,
compiled **without a GPU**: XLA:GPU's fusion decisions, read from its optimised HLO.

For the code and XLA-option variants of ``gpu_profile.py`` (default: the headline call,
ResNet-50, batch 128, bfloat16, CE, 39 steps per call), this compiles ``train.train_steps``
for a described card through PJRT's deviceless topology (``jax.experimental.topologies``)
and counts, per training step of the loop body (which holds as many steps as the scan's
unroll), every kernel XLA launches (its fusions and library calls: cuDNN convolutions, cuBLAS
products) with the bytes it writes (its outputs) and reads (its operands, whole, once per
kernel; an operand a fusion reads only through static slices, as the slices' bytes),
grouped by part of the step as ``gpu_profile.py`` groups a trace. No timing: a
kernel count and a traffic estimate, to choose what to measure on a lent GPU, not a
prediction of time. (1,284 -> 810 kernels per step measured no faster on an H200: a fusion
that reads an operand once per slice of a stack counts it once here; benchmarks/NOTES.md.)
Convolution autotuning needs a device and is off here (``xla_gpu_autotune_level=0``), so
cuDNN's algorithms (and their workspaces, not counted) are heuristic; XLA's own fusions do
not depend on them.

It also counts the step's FLOPs (the cuDNN convolutions and their gradients, the
convolutions and dots inside fusions) and gives a **roofline ceiling** (``roofline_ms``):
every kernel at the card's HBM bandwidth or tensor-core peak, whichever binds, with no
launch costs or gaps. A measured rate over that ceiling says how much of the card XLA's
plan uses; a target above it cannot be met by any tuning of that plan, only by one that
moves fewer bytes.

Set-up (a separate environment; nothing here needs a GPU or its driver):
    python3 -m venv /tmp/venv-gpu-hlo && /tmp/venv-gpu-hlo/bin/pip install \
        "jax[cuda12]==<this machine's jax>" flax optax chex
    PYTHONPATH=$PWD /tmp/venv-gpu-hlo/bin/python benchmarks/hlo_static.py
Options: ``--variants default,unfused_relu,...``, ``--card h100``, ``--json out.json``,
``--hlo-dir DIR`` (keeps each variant's optimised HLO, gzipped), ``--launches`` (what the
host launches per step: CUDA graphs and the thunks outside them, from XLA's thunk sequence).
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
import functools  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_profile import VARIANTS, kernel_part, lower_variant, variant_unroll  # noqa: E402
from train_throughput import NUM_TRAIN, model_and_optimizer  # noqa: E402

from calib_jax import models, train  # noqa: E402
from calib_jax.files import atomic_write_bytes, atomic_write_text  # noqa: E402

# XLA's GPU target description (gpu_device_info + dnn version), per card.
_CARD = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  runtime_version: "12.9.0" driver_version: "13.0.0" compile_time_toolkit_version: "12.9.0"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""
# The CUDA versions are the lent H200's (driver 580: CUDA 13.0; jax's CUDA 12.9 runtime): XLA
# records thunks such as cuDNN's convolutions into CUDA graphs only where they are >= 12.3,
# and without them a deviceless compile would split its graphs as no real machine does.
# Per card: HBM bandwidth (bytes/s) and the spec sheets' dense tensor-core peaks (FLOP/s;
# SXM parts): bfloat16 / float16, and TF32 (XLA's default for float32 convolutions here).
ROOFS = {
    "h200": {"bandwidth": 4.8e12, "bf16": 989.4e12, "f32": 494.7e12},
    "h100": {"bandwidth": 3.35232e12, "bf16": 989.4e12, "f32": 494.7e12},
}
CARDS = {
    "h200": _CARD.format(bandwidth=int(ROOFS["h200"]["bandwidth"]), memory=150_000_000_000,
                         name="NVIDIA H200"),
    "h100": _CARD.format(bandwidth=int(ROOFS["h100"]["bandwidth"]), memory=84_929_347_584,
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


def _dims(shape: str) -> list[int]:
    """Dimensions of the first array in an HLO shape (a tuple's first element)."""
    m = re.search(r"\b[a-z]+\d*\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _element_type(shape: str) -> str:
    m = re.search(r"\b([a-z]+\d*)\[", shape)
    return m.group(1) if m else ""


def conv_flops(dim_labels: str, output_activation: list[int], kernel: list[int]) -> int:
    """FLOPs of a convolution (or either of its gradients, which cost the same):
    ``2 N H_out W_out x (O kh kw I/groups)``, from the forward convolution's output
    activation (its ``dim_labels`` after ``->``) and kernel (its ``o..i`` labels)."""
    feature = dim_labels.split("->")[1].index("f")
    return 2 * math.prod(output_activation) // output_activation[feature] * math.prod(kernel)


def dot_flops(line: str, lhs: list[int], result: list[int]) -> int:
    """FLOPs of an HLO ``dot``: 2 x (result elements) x (lhs contracting extent)."""
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    contracting = [lhs[int(d)] for d in m.group(1).split(",") if d] if m else []
    return 2 * math.prod(result) * math.prod(contracting)


# Where a cuDNN call's forward-convolution tensors are: an operand index or "result".
# (XLA keeps the forward convolution's dim_labels on the gradient calls.)
_CONV_ROLES = {  # (output activation, kernel)
    "__cudnn$convForward": ("result", 1),
    "__cudnn$convBiasActivationForward": ("result", 1),
    "__cudnn$convBackwardInput": (0, 1),
    "__cudnn$convBackwardFilter": (1, "result"),
}


def _instructions(computation: str):
    """``(name, shape, op, operand names, line)`` of each instruction of a computation."""
    for line in computation.split("\n")[1:]:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(?:, |$)",
                     line)
        if m:
            name, shape, op, operands = m.groups()
            yield name, shape, op, re.findall(r"%([\w.\-]+)", operands), line


def _fused_flops(computation: str) -> int:
    """FLOPs of the convolutions and dots inside a fused computation (a Triton GEMM
    fusion, a cuDNN fusion)."""
    shapes, flops = {}, 0
    for name, shape, op, operands, line in _instructions(computation):
        shapes[name] = shape
        if op == "convolution" and len(operands) == 2:
            labels = re.search(r"dim_labels=(\S+?),", line)
            if labels:
                flops += conv_flops(labels.group(1), _dims(shape), _dims(shapes[operands[1]]))
        elif op == "dot" and operands:
            flops += dot_flops(line, _dims(shapes.get(operands[0], "")), _dims(shape))
    return flops


# Element-wise HLO ops (an output element reads the same element of each operand): a
# parameter read only through these and then a slice is read only where sliced.
_ELEMENTWISE = frozenset(
    "abs add and bitcast clamp compare convert cosine divide exponential log maximum minimum "
    "multiply negate not or power rsqrt select sine sqrt subtract tanh xor".split())


def _sliced_reads(computation: str) -> dict[int, int]:
    """Parameter number -> bytes a fused computation reads of it, for the parameters it
    reads only through static ``slice`` ops, possibly after element-wise ops (a conversion,
    or the optimiser's update of a flat parameter vector that the next step's forward pass
    slices: the kernel computes only the sliced elements) or a ``concatenate`` (counted as
    at most the elements sliced from it): the slices' elements at the parameter's element
    size. A kernel that slices a flat buffer reads its slice, not the buffer. Other
    parameters are absent: read whole."""
    params, uses, shapes = {}, collections.defaultdict(list), {}
    for name, shape, op, operands, line in _instructions(computation):
        shapes[name] = shape
        if op == "parameter":
            number = re.search(r"parameter\((\d+)\)", line)
            if number:
                params[name] = int(number.group(1))
        for o in operands:
            uses[o].append((op, name))

    @functools.cache
    def reached_slices(name):
        """The slices every use of ``name`` leads to, or None where some use reads it other
        than by a slice. Memoised: a value reached by many paths (diamonds of element-wise
        ops) is walked once."""
        found = set()
        for op, user in uses[name]:
            if op == "slice":
                found.add(user)
                continue
            passes = op == "concatenate" or op in _ELEMENTWISE and math.prod(
                _dims(shapes[user])) == math.prod(_dims(shapes[name]))
            below = reached_slices(user) if passes else None
            if below is None:
                return None
            found |= below
        return frozenset(found) if uses[name] else None

    reads = {}
    for name, number in params.items():
        slices = reached_slices(name)  # each slice once, however many paths reach it
        if slices is not None:
            elements = sum(math.prod(_dims(shapes[s])) for s in slices)
            # A concatenate's slice reads at most its own elements of each operand.
            reads[number] = (min(elements, math.prod(_dims(shapes[name])))
                             * _BYTES.get(_element_type(shapes[name]), 0))
    return reads


def step_kernels(hlo_text: str):
    """``[(part, bytes written, bytes read, flops, element type)]`` of every kernel of the
    loop body (the computation holding the most convolutions: as many training steps as
    the scan's unroll). ``flops`` counts the convolutions (cuDNN calls) and the
    convolutions and dots inside fusions (0 for other kernels); ``element type`` is that
    of the kernel's first operand (which tensor-core rate its FLOPs run at)."""
    computations = re.split(r"\n(?=\S)", hlo_text)
    by_name = {}
    for c in computations:
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", c)
        if head:
            by_name[head.group(1)] = c
    body = max(computations, key=lambda c: c.count("custom_call_target=\"__cudnn$conv"))
    shapes, kernels = {}, []
    for name, shape, op, operands, line in _instructions(body):
        shapes[name] = shape
        if op not in _LAUNCHING:
            continue
        library = op == "custom-call"
        called = re.search(r"calls=%?([\w.\-]+)", line)
        fused = by_name.get(called.group(1)) if op == "fusion" and called else None
        sliced = _sliced_reads(fused) if fused else {}
        read = sum(sliced[i] if i in sliced else shape_bytes(shapes.get(o, ""), skip_u8=True)
                   for i, o in enumerate(operands))
        op_name = re.search(r'op_name="([^"]*)"', line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        flops = 0
        if library:
            part = "library " + (target.group(1) if target else "call")
            roles = _CONV_ROLES.get(target.group(1)) if target else None
            labels = re.search(r"dim_labels=(\S+?),", line)
            if roles and labels:
                output, kernel = (shape if r == "result" else shapes.get(operands[r], "")
                                  for r in roles)
                flops = conv_flops(labels.group(1), _dims(output), _dims(kernel))
        else:
            part = kernel_part(op_name.group(1) if op_name else "", name)
            if fused:
                flops = _fused_flops(fused)
        dtype = _element_type(shapes.get(operands[0], "")) if operands else ""
        kernels.append((part, shape_bytes(shape, skip_u8=library), read, flops, dtype))
    return kernels


def loop_launches(thunk_text: str, steps=1) -> dict:
    """What the host launches per training step in the training loop's body, read from XLA's
    thunk sequence after its thunk passes (``*.thunk_sequence_after_thunk_passes.txt`` of
    an ``xla_dump_to`` dump): ``graphs`` (command buffers: CUDA graphs) and ``outside``,
    the thunks launched one by one between them (by kind: cuDNN convolutions, kernels),
    each per step of a body holding ``steps`` steps. When the whole loop sits inside one
    command buffer (``WHILE`` recorded too), ``one_graph`` is True and both are 0: the call
    is one graph launch.

    Every launch outside a graph costs host time and can leave the GPU waiting: on the
    H200 the default's ~104 graph switches per step came with 0.93 ms of gaps
    (benchmarks/NOTES.md)."""
    graphs, outside, one_graph = 0, collections.Counter(), False
    section, top_kinds = None, []
    for line in thunk_text.splitlines():
        label = re.match(r"^\s*(condition|body):\s*$", line)
        if label:
            section = label.group(1)
            continue
        m = re.match(r"^( *)\d+: (k\w+)", line)
        if not m:
            continue
        indent, kind = len(m.group(1)), m.group(2)
        if indent == 0:
            top_kinds.append(kind)
            section = None
        elif indent == 4 and section == "body":
            if kind == "kCommandBuffer":
                graphs += 1
            else:
                outside[kind] += 1
        elif kind == "kWhile" and top_kinds and top_kinds[-1] == "kCommandBuffer":
            one_graph = True
    return {"graphs": graphs / steps, "outside": {k: n / steps for k, n in outside.items()},
            "one_graph": one_graph and top_kinds == ["kCommandBuffer"]}


def roofline_ms(kernels, card: str, steps=1) -> dict:
    """A roofline estimate of one step's time on ``card``: each kernel takes at least its
    bytes over the HBM bandwidth and its FLOPs over the tensor-core peak (bfloat16 /
    float16, else TF32), whichever is longer; the step at least their sum (ms).

    Optimistic by construction (every kernel at the card's peak, no launch cost, no gaps)
    except where this module's byte counts overstate the traffic: operands counted whole
    (a fusion reading part of one other than through static slices), and tensors re-read
    from the 50 MB L2 cache instead of HBM, which matters at small batches (ResNet-50
    CIFAR at batch 128: activations of 4-67 MB) and hardly at batch 1024. So a ceiling to
    compare targets and measurements with, not a prediction."""
    roof = ROOFS[card]
    memory = compute = floor = 0.0
    for _, written, read, flops, dtype in kernels:
        peak = roof["bf16"] if dtype in ("bf16", "f16") else roof["f32"]
        t_memory, t_compute = (written + read) / roof["bandwidth"], flops / peak
        memory, compute = memory + t_memory, compute + t_compute
        floor += max(t_memory, t_compute)
    return {"floor_ms": 1e3 * floor / steps, "memory_ms": 1e3 * memory / steps,
            "compute_ms": 1e3 * compute / steps,
            "gflop": sum(k[3] for k in kernels) / 1e9 / steps}


def summarize(kernels, steps=1, card="h200", batch=None):
    """Kernels, MiB (the ``*_mb`` fields count 2**20 bytes) and the roofline estimate per
    training step of a loop body holding ``steps`` steps (the scan's unroll); ``batch`` adds
    the estimate's images/s."""
    parts = collections.defaultdict(lambda: [0, 0, 0])
    for part, written, read, *_ in kernels:
        parts[part][0] += 1
        parts[part][1] += written
        parts[part][2] += read
    mb = 2**20 * steps
    roofline = roofline_ms(kernels, card, steps)
    if batch:
        roofline["ceiling_images_per_s"] = batch / (roofline["floor_ms"] / 1e3)
    return {"kernels": len(kernels) / steps, "written_mb": sum(k[1] for k in kernels) / mb,
            "read_mb": sum(k[2] for k in kernels) / mb, "roofline": roofline,
            "parts": {p: {"kernels": c / steps, "written_mb": w / mb, "read_mb": r / mb}
                      for p, (c, w, r) in sorted(parts.items(),
                                                 key=lambda kv: -kv[1][1] - kv[1][2])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
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
    parser.add_argument("--launches", action="store_true",
                        help="also read XLA's thunk sequence (a dump in a temporary folder): "
                             "CUDA graphs and thunks launched outside them, per step")
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
        with tempfile.TemporaryDirectory() as dump:
            dump_options = ({"xla_dump_to": dump, "xla_dump_hlo_module_re": "train_steps"}
                            if args.launches else {})
            hlo = lowered.compile(compiler_options={**options, "xla_gpu_autotune_level": 0,
                                                    **dump_options}).as_text()
            thunks = sorted(glob.glob(os.path.join(
                dump, "*train_steps.thunk_sequence_after_thunk_passes.txt")))
            thunk_text = Path(thunks[-1]).read_text() if thunks else None
        if args.launches and thunk_text is None:
            sys.exit("--launches: XLA wrote no thunk sequence (this jaxlib does not dump one?)")
        if args.hlo_dir:
            atomic_write_bytes(os.path.join(args.hlo_dir, f"{name}.hlo.txt.gz"),
                               gzip.compress(hlo.encode()))
        steps = variant_unroll(name, "gpu")  # training steps in the loop body
        summary = summarize(step_kernels(hlo), steps=steps, card=args.card, batch=args.batch)
        if thunk_text is not None:
            summary["launches"] = loop_launches(thunk_text, steps=steps)
        report["variants"][name] = summary
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"\n{name}: {summary['kernels']:g} kernels per step, "
              f"{summary['written_mb']:,.0f} MiB written, {summary['read_mb']:,.0f} MiB read "
              "(operands whole, or their static slices)", flush=True)
        r = summary["roofline"]
        print(f"roofline ({args.card}): {r['gflop']:,.1f} GFLOP and the bytes above: "
              f"{r['compute_ms']:.2f} ms at the tensor-core peak, {r['memory_ms']:.2f} ms at "
              f"the HBM bandwidth, {r['floor_ms']:.2f} ms per step kernel by kernel: at most "
              f"~{r['ceiling_images_per_s']:,.0f} img/s")
        if "launches" in summary:
            launches = summary["launches"]
            outside = ", ".join(f"{count:g} {kind[1:]}"
                                for kind, count in launches["outside"].items())
            print("launches: the whole call is one CUDA graph" if launches["one_graph"] else
                  f"launches per step in the loop: {launches['graphs']:g} CUDA graphs, outside "
                  f"them {outside or 'nothing'}")
        if args.top > 0:
            print("| part | kernels | MiB written | MiB read |\n| --- | --- | --- | --- |")
        for part, v in list(summary["parts"].items())[:args.top]:
            print(f"| {part} | {v['kernels']:g} | {v['written_mb']:,.0f} | {v['read_mb']:,.0f} |")


if __name__ == "__main__":
    main()
