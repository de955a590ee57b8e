"""benchmarks/hlo_static.py: its reading of XLA:GPU's optimised HLO (kernels, bytes, FLOPs)
and the roofline arithmetic, on a hand-written loop body in the format XLA:GPU prints (the
real one needs the CUDA compiler: benchmarks/NOTES.md has its figures)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
hlo_static = pytest.importorskip("hlo_static")

_OP = 'metadata={op_name="jit(train_steps)/while/body/jvp(ResNet)/Bottleneck_0/'
# One loop body: a 3x3 convolution (64 -> 64 channels, 8 x 32 x 32), its input and filter
# gradients, a 1x1 stride-2 projection, a BatchNorm reduction and a Triton GEMM fusion.
BODY = f"""HloModule jit_train_steps

%fused_reduce (param_0: bf16[8,32,32,64]) -> f32[64] {{
  %param_0 = bf16[8,32,32,64]{{3,2,1,0}} parameter(0)
  %convert = f32[8,32,32,64]{{3,2,1,0}} convert(%param_0)
  %c = f32[] constant(0)
  ROOT %reduce = f32[64]{{0}} reduce(%convert, %c), dimensions={{0,1,2}}, to_apply=%add
}}

%gemm_computation (param_0: bf16[8,2048], param_1: bf16[2048,10]) -> f32[8,10] {{
  %param_0 = bf16[8,2048]{{1,0}} parameter(0)
  %param_1 = bf16[2048,10]{{1,0}} parameter(1)
  ROOT %dot = f32[8,10]{{1,0}} dot(%param_0, %param_1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

%while_body (param: (bf16[8,32,32,64], bf16[64,3,3,64])) -> (bf16[8,32,32,64]) {{
  %param = (bf16[8,32,32,64]{{3,2,1,0}}, bf16[64,3,3,64]{{3,2,1,0}}) parameter(0)
  %x = bf16[8,32,32,64]{{3,2,1,0}} get-tuple-element(%param), index=0
  %w = bf16[64,3,3,64]{{3,2,1,0}} get-tuple-element(%param), index=1
  %p = bf16[128,1,1,64]{{3,2,1,0}} constant({{...}})
  %a = bf16[8,2048]{{1,0}} constant({{...}})
  %b = bf16[2048,10]{{1,0}} constant({{...}})
  %conv = (bf16[8,32,32,64]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x, %w), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", {_OP}Conv_0/conv"}}
  %y = bf16[8,32,32,64]{{3,2,1,0}} get-tuple-element(%conv), index=0
  %proj = (bf16[8,16,16,128]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%y, %p), window={{size=1x1 stride=2x2}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", {_OP}Conv_1/conv"}}
  %input_reduce_fusion = f32[64]{{0}} fusion(%y), kind=kInput, calls=%fused_reduce, {_OP}BatchNorm_0/reduce_sum"}}
  %dx = (bf16[8,32,32,64]{{3,2,1,0}}, u8[1024]{{0}}) custom-call(%y, %w), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", {_OP}Conv_0/transpose"}}
  %dw = (bf16[64,3,3,64]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x, %y), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", {_OP}Conv_0/transpose"}}
  %logits = f32[8,10]{{1,0}} fusion(%a, %b), kind=kCustom, calls=%gemm_computation, {_OP}Dense_0/dot_general"}}
  ROOT %out = (bf16[8,32,32,64]{{3,2,1,0}}) tuple(%y)
}}
"""
CONV3 = 2 * 8 * 32 * 32 * 64 * (64 * 3 * 3)  # 2 N H W x O kh kw I
PROJ = 2 * 8 * 16 * 16 * 128 * 64
GEMM = 2 * 8 * 10 * 2048
ACT = 8 * 32 * 32 * 64 * 2  # bytes of one bf16 activation


def test_conv_flops_counts_the_output_positions_and_the_kernel():
    assert hlo_static.conv_flops("b01f_o01i->b01f", [8, 32, 32, 64], [64, 3, 3, 64]) == CONV3
    # Stride 2: the output's positions count, not the input's.
    assert hlo_static.conv_flops("b01f_o01i->b01f", [8, 16, 16, 128], [128, 1, 1, 64]) == PROJ
    # Channels-first output labels.
    assert hlo_static.conv_flops("bf01_oi01->bf01", [8, 64, 32, 32], [64, 64, 3, 3]) == CONV3


def test_step_kernels_reads_each_kernel():
    kernels = hlo_static.step_kernels(BODY)
    assert [k[0] for k in kernels] == [
        "library __cudnn$convForward", "library __cudnn$convForward",
        "forward BatchNorm reduction", "library __cudnn$convBackwardInput",
        "library __cudnn$convBackwardFilter", "forward dot_general elementwise"]
    flops = [k[3] for k in kernels]
    # Each gradient costs the forward convolution's FLOPs; the reduction none.
    assert flops == [CONV3, PROJ, 0, CONV3, CONV3, GEMM]
    weights = 64 * 3 * 3 * 64 * 2
    conv, proj, stats, dx, dw, gemm = kernels
    assert conv[1:3] == (ACT, ACT + weights)
    assert stats[1:3] == (64 * 4, ACT)
    assert dx[1:3] == (ACT, ACT + weights)  # the u8 workspace is not traffic
    assert dw[1:3] == (weights, 2 * ACT)
    assert {k[4] for k in kernels} == {"bf16"}


def test_roofline_takes_the_longer_of_memory_and_compute_per_kernel():
    kernels = [("a", 100, 300, 0, "bf16"), ("b", 0, 0, 2000, "bf16"),
               ("c", 10, 10, 1000, "f32"), ("d", 40, 0, 1, "f16")]
    roof = {"bandwidth": 100.0, "bf16": 1000.0, "f32": 500.0}
    hlo_static.ROOFS["test"] = roof
    try:
        r = hlo_static.roofline_ms(kernels, "test", steps=2)
    finally:
        del hlo_static.ROOFS["test"]
    # Seconds per kernel: a 4 (memory), b 2 (compute), c max(0.2, 2) = 2 (TF32 rate),
    # d max(0.4, 0.001) = 0.4; two steps in the body.
    assert r["floor_ms"] == pytest.approx(1e3 * (4 + 2 + 2 + 0.4) / 2)
    assert r["memory_ms"] == pytest.approx(1e3 * (4 + 0.2 + 0.4) / 2)
    assert r["compute_ms"] == pytest.approx(1e3 * (2 + 2 + 0.001) / 2)
    assert r["gflop"] == pytest.approx(3001 / 1e9 / 2)


def test_summarize_per_step_and_the_ceiling():
    kernels = hlo_static.step_kernels(BODY)
    one = hlo_static.summarize(kernels, steps=1, card="h200", batch=8)
    two = hlo_static.summarize(kernels + kernels, steps=2, card="h200", batch=8)
    assert one["kernels"] == two["kernels"] == 6
    assert one["roofline"]["floor_ms"] == pytest.approx(two["roofline"]["floor_ms"])
    assert one["roofline"]["gflop"] == pytest.approx((3 * CONV3 + PROJ + GEMM) / 1e9)
    assert one["roofline"]["ceiling_images_per_s"] == pytest.approx(
        8 / (one["roofline"]["floor_ms"] / 1e3))


# XLA's thunk sequence after its passes (the format of jaxlib 0.11's dump, shortened): a
# loop body of two steps with graphs split by convolutions, and a loop inside one graph.
SPLIT = """000: kCommandBuffer [source | next=129 (1)]
    001: kCustomKernel [source | sink] loop_add_fusion grid: [1, 1, 1]
