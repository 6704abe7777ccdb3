"""The GPU report's arithmetic: the peak of the math that ran, the refusal of a fraction of peak over
100 %, and the per-kernel projection onto another card, on hand-made kernels with answers worked
out by hand (H200 -> RTX 3090, data-sheet figures, a 3 us launch cost)."""

from types import SimpleNamespace

import pytest
import torch

from tfsdeploy.config import PRESETS
from tfsdeploy.model import build_model
from tfsdeploy.tools.hardware import count_flops, gpu_math, gpu_peak_tflops, tf32_mode
from tfsdeploy.tools.projection import (CARDS, LAUNCH_US, Kernel, attribute_by_name, card_for, check_fraction,
                                        kernel_math, kernels_from_events, math_kind, op_bytes, peak_tflops,
                                        profile_call, project_call, project_fuse, project_kernel, work_ratio)

# H200: 989.5 TFLOP/s fp16, 494.5 TF32, 67 fp32, 4800 GB/s.  RTX 3090: 71, 35.6, 35.6, 936 GB/s.
# Compute-bound: 98.95 GFLOP is 100 us at 989.5 TFLOP/s (100 MB would be 20.8 us at 4.8 TB/s). It
# took 203 us, 200 above the 3 us launch cost: efficiency 0.5. On the 3090: 98.95e9 / 71e12 =
# 1393.662 us of roofline (100 MB: 106.8 us), / 0.5 = 2787.324, + 3 = 2790.324 us.
COMPUTE = Kernel("sm90_xmma_fprop_implicit_gemm_f16f16", 0.0, 203.0, 98.95e9, 1e8, "fp16", "operator")
# Bandwidth-bound: 48 MB is 10 us at 4.8 TB/s (1 MFLOP: 0.001 us). Took 23 us: efficiency 10 / 20.
# On the 3090: 48e6 / 936e9 = 51.282 us, / 0.5 = 102.564, + 3 = 105.564 us.
MEMORY = Kernel("vectorized_elementwise_kernel", 213.0, 23.0, 1e6, 48e6, "fp16", "operator")
# Launch-bound: 4 KB, 2.5 us, under the 3 us launch cost: 3 us on any card.
LAUNCH = Kernel("reduce_kernel", 241.0, 2.5, 0.0, 4096.0, "fp16", "operator")


def test_card_table_is_complete_and_named():
    for card, c in CARDS.items():
        assert set(c) >= {"fp32", "tf32", "fp16", "bf16", "bandwidth_gbs", "source"}, card
        assert c["source"] and c["fp32"] <= c["fp16"] and c["tf32"] <= c["fp16"]
    assert card_for("NVIDIA GeForce RTX 3090") == "RTX 3090"
    assert card_for("NVIDIA H200") == "H200"
    assert card_for("NVIDIA H100 PCIe") == "H100 PCIe"  # the longest match, not plain H100
    assert card_for("NVIDIA A100-SXM4-80GB") == "A100-SXM4-80GB"
    assert card_for("Tesla T4") is None


@pytest.mark.parametrize("dtype,tf32,kind,h200", [
    ("float32", False, "fp32", 67.0),
    ("float32", True, "tf32", 494.5),
    ("float16", False, "fp16", 989.5),
    ("float16", True, "fp16", 989.5),  # TF32 only concerns fp32 tensors
    ("bfloat16", True, "bf16", 989.5),
])
def test_peak_follows_the_math_that_runs(dtype, tf32, kind, h200):
    assert math_kind(dtype, tf32) == kind
    assert peak_tflops("H200", kind) == h200
    assert gpu_peak_tflops("NVIDIA H200", kind) == h200
    assert gpu_peak_tflops("Tesla T4", kind) is None


def test_gpu_math_reads_torch_tf32_switches_and_restores_them():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with tf32_mode(False):
        assert gpu_math(torch.float32) == "fp32"
        assert gpu_math(torch.float16) == "fp16" and gpu_math(torch.bfloat16) == "bf16"
    with tf32_mode(True):
        assert gpu_math(torch.float32) == "tf32"
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_kernel_math_tf32_only_for_kernels_named_for_it():
    assert kernel_math("sm80_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nchw", "tf32") == "tf32"
    assert kernel_math("implicit_convolve_sgemm", "tf32") == "fp32"
    assert kernel_math("sm80_xmma_fprop_implicit_gemm_tf32f32", "fp32") == "fp32"  # TF32 was off
    assert kernel_math("anything", "fp16") == "fp16"


