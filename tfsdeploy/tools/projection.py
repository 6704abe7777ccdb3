"""Projecting a measured denoiser call onto a GPU that is not here, kernel by kernel.

Pure logic (no torch at import): the data-sheet table of the cards, the peak of the math that ran
(fp16 / bf16 tensor, TF32 tensor or fp32 SIMT), the check that refuses a fraction of peak above
100 %, the per-kernel projection, and the reading of a torch.profiler event list into kernels.

The model of one kernel: a fixed launch cost L plus its work. On the measuring card the work took
`measured - L` and its roofline time there is R_src = max(FLOPs / peak, bytes / bandwidth), so the
kernel ran at efficiency e = R_src / (measured - L). On the target card it takes

    L + R_dst / e          (just L when the kernel took no longer than L here)

The call is the sum over its kernels, plus the measured time the GPU sat idle between kernels when
no CUDA graph replays them (that time is the CPU issuing launches, which a slower GPU does not slow).

    kernels = profile_call(lambda: denoiser(x_t, cond, level), cuda=True, math="fp16", elem_size=2)
    proj = project_call(kernels, "H200", "RTX 3090", graph=True)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

# Dense peaks in TFLOP/s (tensor-core figures without sparsity, fp16/bf16 with fp32 accumulation,
# which is what cuBLAS and cuDNN use for torch's half-precision layers) and DRAM bandwidth in GB/s.
CARDS: dict[str, dict] = {
    "H200": {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5, "bandwidth_gbs": 4800.0,
             "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM; sparse figures halved)"},
    "H100": {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5, "bandwidth_gbs": 3350.0,
             "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5; sparse figures halved)"},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.5, "bf16": 756.5, "bandwidth_gbs": 2000.0,
                  "source": "NVIDIA H100 Tensor Core GPU datasheet (PCIe; sparse figures halved)"},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5, "bandwidth_gbs": 3900.0,
                 "source": "NVIDIA H100 Tensor Core GPU datasheet (NVL; sparse figures halved)"},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "bandwidth_gbs": 1555.0,
             "source": "NVIDIA A100 Tensor Core GPU datasheet (40 GB)"},
    "A100 80GB PCIe": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "bandwidth_gbs": 1935.0,
                       "source": "NVIDIA A100 Tensor Core GPU datasheet (80 GB PCIe)"},
    "A100-SXM4-80GB": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "bandwidth_gbs": 2039.0,
                       "source": "NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM)"},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.05, "bf16": 362.05, "bandwidth_gbs": 864.0,
             "source": "NVIDIA L40S GPU datasheet (sparse figures halved)"},
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "fp16": 71.0, "bf16": 71.0, "bandwidth_gbs": 936.0,
                 "source": "NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix table for the GeForce "
                           "RTX 3090 (dense; fp16 and bf16 with fp32 accumulation)"},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2, "bandwidth_gbs": 1008.0,
                 "source": "NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix table for the GeForce "
                           "RTX 4090 (dense; fp16 and bf16 with fp32 accumulation)"},
}
MATH_KINDS = {"fp32": "fp32 SIMT", "tf32": "TF32 tensor", "fp16": "fp16 tensor", "bf16": "bf16 tensor"}

# The cost of one kernel that does nothing, the same on every recent card: launching null kernels
# costs about 3 us each on recent hardware and software.
LAUNCH_US = 3.0
LAUNCH_SOURCE = ("about 3 us per null-kernel launch on recent NVIDIA hardware and software, NVIDIA Developer "
                 "Forums, 'Too much time for kernel launch latency' "
                 "(https://forums.developer.nvidia.com/t/too-much-time-for-kernel-launch-latency/233645)")

# Kernels whose name says matrix or convolution math; the others move memory. Used only for kernels
# the profile could not tie to an operator (CUDA-graph replays, generated kernels).
_MATH_NAME = re.compile(r"gemm|conv|cutlass|xmma|wgmma|hmma|fprop|fmha|flash|attention|matmul", re.I)
_ELEM = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4, "bool": 1}


def card_for(device_name: str) -> str | None:
    """The table's card for a device name such as 'NVIDIA GeForce RTX 3090' (the longest key that
    the name contains), or None."""
    keys = [k for k in CARDS if k in device_name]
    return max(keys, key=len) if keys else None


def math_kind(dtype: str, tf32: bool) -> str:
    """The math a layer of this dtype runs on a GPU: 'fp16' or 'bf16' (tensor cores), 'tf32' (fp32
    tensors on TF32 tensor cores, when torch allows it) or 'fp32' (SIMT)."""
    dtype = dtype.replace("torch.", "")
    kinds = {"float32": "fp32", "fp32": "fp32", "float": "fp32", "float16": "fp16", "fp16": "fp16",
             "half": "fp16", "bfloat16": "bf16", "bf16": "bf16"}
    if dtype not in kinds:
        raise ValueError(f"no GPU math kind for dtype {dtype!r}")
    kind = kinds[dtype]
    return "tf32" if kind == "fp32" and tf32 else kind


def peak_tflops(card: str, kind: str) -> float:
    return CARDS[card][kind]


def check_fraction(fraction: float | None, what: str) -> None:
    """A fraction of peak above 100 % is a bug in the report (a wrong peak, a wrong FLOP count or a
    wrong time), never a result: refuse it."""
    if fraction is not None and fraction > 1.0:
        raise ValueError(f"{what}: {100 * fraction:.0f}% of peak is impossible; the peak, the FLOP count "
                         "or the timing is wrong")


def kernel_math(name: str, path_kind: str) -> str:
    """A kernel's math: the path's, except that with TF32 allowed only kernels named for TF32 ran on
    tensor cores (cuDNN and cuBLAS put 'tf32' in those names); the rest of an fp32 path is SIMT."""
    if path_kind == "tf32":
        return "tf32" if "tf32" in name.lower() else "fp32"
    return path_kind


@dataclass
class Kernel:
    """One GPU kernel (or, profiled on a CPU, one top-level operator) of a call. Times in
    microseconds. flops and bytes are None when nothing tied the kernel to an operator."""

    name: str
    start_us: float
    dur_us: float
    flops: float | None
    bytes: float | None
    math: str
    source: str  # "operator", "by name", or "none"

    def as_row(self) -> list:
        return [self.name, round(self.start_us, 3), round(self.dur_us, 3), self.flops, self.bytes, self.math,
                self.source]

    @classmethod
    def from_row(cls, row: list) -> "Kernel":
        return cls(*row)


def roofline_us(card: str, flops: float, nbytes: float, kind: str) -> float:
    c = CARDS[card]
    return max(flops / (c[kind] * 1e12), nbytes / (c["bandwidth_gbs"] * 1e9)) * 1e6


def work_ratio(k: Kernel, src: str, dst: str) -> tuple[float, str]:
    """How much longer the kernel's work takes on `dst` than on `src` at the same efficiency, and
    the rule that said so."""
    if k.flops is not None and k.bytes is not None and (k.flops > 0 or k.bytes > 0):
        return roofline_us(dst, k.flops, k.bytes, k.math) / roofline_us(src, k.flops, k.bytes, k.math), "roofline"
    if _MATH_NAME.search(k.name):
        return CARDS[src][k.math] / CARDS[dst][k.math], "assumed compute-bound"
    return CARDS[src]["bandwidth_gbs"] / CARDS[dst]["bandwidth_gbs"], "assumed memory-bound"


def project_kernel(k: Kernel, src: str, dst: str, launch_us: float = LAUNCH_US) -> float:
    """The kernel's time on `dst` in us: L + R_dst / e, with e = R_src / (measured - L)."""
    return launch_us + max(0.0, k.dur_us - launch_us) * work_ratio(k, src, dst)[0]