128: kConvolution  [prev=000 (1) | next=129 (1)] kConvolution
129: kWhile         [prev=128 (1) | next=000 (1)]
condition:
    130: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
  body:
    000: kCommandBuffer [source | next=208 (1)]
        131: kCustomKernel [source | sink] loop_multiply_fusion grid: [1, 1, 1]
    208: kConvolution  [prev=000 (1) | next=209 (1)] kConvolution
    209: kCustomKernel [prev=208 (1) | next=000 (1)] input_reduce_fusion grid: [8, 1, 1]
    000: kCommandBuffer [prev=209 (1) | next=214 (1)]
        210: kCustomKernel [source | sink] loop_add_fusion_2 grid: [1, 1, 1]
        211: kConvolution  [source | sink] kConvolution
    214: kConvolution  [prev=000 (1) | sink] kConvolution
"""
ONE_GRAPH = """000: kCommandBuffer [source | sink]
    001: kCopy         [source | next=129 (128)] kCopy
    129: kWhile        [prev=128 (1) | next=1836 (1)]
    condition:
        130: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
      body:
        131: kConvolution [source | sink] kConvolution
"""


def test_loop_launches_counts_graphs_and_what_runs_outside_them_per_step():
    launches = hlo_static.loop_launches(SPLIT, steps=2)
    # The loop condition's kernel and the thunks inside graphs are not launches of the body;
    # the convolution before the loop is not either.
    assert launches == {"graphs": 1.0, "outside": {"kConvolution": 1.0, "kCustomKernel": 0.5},
                        "one_graph": False}
    assert hlo_static.loop_launches(ONE_GRAPH) == {"graphs": 0.0, "outside": {},
                                                   "one_graph": True}


# Fused computations reading a flat f32[1000] buffer: through a conversion and two slices;
# through an update (element-wise) that one slice reaches twice; whole (a reduction); through
# a concatenate's slice.
SLICED = """%fused_slices (param_0: f32[1000], param_1: f32[1000], param_2: f32[]) -> (bf16[10], bf16[30]) {
  %param_0 = f32[1000]{0} parameter(0)
  %convert = bf16[1000]{0} convert(%param_0)
  %a = bf16[10]{0} slice(%convert), slice={[0:10]}
  %b = bf16[30]{0} slice(%convert), slice={[100:130]}
  %param_1 = f32[1000]{0} parameter(1)
  %param_2 = f32[] parameter(2)
  ROOT %t = (bf16[10]{0}, bf16[30]{0}) tuple(%a, %b)
}