def test_fraction_over_100_percent_fails():
    # The H200 report's eager fp32 at batch 16: 16 x 360 GFLOP in 55.3 ms = 104.2 TFLOP/s, i.e. 155 %
    # of the fp32 SIMT peak (67) and 21 % of the TF32 peak (494.5) that cuDNN actually used.
    achieved = 16 * 360e9 / 55.3e-3 / 1e12
    with pytest.raises(ValueError, match="155% of peak is impossible"):
        check_fraction(achieved / 67.0, "eager fp32, batch 16")
    check_fraction(achieved / 494.5, "eager fp32, batch 16")
    assert achieved / 494.5 == pytest.approx(0.2106, abs=1e-3)
    check_fraction(1.0, "exactly at peak")
    check_fraction(None, "no peak known")


def test_compute_bound_kernel():
    assert project_kernel(COMPUTE, "H200", "RTX 3090") == pytest.approx(2790.324, abs=1e-2)
    assert work_ratio(COMPUTE, "H200", "RTX 3090") == (pytest.approx(13.93662, rel=1e-5), "roofline")


def test_bandwidth_bound_kernel():
    assert project_kernel(MEMORY, "H200", "RTX 3090") == pytest.approx(105.564, abs=1e-2)
    assert work_ratio(MEMORY, "H200", "RTX 3090")[0] == pytest.approx(4800 / 936)


def test_launch_bound_kernel_costs_the_launch_on_any_card():
    assert LAUNCH_US == 3.0
    assert project_kernel(LAUNCH, "H200", "RTX 3090") == 3.0
    assert project_kernel(LAUNCH, "RTX 3090", "H200") == 3.0