def timeline_gaps_us(kernels: list[Kernel]) -> float:
    """Time between the end of one kernel and the start of the next, summed (the GPU idle)."""
    ks = sorted(kernels, key=lambda k: k.start_us)
    return sum(max(0.0, b.start_us - (a.start_us + a.dur_us)) for a, b in zip(ks, ks[1:]))


def project_call(kernels: list[Kernel], src: str, dst: str, graph: bool, gaps_us: float | None = None,
                 launch_us: float = LAUNCH_US) -> dict:
    """One call on `dst`: the sum of its projected kernels, plus the idle time between kernels when
    no CUDA graph replays them (`gaps_us`, else the profile's own timeline gaps)."""
    if not kernels:
        raise ValueError("no kernels to project")
    gaps = 0.0 if graph else (timeline_gaps_us(kernels) if gaps_us is None else gaps_us)
    total, busy, shares, at_floor, over = 0.0, 0.0, {}, 0, 0
    for k in kernels:
        ratio, rule = work_ratio(k, src, dst)
        total += launch_us + max(0.0, k.dur_us - launch_us) * ratio
        busy += k.dur_us
        at_floor += k.dur_us <= launch_us
        rule = rule if rule != "roofline" else f"roofline ({k.source})"
        shares[rule] = shares.get(rule, 0.0) + k.dur_us
        if rule.startswith("roofline") and k.dur_us > launch_us and \
                roofline_us(src, k.flops, k.bytes, k.math) > k.dur_us - launch_us:
            over += 1  # faster than DRAM allows: cache hits, or the bytes are overcounted
    return {"source_card": src, "card": dst, "graph": graph, "kernels": len(kernels), "busy_ms": busy / 1e3,
            "gaps_ms": gaps / 1e3, "at_launch_floor": at_floor, "over_roofline": over,
            "projected_ms": (total + gaps) / 1e3, "launch_us": launch_us,
            "time_share": {r: t / busy if busy else 0.0 for r, t in shares.items()}}


