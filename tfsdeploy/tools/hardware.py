"""What the machine is and what it can do: device facts, FLOP and byte counts of a denoiser call,
the CPU's FMA peak and measured matrix-multiply kernels, the data-sheet GPU peak of the math that
runs (the table lives in tools/projection.py), memory in use. Shared by `bench`, the sampler study
and the GPU check."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import torch

from tfsdeploy import __version__
from tfsdeploy.tools.projection import CARDS, card_for, math_kind

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _meta_call(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype | None = None) -> None:
    """One denoiser call on the meta device: every operator's output shape and dtype, and no
    arithmetic, so counting the paper model's call at 256x256 takes a fraction of a second where
    running it in fp16 on a CPU took half an hour. The model's own tensors are neither copied nor
    moved: meta stand-ins of its parameters and buffers (in `dtype` where they are floating point,
    else as they are) take their place for this call only."""
    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, device="meta", dtype=dtype if dtype is not None and t.is_floating_point()
                           else t.dtype)

    state = {n: meta(t) for n, t in (*model.named_parameters(), *model.named_buffers())}
    x_dtype = dtype or next(model.parameters()).dtype
    args = (torch.zeros(batch, 3, size, size, device="meta", dtype=x_dtype),
            torch.zeros(batch, 5, size, size, device="meta", dtype=x_dtype),
            torch.full((batch,), 0.5, device="meta"))
    with torch.no_grad():
        torch.func.functional_call(model, state, args)


def count_flops(model: torch.nn.Module, batch: int, size: int) -> int:
    """FLOPs of one denoiser call (torch's FlopCounterMode, on the meta device; a multiply-add
    counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        _meta_call(model, batch, size, torch.float32)
    return int(fc.get_total_flops())


# The CPU's fp32 arithmetic peak: cores x clock x vector lanes x 2 flops per fused multiply-add x
# FMA_PORTS. Two FMA units per core is true of Intel cores since Haswell and AMD cores since Zen 2;
# where a core has fewer or narrower ones (AVX-512 on Zen 4 runs on two 256-bit units; some Xeons
# have one 512-bit unit) this overstates the peak, which keeps it a bound no engine can pass.
FMA_PORTS = 2
FP32_LANES = (("avx512f", 16), ("avx", 8), ("sse", 4))  # the widest vector set the CPU reports


def cpu_fma_peak(cpuinfo: str, max_mhz: float | None = None, cpus: set[int] | None = None) -> dict | None:
    """The fp32 FMA throughput of the CPU that `cpuinfo` (the text of /proc/cpuinfo) describes, counting
    the physical cores among `cpus` (logical CPU numbers; None = all) once each, at the highest clock
    reported (`max_mhz`, cpufreq's maximum, or the largest "cpu MHz", which in a virtual machine is
    often the base clock). None where the CPU names no x86 vector set or no clock (another
    architecture): then only measured kernels give a peak."""
    blocks = [dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
              for block in cpuinfo.split("\n\n") if block.strip()]
    blocks = [b for b in blocks if "processor" in b and (cpus is None or int(b["processor"]) in cpus)]
    if not blocks:
        return None
    flags = set(blocks[0].get("flags", "").split())
    isa, lanes = next(((name, n) for name, n in FP32_LANES if name in flags), (None, 0))
    mhz = max([float(b["cpu MHz"]) for b in blocks if "cpu MHz" in b] + [max_mhz or 0.0])
    if not lanes or not mhz:
        return None
    cores = len({(b.get("physical id"), b.get("core id", b["processor"])) for b in blocks})
    gflops = cores * mhz / 1e3 * lanes * 2 * FMA_PORTS
    return {"gflops": gflops, "cores": cores, "ghz": mhz / 1e3, "isa": isa, "fp32_lanes": lanes,
            "fma_ports": FMA_PORTS,
            "formula": f"{cores} cores x {mhz / 1e3:.2f} GHz x {lanes} fp32 lanes ({isa}) x 2 flops per FMA x "
                       f"{FMA_PORTS} FMA units = {gflops:.0f} GFLOP/s"}


def _max_cpufreq_mhz() -> float | None:
    """The highest clock cpufreq reports for any CPU, in MHz (absent in many virtual machines)."""
    found = []
    for f in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        with contextlib.suppress(OSError, ValueError):
            found.append(int(f.read_text()) / 1e3)
    return max(found, default=None)


def matmul_kernels_gflops(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 3) -> dict[str, float]:
    """Measured fp32 matrix-multiply throughput on the CPU, through torch and through ONNX Runtime's
    MLAS, at each size: {"torch 2048": GFLOP/s, "onnxruntime 512": ..., ...}."""
    out = {}
    session = None
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        def session(n):
            info = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABC"]
            graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", info[:2], info[2:])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return lambda a, b: sess.run(None, {"A": a.numpy(), "B": b.numpy()})
    except ImportError:
        pass
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for name, mm in (("torch", lambda x, y: x @ y), ("onnxruntime", session(n) if session else None)):
            if mm is None:
                continue
            mm(a, b)
            t0 = time.perf_counter()
            for _ in range(repeats):
                mm(a, b)
            out[f"{name} {n}"] = 2 * n**3 / ((time.perf_counter() - t0) / repeats) / 1e9
    return out


def cpu_peak(cpuinfo: str | None = None) -> dict:
    """The peak a CPU engine's "of peak" is taken against, and what it is: the FMA throughput from
    /proc/cpuinfo (cpu_fma_peak), or, where that cannot be read or a measured matrix multiply beats it
    (a clock read too low), the best of the measured kernels (matmul_kernels_gflops)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    fma = cpu_fma_peak(cpuinfo, _max_cpufreq_mhz(), cpus)
    kernels = matmul_kernels_gflops()
    best = max(kernels, key=kernels.get)
    if fma is not None and fma["gflops"] >= kernels[best]:
        return {"peak": fma["gflops"], "source": "fma", "what": f"the CPU's FMA throughput: {fma['formula']}",
                "fma": fma, "kernels": kernels}
    return {"peak": kernels[best], "source": "kernels", "fma": fma, "kernels": kernels,
            "what": f"the best measured kernel: {best}² fp32 matmul"
                    + (f" (above the FMA throughput read from /proc/cpuinfo, {fma['formula']})" if fma else "")}


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB, from /proc."""
    cur = peak = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, peak


def device_info(threads: int) -> dict:
    import subprocess

    info = {"python": platform.python_version(), "torch": torch.__version__, "tfsdeploy": __version__,
            "threads": threads or torch.get_num_threads(), "cpu": _cpu_name(), "logical_cpus": os.cpu_count()}
    for mod in ("onnxruntime", "tensorrt"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: just not recorded
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["compute_capability"] = f"{p.major}.{p.minor}"
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    info["device"] = device_name()
    return info


def device_name() -> str:
    """What a report names the device: the GPU, else the CPU and its logical cores."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).name
    return f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_peak_tflops(name: str, kind: str) -> float | None:
    """Data-sheet dense peak of `kind` ('fp32', 'tf32', 'fp16', 'bf16') on the GPU called `name`."""
    card = card_for(name)
    return CARDS[card][kind] if card else None


def tf32_allowed() -> bool:
    """Whether torch may run fp32 convolutions or matrix products on TF32 tensor cores right now
    (cuDNN convolutions may by default; matrix products may not)."""
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def gpu_math(dtype: torch.dtype) -> str:
    """The math a torch layer of `dtype` runs on the GPU as torch is set now (see math_kind)."""
    return math_kind(str(dtype), tf32_allowed())


@contextlib.contextmanager
def tf32_mode(on: bool | None):
    """TF32 for fp32 convolutions and matrix products on (True) or off (False) inside the block,
    torch's own defaults for None; the previous setting comes back after."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if on is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def count_bytes(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one denoiser call moves at the least, in `dtype` (None: the model's own): every weight
    read once, every layer's output written once and read once (forward hooks on the leaf modules,
    on the meta device: shapes only, nothing computed)."""
    elem = (dtype or next(model.parameters()).dtype).itemsize
    total = sum(q.numel() * (elem if q.is_floating_point() else q.element_size()) for q in model.parameters())

    def hook(_m, _inp, out):
        nonlocal total
        if torch.is_tensor(out):
            total += 2 * out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        _meta_call(model, batch, size, dtype)
    finally:
        for h in handles:
            h.remove()
    return total


def project_ms(flops: int, nbytes: int, card: str, precision: str, efficiency: float | None = None) -> dict:
    """A whole call's time on `card` from its data-sheet peaks: the roofline floor max(FLOPs / peak,
    bytes / bandwidth), and, given the fraction of peak measured on the GPU at hand, the floor
    divided by it. A projection, never a measurement; it ignores launch costs, so it overstates
    launch-bound calls (tools/projection.py projects kernel by kernel instead)."""
    peaks = CARDS[card]
    floor = max(flops / (peaks[precision] * 1e12), nbytes / (peaks["bandwidth_gbs"] * 1e9)) * 1e3
    return {"card": card, "floor_ms": floor, "at_measured_efficiency_ms": floor / efficiency if efficiency else None}