def test_call_sums_kernels_and_adds_gaps_only_without_a_graph():
    kernels = [COMPUTE, MEMORY, LAUNCH]
    graph = project_call(kernels, "H200", "RTX 3090", graph=True)
    # 2790.324 + 105.564 + 3 = 2898.888 us
    assert graph["projected_ms"] == pytest.approx(2.898888, abs=1e-5)
    assert graph["gaps_ms"] == 0.0 and graph["kernels"] == 3 and graph["at_launch_floor"] == 1
    eager = project_call(kernels, "H200", "RTX 3090", graph=False)
    # timeline gaps: 203 -> 213 (10 us) and 236 -> 241 (5 us)
    assert eager["gaps_ms"] == pytest.approx(0.015)
    assert eager["projected_ms"] == pytest.approx(2.913888, abs=1e-5)
    measured_idle = project_call(kernels, "H200", "RTX 3090", graph=False, gaps_us=40.0)
    assert measured_idle["projected_ms"] == pytest.approx(2.938888, abs=1e-5)
    assert graph["time_share"]["roofline (operator)"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        project_call([], "H200", "RTX 3090", graph=True)


def test_launch_bound_path_does_not_slow_down_with_the_arithmetic():
    # 1000 tiny kernels of 2.5 us with 20 us of CPU launch time between them: 22.48 ms here.
    # On the 3090 each costs the 3 us launch, and the gaps stay: 3.0 + 19.98 = 22.98 ms, not 14x.
    ks = [Kernel("elementwise_kernel", 22.5 * i, 2.5, 0.0, 8192.0, "fp16", "operator") for i in range(1000)]
    eager = project_call(ks, "H200", "RTX 3090", graph=False)
    assert eager["busy_ms"] + eager["gaps_ms"] == pytest.approx(22.48)
    assert eager["projected_ms"] == pytest.approx(22.98)
    assert project_call(ks, "H200", "RTX 3090", graph=True)["projected_ms"] == pytest.approx(3.0)


def test_tf32_and_fp32_kernels_scale_by_their_own_peaks():
    tf32 = Kernel("sm80_xmma_fprop_tf32f32", 0.0, 103.0, 49.45e9, 1e6, "tf32", "operator")
    simt = Kernel("implicit_convolve_sgemm", 0.0, 103.0, 49.45e9, 1e6, "fp32", "operator")
    assert work_ratio(tf32, "H200", "RTX 3090")[0] == pytest.approx(494.5 / 35.6)  # 13.89x
    assert work_ratio(simt, "H200", "RTX 3090")[0] == pytest.approx(67.0 / 35.6)  # 1.88x
    # 49.45 GFLOP at 494.5 TFLOP/s is 100 us, run in 103 - 3: efficiency 1; 3 + 49.45e9 / 35.6e12
    assert project_kernel(tf32, "H200", "RTX 3090") == pytest.approx(3 + 1389.045, abs=1e-2)


def test_kernels_no_operator_claims_are_scaled_by_their_kind():
    gemm = Kernel("sm90_xmma_gemm_f16f16", 0.0, 13.0, None, None, "fp16", "none")
    copy = Kernel("triton_poi_fused_add_0", 0.0, 13.0, None, None, "fp16", "none")
    assert work_ratio(gemm, "H200", "RTX 3090") == (pytest.approx(989.5 / 71), "assumed compute-bound")
    assert work_ratio(copy, "H200", "RTX 3090") == (pytest.approx(4800 / 936), "assumed memory-bound")
    share = project_call([gemm, copy], "H200", "RTX 3090", graph=True)["time_share"]
    assert share == {"assumed compute-bound": 0.5, "assumed memory-bound": 0.5}


def test_projected_fuse_adds_the_sampler_time_measured_here():
    # 10 calls of 8 ms took 87 ms: 7 ms of sampler; 10 x 20 ms + 7 = 207 ms, batch 2 -> 9.66 slices/s
    f = project_fuse(8.0, 20.0, 87.0, 10, 2)
    assert f["fuse_ms"] == pytest.approx(207.0) and f["sampler_ms"] == pytest.approx(7.0)
    assert f["slices_per_s"] == pytest.approx(2 / 0.207)


def test_op_bytes_from_shapes():
    # conv 64 -> 128 channels, 3x3, 32x32, fp16: 2*128*32*32*64*9 FLOPs; output = FLOPs / (2*64*9)
    # = 131072 elements; bytes = 2 * (65536 + 73728 + 128 + 131072) = 540928
    flops = 2 * 128 * 32 * 32 * 64 * 9
    assert op_bytes("aten::conv2d", [[1, 64, 32, 32], [128, 64, 3, 3], [128], [], [], [], []], flops, 2) == 540928
    # addmm(bias[128], a[4,64], b[64,128]) in fp32: output 4x128; 4 * (128 + 256 + 8192 + 512) = 36352
    assert op_bytes("aten::addmm", [[128], [4, 64], [64, 128], [], []], 2 * 4 * 64 * 128, 4) == 36352
    # linear(x[4,64], w[128,64], bias[128]) in fp16: output 4x128; 2 * (256 + 8192 + 128 + 512) = 18176
    assert op_bytes("aten::linear", [[4, 64], [128, 64], [128]], 2 * 4 * 64 * 128, 2) == 18176
    # silu of 65536 fp16 elements: read and write them, 262144 bytes
    assert op_bytes("aten::silu", [[1, 64, 32, 32]], 0, 2) == 262144


def _op(id, name, start, end, flops=0, shapes=(), parent=None, dtypes=None):
    e = SimpleNamespace(id=id, name=name, device_type=SimpleNamespace(name="CPU"),
                        time_range=SimpleNamespace(start=start, end=end), flops=flops, input_shapes=list(shapes),
                        input_dtypes=dtypes, cpu_parent=parent, cpu_children=[], linked_correlation_id=0)
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def _kernel(name, start, end, linked, activity="kernel", annotation=False):
    return SimpleNamespace(id=1000 + int(start), name=name, device_type=SimpleNamespace(name="CUDA"),
                           time_range=SimpleNamespace(start=start, end=end), flops=0, input_shapes=[],
                           cpu_parent=None, cpu_children=[], linked_correlation_id=linked,
                           activity_type=activity, is_user_annotation=annotation)


def test_kernels_from_a_cuda_profile():
    flops = 2 * 128 * 32 * 32 * 64 * 9
    conv = _op(1, "aten::conv2d", 0, 50, flops, [[1, 64, 32, 32], [128, 64, 3, 3], [128]], dtypes=["float"] * 3)
    cudnn = _op(2, "aten::cudnn_convolution", 5, 45, parent=_op(9, "aten::convolution", 2, 48, parent=conv))
    silu = _op(3, "aten::silu", 60, 70, 0, [[1, 128, 32, 32]], dtypes=["float"])
    events = [conv, cudnn, cudnn.cpu_parent, silu,
              _kernel("sm80_xmma_fprop_implicit_gemm_tf32f32", 100, 130, 2),  # launched by cudnn_convolution
              _kernel("nchwToNhwcKernel", 90, 100, 2),
              _kernel("vectorized_elementwise_kernel<silu>", 140, 150, 3),
              _kernel("sm80_xmma_fprop_implicit_gemm_tf32f32", 200, 230, 77)]  # a graph replay: no operator
    ks = kernels_from_events(events, "cuda", "tf32", 2)
    assert [k.name for k in ks][:2] == ["nchwToNhwcKernel", "sm80_xmma_fprop_implicit_gemm_tf32f32"]
    conv_bytes = 4 * (65536 + 73728 + 128 + 131072)  # float inputs: 4 bytes, from the recorded dtypes
    assert ks[0].flops == pytest.approx(flops * 10 / 40) and ks[1].flops == pytest.approx(flops * 30 / 40)
    assert ks[1].bytes == pytest.approx(conv_bytes * 30 / 40)
    assert (ks[0].math, ks[1].math, ks[2].math) == ("fp32", "tf32", "fp32")
    assert ks[2].bytes == 2 * 4 * 131072 and ks[2].source == "operator"
    assert ks[3].source == "none" and ks[3].flops is None
    # the unclaimed replay borrows the per-microsecond FLOPs and bytes of the same kernel above
    named = attribute_by_name(ks, ks)
    assert named[3].source == "by name" and named[3].flops == pytest.approx(ks[1].flops)
    assert named[:3] == ks[:3]


def test_device_side_annotations_are_not_kernels():
    """torch.profiler puts device-side ranges on the GPU's timeline beside the kernels: a compiled
    region's span ("Torch-Compiled Region") or a record_function range. They carry the device type
    CUDA but are no work; only kernels, copies and fills are."""
    silu = _op(3, "aten::silu", 60, 70, 0, [[1, 128, 32, 32]], dtypes=["float"])
    events = [silu,
              _kernel("Torch-Compiled Region: 0/0", 95, 200, 0, activity="gpu_user_annotation"),
              _kernel("my range", 96, 199, 3, activity="gpu_user_annotation", annotation=True),
              _kernel("vectorized_elementwise_kernel<silu>", 100, 110, 3),
              _kernel("Memcpy HtoD (Pageable -> Device)", 120, 125, 0, activity="gpu_memcpy"),
              _kernel("Memset (Device)", 130, 131, 0, activity="gpu_memset")]
    ks = kernels_from_events(events, "cuda", "fp16", 2)
    assert [k.name for k in ks] == ["vectorized_elementwise_kernel<silu>", "Memcpy HtoD (Pageable -> Device)",
                                    "Memset (Device)"]
    # the operator's bytes go to its one kernel, not shared with the annotation that spans it
    assert ks[0].bytes == 2 * 4 * 131072 and ks[0].source == "operator"
    # the busy time is the kernels' own: 16 us, not the annotations' 208 us on top
    assert sum(k.dur_us for k in ks) == 16
    # an event without an activity type (an older torch): kept unless marked as an annotation
    old = [_kernel("k", 0, 5, 0, activity=None), _kernel("a", 0, 9, 0, activity=None, annotation=True)]
    assert [k.name for k in kernels_from_events(old, "cuda", "fp16", 2)] == ["k"]


def test_kernels_from_a_cpu_profile_are_top_level_operators():
    conv = _op(1, "aten::conv2d", 0, 50, 100, [[1, 4, 8, 8], [4, 4, 1, 1]])
    _op(2, "aten::mkldnn_convolution", 5, 45, parent=conv)
    lin = _op(3, "aten::linear", 60, 70, 0, [[2, 8], [4, 8]])
    _op(4, "aten::addmm", 61, 69, 128, parent=lin)
    ks = kernels_from_events([conv, conv.cpu_children[0], lin, lin.cpu_children[0]], "cpu", "fp32", 4)
    assert [(k.name, k.flops) for k in ks] == [("aten::conv2d", 100), ("aten::linear", 128)]
    assert ks[1].bytes == 4 * (16 + 32 + 8)  # output 2x4 = FLOPs / (2 * 8)


def test_profile_call_on_the_cpu_reads_a_real_profile():
    model = build_model(PRESETS["tiny"]).eval()
    args = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 5, 32, 32), torch.full((1,), 0.5))
    with torch.no_grad():
        ks = profile_call(lambda: model(*args), cuda=False, math="fp32", elem_size=4)
    assert ks and all(k.source == "operator" and k.dur_us >= 0 for k in ks)
    conv = sum(k.flops for k in ks if k.name == "aten::conv2d")
    # every convolution FLOP that torch's FLOP counter sees, and no more
    assert 0.9 * count_flops(model, 1, 32) <= conv <= count_flops(model, 1, 32)


def test_unknown_dtype_has_no_math_kind():
    with pytest.raises(ValueError, match="int8"):
        math_kind("int8", True)


def test_kernel_faster_than_its_dram_roofline_is_counted():
    # 48 MB in 5 us above the launch: 9.6 TB/s, twice the H200's DRAM bandwidth (an L2-resident tensor)
    fast = Kernel("vectorized_elementwise_kernel", 0.0, 8.0, 0.0, 48e6, "fp16", "operator")
    proj = project_call([fast, MEMORY], "H200", "RTX 3090", graph=True)
    assert proj["over_roofline"] == 1
    # still projected at its own efficiency: 3 + 5 us x 4800 / 936
    assert project_kernel(fast, "H200", "RTX 3090") == pytest.approx(3 + 5 * 4800 / 936)


def test_kernel_rows_round_trip_through_json():
    import json

    for k in (COMPUTE, MEMORY, LAUNCH, Kernel("k", 1.5, 2.0, None, None, "tf32", "none")):
        assert Kernel.from_row(json.loads(json.dumps(k.as_row()))) == k