def project_fuse(call_ms: float, projected_call_ms: float, fuse_ms: float, steps: int, batch: int) -> dict:
    """A DDIM fuse on the target card: `steps` projected calls plus the sampler's own work as
    measured here (small elementwise kernels and launches, which a slower card hardly slows)."""
    sampler_ms = max(0.0, fuse_ms - steps * call_ms)
    ms = steps * projected_call_ms + sampler_ms
    return {"fuse_ms": ms, "slices_per_s": batch / ms * 1e3, "sampler_ms": sampler_ms}


# ------------------------------------------------------------------ reading a torch.profiler profile
def op_bytes(name: str, shapes: list, flops: float, elem_size: int) -> float:
    """Bytes an operator moves at the least: its tensor inputs read once and its output written once.
    The profiler records input shapes only, so the output comes from the FLOPs where the operator
    multiplies (FLOPs / 2K, K the reduced length), else it is the size of the largest input."""
    tensors = [s for s in shapes if s and all(isinstance(d, int) for d in s)]
    sizes = [math.prod(s) for s in tensors]
    out = max(sizes, default=0)
    if flops > 0 and tensors:
        if "conv" in name and len(tensors) > 1:
            k = math.prod(tensors[1][1:])  # weight [C_out, C_in / groups, kh, kw]
        elif name.endswith(("addmm", "baddbmm")) and len(tensors) > 1:
            k = tensors[1][-1]  # (bias, a, b)
        elif name.endswith(("mm", "bmm", "linear", "matmul")):
            k = tensors[0][-1]
        else:
            k = 0
        if k:
            out = flops / (2 * k)
    return float(elem_size * (sum(sizes) + out))


def _device(e) -> str:
    return getattr(e.device_type, "name", str(e.device_type).split(".")[-1])