%fused_update_slice (param_0: f32[1000], param_1: f32[1000]) -> f32[20] {
  %param_0 = f32[1000]{0} parameter(0)
  %param_1 = f32[1000]{0} parameter(1)
  %m = f32[1000]{0} multiply(%param_0, %param_1)
  %s = f32[1000]{0} subtract(%param_0, %m)
  ROOT %c = f32[20]{0} slice(%s), slice={[500:520]}
}

%fused_whole (param_0: f32[1000], param_1: f32[1000]) -> f32[10] {
  %param_0 = f32[1000]{0} parameter(0)
  %c = f32[] constant(0)
  %r = f32[] reduce(%param_0, %c), dimensions={0}, to_apply=%add
  %param_1 = f32[1000]{0} parameter(1)
  ROOT %s = f32[10]{0} slice(%param_1), slice={[0:10]}
}

%fused_concat_slice (param_0: f32[40], param_1: f32[1000]) -> f32[50] {
  %param_0 = f32[40]{0} parameter(0)
  %param_1 = f32[1000]{0} parameter(1)
  %k = f32[1040]{0} concatenate(%param_0, %param_1), dimensions={0}
  ROOT %s = f32[50]{0} slice(%k), slice={[0:50]}
}
"""


def _computation(name):
    return next(c for c in SLICED.split("\n\n") if c.startswith(f"%{name} "))


def test_sliced_reads_count_what_a_fusion_slices_of_an_operand():
    # Through a conversion: the two slices' elements at f32's 4 bytes; param_1 and param_2
    # are not used (read whole by the caller's count: absent here).
    assert hlo_static._sliced_reads(_computation("fused_slices")) == {0: 4 * 40}
    # param_0 reaches the one slice by two element-wise paths: its 20 elements counted once.
    assert hlo_static._sliced_reads(_computation("fused_update_slice")) == {0: 80, 1: 80}
    # A reduction reads param_0 whole; param_1 only through a slice.
    assert hlo_static._sliced_reads(_computation("fused_whole")) == {1: 40}
    # A concatenate's slice: at most the operand's own elements (param_0 has 40 of the 50).
    assert hlo_static._sliced_reads(_computation("fused_concat_slice")) == {0: 160, 1: 200}


def test_step_kernels_read_a_sliced_operand_as_its_slices():
    body = SLICED + f"""
%while_body (param: (f32[1000], f32[1000])) -> (bf16[10], f32[20]) {{
  %param = (f32[1000]{{0}}, f32[1000]{{0}}) parameter(0)
  %p = f32[1000]{{0}} get-tuple-element(%param), index=0
  %m = f32[1000]{{0}} get-tuple-element(%param), index=1
  %x = bf16[8,32,32,64]{{3,2,1,0}} constant({{...}})
  %w = bf16[64,3,3,64]{{3,2,1,0}} constant({{...}})
  %conv = (bf16[8,32,32,64]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x, %w), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", {_OP}Conv_0/conv"}}
  %f = f32[20]{{0}} fusion(%p, %m), kind=kLoop, calls=%fused_update_slice, {_OP}Conv_0/split"}}
  %g = f32[10]{{0}} fusion(%p, %m), kind=kLoop, calls=%fused_whole, {_OP}Conv_0/split"}}
  ROOT %out = (f32[20]{{0}}, f32[10]{{0}}) tuple(%f, %g)
}}
"""
    _, update, whole = hlo_static.step_kernels(body)
    assert update[1:3] == (80, 80 + 80)
    assert whole[1:3] == (40, 4000 + 40)
