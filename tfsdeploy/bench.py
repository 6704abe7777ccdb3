"""`tfsdeploy bench`: engine latency, end-to-end fuse time, memory and FLOP/s, side by side; and the
sampler study (quality against steps and time).

Timing rules: every engine is warmed up, then the engines are timed round-robin (one call of each
in turn), so drifting load on a shared machine hits all of them alike; medians are reported and
ratios are taken within one run. On a GPU every timed call is followed by a synchronise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tfsdeploy import __version__
from tfsdeploy.artifacts import display_path
from tfsdeploy.errors import UserError

ENGINE_NAMES = ("torch", "torch-compile", "onnx-fp32", "onnx-fp16", "trt")
# Dense tensor-core peaks from the vendors' data sheets (TFLOP/s), for the roofline fraction.
GPU_PEAK_TFLOPS = {"H100": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0},
                   "H200": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0},
                   "A100": {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0}}


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "small"
    sizes: tuple[int, ...] = (128, 256)
    batches: tuple[int, ...] = (1, 4)
    engines: tuple[str, ...] = ENGINE_NAMES
    repeats: int = 10
    warmup: int = 2
    fuse_steps: tuple[int, ...] = (10, 25, 50)
    ddpm_measured_steps: int = 50  # DDPM is timed over this many levels and extrapolated to all T
    fuse_size: int = 256
    threads: int = 0
    cli_repeats: int = 3  # `tfsdeploy fuse` processes timed per engine, when a model is given

    def __post_init__(self) -> None:
        bad = [e for e in self.engines if e not in ENGINE_NAMES]
        if bad:
            raise UserError(f"unknown engine(s) {bad}; choose from {', '.join(ENGINE_NAMES)}")
        if self.repeats < 1 or self.warmup < 0:
            raise UserError("repeats must be >= 1 and warmup >= 0")


# --------------------------------------------------------------------------- measuring helpers


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_flops(model: torch.nn.Module, batch: int, size: int) -> int:
    """FLOPs of one denoiser call (torch's FlopCounterMode; a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    args = (torch.zeros(batch, 3, size, size, device=p.device), torch.zeros(batch, 5, size, size, device=p.device),
            torch.full((batch,), 0.5, device=p.device))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*args)
    return int(fc.get_total_flops())


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured fp32 matrix-multiply throughput on the CPU, through torch and through ONNX Runtime's
    MLAS; the better one is the peak CPU engines are held to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    out = {"torch": 2 * n**3 / ((time.perf_counter() - t0) / repeats) / 1e9}
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        info = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABC"]
        graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", info[:2], info[2:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"A": a.numpy(), "B": b.numpy()}
        sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(repeats):
            sess.run(None, feed)
        out["onnxruntime"] = 2 * n**3 / ((time.perf_counter() - t0) / repeats) / 1e9
    except ImportError:
        pass
    out["peak"] = max(out.values())
    return out


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
    info["device"] = info.get("gpu") or f"CPU: {info['cpu']} ({info['logical_cpus']} logical cores)"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_peak_tflops(name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


# --------------------------------------------------------------------------- engines


def build_engines(ckpt: Path, cfg: BenchConfig, workdir: Path, log: Callable[[str], None]) -> tuple[dict, dict]:
    """The requested engines that can run here, and the reason for each one that cannot."""
    from engines.torch_engine import TorchDenoiser
    from export.onnx_export import default_spec, export_onnx
    from tfsdeploy.checkpoint import build_from_checkpoint

    model, _ = build_from_checkpoint(ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engines, skipped = {}, {}
    spec = default_spec(model, max_batch=max(cfg.batches), min_size=min(cfg.sizes), max_size=max(max(cfg.sizes), 256))
    spec = type(spec)(**{**spec.to_json(), "opt_size": cfg.fuse_size})
    onnx_paths = {}
    for name in cfg.engines:
        try:
            if name == "torch":
                engines[name] = TorchDenoiser(model, device)
            elif name == "torch-compile":
                engines[name] = TorchDenoiser(build_from_checkpoint(ckpt)[0], device, compile=True)
            elif name.startswith("onnx"):
                precision = name.split("-")[1]
                path, _ = export_onnx(ckpt, precision, workdir / "export", spec, parity_steps=2, log=log)
                onnx_paths[precision] = path
                from engines.onnx_engine import OnnxDenoiser

                engines[name] = OnnxDenoiser(path, threads=cfg.threads)
            elif name == "trt":
                from engines.trt_engine import TrtDenoiser
                from export.trt_build import build_engine, build_plan, tensorrt_status

                trt, reason = tensorrt_status()
                if trt is None:
                    raise UserError(reason)
                precision = build_plan(trt.__version__).onnx_precision
                if precision not in onnx_paths:
                    onnx_paths[precision], _ = export_onnx(ckpt, precision, workdir / "export", spec,
                                                           parity_steps=2, log=log)
                engines[name] = TrtDenoiser(build_engine(onnx_paths[precision], workdir / "export", log=log))
        except UserError as e:
            skipped[name] = str(e)
            log(f"skipping {name}: {e}")
    return engines, skipped


def _inputs(batch: int, size: int, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randn(batch, 5, size, size, generator=g).to(device), torch.rand(batch, generator=g).to(device))


def _device_of(engine) -> torch.device:
    return getattr(engine, "device", torch.device("cpu"))


def measure_latency(engines: dict, model: torch.nn.Module, cfg: BenchConfig, peak: dict,
                    log: Callable[[str], None]) -> list[dict]:
    rows = []
    gpu = torch.cuda.is_available()
    for size in cfg.sizes:
        for batch in cfg.batches:
            flops = count_flops(model, batch, size)
            inputs = {n: _inputs(batch, size, _device_of(e)) for n, e in engines.items()}
            mem = {}
            for n, e in engines.items():
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(cfg.warmup):
                    e(*inputs[n])
                sync()
                mem[n] = {"rss_mib": rss_mib()[0],
                          "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None}
            times: dict[str, list[float]] = {n: [] for n in engines}
            for _ in range(cfg.repeats):
                for n, e in engines.items():
                    sync()
                    t0 = time.perf_counter()
                    e(*inputs[n])
                    sync()
                    times[n].append(time.perf_counter() - t0)
            base = statistics.median(times["torch"]) if "torch" in times else None
            for n, ts in times.items():
                med = statistics.median(ts)
                achieved = flops / med / 1e9
                precision = "fp16" if ("fp16" in n or n == "trt") else "fp32"
                if gpu and "cuda" in str(_device_of(engines[n])):
                    ref = gpu_peak_tflops(torch.cuda.get_device_name(0), precision)
                    frac = achieved / (ref * 1e3) if ref else None
                else:
                    frac = achieved / peak["peak"] if peak else None
                rows.append({"engine": n, "size": size, "batch": batch, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                             "speedup_vs_torch": (base / med) if base else None, "gflop_per_call": flops / 1e9,
                             "gflops_per_s": achieved, "fraction_of_peak": frac, **mem[n]})
            log(f"latency {size}px batch {batch}: " + ", ".join(
                f"{r['engine']} {r['median_ms']:.1f} ms" for r in rows[-len(times):]))
    return rows


def measure_fuse(engines: dict, ckpt: Path, cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """End-to-end fuse time of one triplet at cfg.fuse_size, x4, per engine and sampler."""
    from tfsdeploy.checkpoint import load_checkpoint
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.diffusion import Diffusion, NoiseSchedule
    from tfsdeploy.pipeline import fuse_triplet
    from training.data import reference_triplet

    ck = load_checkpoint(ckpt)
    schedule = NoiseSchedule(ck.configs.schedule)
    diffusion = Diffusion(schedule, ck.configs.diffusion)
    trip = reference_triplet(cfg.fuse_size)
    mult = ck.configs.model.size_multiple
    rows = []
    plans = [("ddim", s) for s in cfg.fuse_steps] + [("ddpm", min(cfg.ddpm_measured_steps, schedule.num_steps))]
    for n, e in engines.items():
        fuse_triplet(e, diffusion, trip, 4, cfg.fuse_size, mult, SampleConfig(steps=2))  # warm-up
        for sampler, steps in plans:
            sync()
            t0 = time.perf_counter()
            fuse_triplet(e, diffusion, trip, 4, cfg.fuse_size, mult, SampleConfig(sampler=sampler, steps=steps))
            sync()
            dt = time.perf_counter() - t0
            row = {"engine": n, "sampler": sampler, "steps": steps, "seconds": dt, "measured": True}
            if sampler == "ddpm" and steps < schedule.num_steps:
                row = {**row, "steps": schedule.num_steps, "seconds": dt / steps * schedule.num_steps,
                       "measured": False, "measured_steps": steps, "measured_seconds": dt}
            rows.append(row)
        log(f"fuse {n}: " + ", ".join(f"{r['sampler']}-{r['steps']} {r['seconds']:.2f} s"
                                      f"{'' if r['measured'] else ' (extrapolated)'}" for r in rows if r["engine"] == n))
    return rows


def measure_cli_fuse(model: Path, cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """`tfsdeploy fuse` as a user runs it: a new process per run, from start to the PNG written,
    on a x4 triplet of fuse_size / 4 pixels, with the default sampler; engine torch and auto."""
    import re
    import subprocess
    import sys

    from tfsdeploy.pipeline import write_triplet
    from training.data import reference_triplet

    rows = []
    with tempfile.TemporaryDirectory(prefix="tfsdeploy-cli-") as tmp:
        tmp = Path(tmp)
        inputs = [str(p) for p in write_triplet(reference_triplet(cfg.fuse_size), tmp, cfg.fuse_size // 4)]
        for engine in ("torch", "auto"):
            cmd = [sys.executable, "-m", "tfsdeploy", "fuse", *inputs, "--scale", "4", "--model", str(model),
                   "--engine", engine, "--no-progress", "--out", str(tmp / "fused.png")]
            if cfg.threads:
                cmd += ["--threads", str(cfg.threads)]
            times, ran = [], engine
            for _ in range(cfg.cli_repeats):
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                if res.returncode != 0:
                    raise UserError(f"`tfsdeploy fuse` failed while benchmarking: {res.stderr.strip()[-300:]}")
                m = re.search(r"x4, (.+?), engine (.+?), model", res.stdout)
                ran = f"{m.group(2)}, {m.group(1)}" if m else engine
            rows.append({"engine": engine, "ran": ran, "seconds": statistics.median(times), "runs": times})
            log(f"fuse from the command line, --engine {engine} ({ran}): {statistics.median(times):.2f} s")
    return rows


def run_bench(ckpt: Path | None, cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = print,
              cli_model: Path | None = None) -> dict:
    """Measure everything and write bench.md, bench.json and bench.png into out_dir. With a model,
    also time `tfsdeploy fuse` as a command on `cli_model` (default: the checkpoint itself)."""
    from tfsdeploy.checkpoint import Configs, build_from_checkpoint, save_checkpoint
    from tfsdeploy.config import model_preset
    from tfsdeploy.model import build_model, count_parameters

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="tfsdeploy-bench-") as tmp:
        work = Path(tmp)
        given = ckpt is not None
        if ckpt is None:  # speed does not depend on the weights: a random model of the preset
            torch.manual_seed(0)
            mcfg = model_preset(cfg.preset)
            model = build_model(mcfg)
            with torch.no_grad():
                model.final.conv.weight.normal_(0, 0.02)
            ckpt = save_checkpoint(work / "run", Configs(model=mcfg), 0, model.state_dict())
            source = f"random weights, preset {cfg.preset}"
        else:
            source = display_path(ckpt)
        model, _ = build_from_checkpoint(ckpt)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        info = device_info(cfg.threads)
        peak = None if torch.cuda.is_available() else matmul_peak_gflops()
        engines, skipped = build_engines(ckpt, cfg, work, log)
        if not engines:
            raise UserError("no engine could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        latency = measure_latency(engines, model, cfg, peak, log)
        fuse = measure_fuse(engines, ckpt, cfg, log)
        cli = measure_cli_fuse(cli_model or ckpt, cfg, log) if given and cfg.cli_repeats else []
        report = {"config": asdict(cfg), "model": source, "parameters": count_parameters(model),
                  "device": info, "cpu_matmul_gflops": peak, "skipped": skipped, "latency": latency,
                  "fuse": fuse, "cli_fuse": cli, "peak_rss_mib": rss_mib()[1],
                  "date": time.strftime("%Y-%m-%d %H:%M")}
    write_bench_report(report, out_dir)
    return report


# --------------------------------------------------------------------------- reports


def _fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def write_bench_report(r: dict, out_dir: Path) -> None:
    from tfsdeploy.imaging import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    d = r["device"]
    lines = [f"# tfsdeploy bench: {d['device']}", "",
             f"- model: {r['model']} ({r['parameters'] / 1e6:.2f} M parameters); {r['date']}",
             f"- versions: python {d['python']}, torch {d['torch']}"
             + "".join(f", {k} {d[k]}" for k in ("onnxruntime", "tensorrt", "cuda", "driver") if k in d)
             + f"; threads {d['threads']}",
             f"- {r['config']['repeats']} round-robin repeats after {r['config']['warmup']} warm-up calls; medians; "
             f"ratios within this run",
             f"- peak RSS of the whole run: {r['peak_rss_mib']:.0f} MiB"]
    if r.get("cpu_matmul_gflops"):
        m = r["cpu_matmul_gflops"]
        lines.append(f"- measured CPU fp32 matmul peak (2048²): {m['peak']:.0f} GFLOP/s; 'of peak' is against it")
    else:
        lines.append("- 'of peak' is against the GPU's data-sheet dense peak for the engine's precision")
    for k, v in r["skipped"].items():
        lines.append(f"- {k} not measured: {v}")
    lines += ["", "## Denoiser call", "",
              "| engine | size | batch | median ms | vs torch | GFLOP/call | GFLOP/s | of peak | RSS MiB | CUDA peak MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["latency"]:
        lines.append(f"| {x['engine']} | {x['size']} | {x['batch']} | {x['median_ms']:.1f} | "
                     f"{_fmt(x['speedup_vs_torch'], '.2f')}× | {x['gflop_per_call']:.1f} | {x['gflops_per_s']:.0f} | "
                     f"{_fmt(None if x['fraction_of_peak'] is None else 100 * x['fraction_of_peak'], '.0f')}% | "
                     f"{_fmt(x['rss_mib'], '.0f')} | {_fmt(x['cuda_peak_mib'], '.0f')} |")
    lines += ["", f"## Fuse one triplet end to end (x4, {r['config']['fuse_size']}×{r['config']['fuse_size']})", "",
              "| engine | sampler | denoiser calls | seconds | |", "|---|---|---:|---:|---|"]
    for x in r["fuse"]:
        note = "measured" if x["measured"] else (f"extrapolated from {x['measured_steps']} levels "
                                                 f"({x['measured_seconds']:.2f} s)")
        lines.append(f"| {x['engine']} | {x['sampler']} | {x['steps']} | {x['seconds']:.2f} | {note} |")
    if r.get("cli_fuse"):
        lines += ["", f"## `tfsdeploy fuse` from the command line (x4, {r['config']['fuse_size'] // 4}-px inputs, "
                  "default sampler)", "",
                  "A new process per run, from its start to the PNG written: imports, model loading, "
                  "reading, sampling and writing. Median of the runs listed.", "",
                  "| --engine | ran on, sampler | seconds | runs |", "|---|---|---:|---|"]
        for x in r["cli_fuse"]:
            lines.append(f"| {x['engine']} | {x['ran']} | {x['seconds']:.2f} | "
                         f"{', '.join(f'{t:.2f}' for t in x['runs'])} |")
    with atomic_path(out_dir / "bench.md") as t:
        t.write_text("\n".join(lines) + "\n")
    with atomic_path(out_dir / "bench.json") as t:
        t.write_text(json.dumps(r, indent=2))
    _plot_latency(r, out_dir / "bench.png")


def _plot_latency(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfsdeploy.imaging import atomic_path

    combos = sorted({(x["size"], x["batch"]) for x in r["latency"]})
    engines = list(dict.fromkeys(x["engine"] for x in r["latency"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(engines))
    for i, e in enumerate(engines):
        lat = [next((x["median_ms"] for x in r["latency"] if x["engine"] == e and (x["size"], x["batch"]) == c), 0)
               for c in combos]
        spd = [next((x["speedup_vs_torch"] or 0 for x in r["latency"] if x["engine"] == e and (x["size"], x["batch"]) == c), 0)
               for c in combos]
        xs = np.arange(len(combos)) + i * width
        axes[0].bar(xs, lat, width, label=e)
        axes[1].bar(xs, spd, width, label=e)
    for ax, title in zip(axes, ("latency per denoiser call (ms)", "speed-up over torch eager")):
        ax.set_xticks(np.arange(len(combos)) + width * (len(engines) - 1) / 2)
        ax.set_xticklabels([f"{s}px b{b}" for s, b in combos])
        ax.set_title(title)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(r["device"]["device"], fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- sampler study


@dataclass(frozen=True)
class StudyConfig:
    scale: int = 4
    images: int = 4
    size: int = 256
    ddim_steps: tuple[int, ...] = (10, 25, 50, 100, 250)
    ddpm_steps: int = 0  # 0 = all T (the paper's sampler)
    seed: int = 0
    engine: str = "auto"
    extra: tuple[str, ...] = field(default_factory=tuple)


def sampler_study(ckpt: Path, data_root: Path, cfg: StudyConfig, out_dir: Path,
                  log: Callable[[str], None] = print) -> dict:
    """PSNR / SSIM against the ground truth, and time, for DDPM over all T and DDIM at several step
    counts, on held-out slices; writes study.md / study.json / study.png."""
    from engines.loader import select_engine
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.diffusion import Diffusion, NoiseSchedule
    from tfsdeploy.metrics import psnr, ssim
    from tfsdeploy.pipeline import fuse_tensor
    from training.data import make_batch, open_split

    denoiser, configs = select_engine(ckpt, cfg.engine)
    schedule = NoiseSchedule(configs.schedule)
    diffusion = Diffusion(schedule, configs.diffusion)
    samples = open_split(data_root, "test", cfg.size).load()
    if not samples:
        raise UserError(f"{data_root}: the test split is empty")
    picks = np.linspace(0, len(samples) - 1, min(cfg.images, len(samples))).round().astype(int)
    b = make_batch(samples, picks, [cfg.scale], 0, False, np.random.default_rng(0))
    device = getattr(denoiser, "device", torch.device("cpu"))
    cond = b.cond01.to(device)
    rows = [{"sampler": "baseline", "steps": 0, "calls": 0, "seconds": 0.0,
             "psnr": float(psnr(b.base01, b.gt01).mean()), "ssim": float(ssim(b.base01, b.gt01).mean())}]
    plans = [("ddpm", cfg.ddpm_steps or schedule.num_steps)] + [("ddim", s) for s in cfg.ddim_steps
                                                                 if s <= schedule.num_steps]
    for sampler, steps in plans:
        sync()
        t0 = time.perf_counter()
        out = fuse_tensor(denoiser, diffusion, cond, SampleConfig(sampler=sampler, steps=steps, seed=cfg.seed)).cpu()
        sync()
        dt = time.perf_counter() - t0
        rows.append({"sampler": sampler, "steps": steps, "calls": steps, "seconds": dt / len(picks),
                     "psnr": float(psnr(out, b.gt01).mean()), "ssim": float(ssim(out, b.gt01).mean())})
        log(f"{sampler}-{steps}: {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.4f}, "
            f"{rows[-1]['seconds']:.1f} s per image")
    ref = rows[1]
    pick = None
    for r in rows[2:]:
        r["delta_psnr_vs_ddpm"] = r["psnr"] - ref["psnr"]
        r["fewer_calls_than_ddpm"] = ref["calls"] / r["calls"]
        if r["delta_psnr_vs_ddpm"] >= -0.3 and r["fewer_calls_than_ddpm"] >= 80 and (pick is None or r["calls"] < pick["calls"]):
            pick = r
    report = {"model": display_path(ckpt), "engine": getattr(denoiser, "describe", lambda: denoiser.name)(),
              "device": device_info(0)["device"], "config": asdict(cfg), "images": [samples[i].name for i in picks],
              "rows": rows, "target": "within 0.3 dB PSNR of full DDPM with at least 80x fewer denoiser calls",
              "meets_target": pick, "date": time.strftime("%Y-%m-%d %H:%M")}
    _write_study(report, out_dir)
    return report


def _write_study(r: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfsdeploy.imaging import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    c = r["config"]
    lines = [f"# Sampler study: x{c['scale']}, {c['size']}×{c['size']}, {len(r['images'])} held-out slices", "",
             f"- model: {r['model']}; engine: {r['engine']}; device: {r['device']}; {r['date']}",
             f"- target: {r['target']}: " + (f"met by {r['meets_target']['sampler']}-{r['meets_target']['steps']}"
                                              if r["meets_target"] else "not met by any measured setting"), "",
             "| sampler | denoiser calls | PSNR dB | SSIM | Δ PSNR vs DDPM | fewer calls | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['sampler']} | {x['calls']} | {x['psnr']:.2f} | {x['ssim']:.4f} | "
                     f"{_fmt(x.get('delta_psnr_vs_ddpm'), '+.2f')} | {_fmt(x.get('fewer_calls_than_ddpm'), '.0f')}"
                     f"{'×' if x.get('fewer_calls_than_ddpm') else ''} | {x['seconds']:.2f} |")
    with atomic_path(out_dir / "study.md") as t:
        t.write_text("\n".join(lines) + "\n")
    with atomic_path(out_dir / "study.json") as t:
        t.write_text(json.dumps(r, indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ddim = [x for x in r["rows"] if x["sampler"] == "ddim"]
    ddpm = [x for x in r["rows"] if x["sampler"] == "ddpm"]
    base = r["rows"][0]
    for ax, key, label in ((axes[0], "calls", "denoiser calls"), (axes[1], "seconds", "seconds per image")):
        ax.plot([x[key] for x in ddim], [x["psnr"] for x in ddim], "o-", label="DDIM")
        ax.plot([x[key] for x in ddpm], [x["psnr"] for x in ddpm], "s", label="DDPM (all T)" if ddpm else None)
        ax.axhline(base["psnr"], color="grey", ls="--", lw=0.8, label="upsample-then-fuse baseline")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR (dB)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"quality against steps and time: {r['device']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_dir / "study.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