# What the profiler records on a GPU's timeline as work: kernels, copies and fills. Device-side
# ranges a program or torch annotates ("gpu_user_annotation", e.g. "Torch-Compiled Region") sit on the
# same timeline, spanning the kernels inside them, and are no kernels.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def _is_device_work(e) -> bool:
    """A kernel, memcpy or memset on the GPU, by the event's activity type (its device type alone
    also admits annotations). Without an activity type (older torch), anything on the GPU that is
    not a user annotation."""
    if _device(e) != "CUDA" or getattr(e, "is_user_annotation", False):
        return False
    kind = getattr(e, "activity_type", None)
    return kind is None or kind in DEVICE_WORK


def _top_op(op):
    """The outermost aten operator above `op` (the one the model called), or None."""
    top = op if op.name.startswith("aten::") else None
    p = op.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            top = p
        p = p.cpu_parent
    return top


def _subtree_flops(op) -> float:
    return float(op.flops or 0) + sum(_subtree_flops(c) for c in op.cpu_children)


def kernels_from_events(events: Iterable, device: str, math: str, elem_size: int) -> list[Kernel]:
    """Kernels of a torch.profiler event list (`prof.events()`, recorded with record_shapes and
    with_flops). On CUDA: the device's kernel, memcpy and memset events (DEVICE_WORK; never the
    device-side annotations beside them), each tied through its correlation id to the operator that
    launched it, then to the outermost aten operator above that one; that operator's FLOPs (its own
    and its children's) and bytes (from its input shapes) are shared among its kernels by their
    time. On a CPU: the top-level aten operators themselves."""
    events = list(events)
    units = []
    if device == "cuda":
        ops = {e.id: e for e in events if _device(e) == "CPU" and e.name.startswith("aten::")}
        for e in events:
            if _is_device_work(e):
                op = ops.get(getattr(e, "linked_correlation_id", 0) or None)
                units.append((e, _top_op(op) if op is not None else None))
    else:
        units = [(e, e) for e in events
                 if _device(e) == "CPU" and e.name.startswith("aten::") and _top_op(e) is e]
    time_of: dict[int, float] = {}
    for e, top in units:
        if top is not None:
            time_of[id(top)] = time_of.get(id(top), 0.0) + (e.time_range.end - e.time_range.start)
    out = []
    for e, top in units:
        dur = e.time_range.end - e.time_range.start
        kind = kernel_math(e.name, math)
        if top is None:
            out.append(Kernel(e.name, e.time_range.start, dur, None, None, kind, "none"))
            continue
        dtypes = getattr(top, "input_dtypes", None) or []
        size = next((_ELEM[d] for d in dtypes if d in _ELEM), elem_size)
        f = _subtree_flops(top)
        share = dur / time_of[id(top)] if time_of[id(top)] > 0 else 1.0
        out.append(Kernel(e.name, e.time_range.start, dur, f * share,
                          op_bytes(top.name, top.input_shapes or [], f, size) * share, kind, "operator"))
    return sorted(out, key=lambda k: k.start_us)


def attribute_by_name(kernels: list[Kernel], reference: list[Kernel]) -> list[Kernel]:
    """Give kernels that no operator claimed (CUDA-graph replays) the FLOPs and bytes per
    microsecond that kernels of the same name carried in a profile where operators claimed them."""
    rates: dict[str, list[float]] = {}
    for r in reference:
        if r.source == "operator" and r.dur_us > 0:
            acc = rates.setdefault(r.name, [0.0, 0.0, 0.0])
            acc[0] += r.flops
            acc[1] += r.bytes
            acc[2] += r.dur_us
    out = []
    for k in kernels:
        if k.source == "none" and k.name in rates:
            f, b, t = rates[k.name]
            k = Kernel(k.name, k.start_us, k.dur_us, f / t * k.dur_us, b / t * k.dur_us, k.math, "by name")
        out.append(k)
    return out


def profile_call(fn: Callable[[], object], cuda: bool, math: str, elem_size: int) -> list[Kernel]:
    """Run `fn` once under torch.profiler (CUDA kernels on a GPU, CPU operators otherwise) and read
    its kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True, with_flops=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return kernels_from_events(prof.events(), "cuda" if cuda else "cpu", math, elem_size)
