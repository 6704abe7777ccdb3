"""`tfsdeploy bench`: engine latency, end-to-end fuse time, memory and FLOP/s, side by side.

Timing rules: every engine is warmed up, then the engines are timed round-robin (one call of each
in turn), so drifting load on a shared machine hits all of them alike; medians are reported and
ratios are taken within one run. On a GPU every timed call is followed by a synchronise.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tfsdeploy.config import ENGINES, EngineConfig, SampleConfig
from tfsdeploy.diffusion import Denoiser
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.inputs import Triplet, write_triplet
from tfsdeploy.paths import display_path
from tfsdeploy.pipeline import FusionPipeline, resolve_device, torch_denoiser
from tfsdeploy.tools.hardware import (count_bytes, count_flops, cpu_peak, device_info, gpu_math, gpu_peak_tflops,
                                      project_ms, rss_mib, sync)
from tfsdeploy.tools.projection import check_fraction
from tfsdeploy.tools.report import fmt

# The engines are named as `fuse --engine` names them, so "torch" is what `fuse --engine torch` runs
# (on CUDA: fp16, channels-last, CUDA graphs; on a CPU: eager fp32). Two rows fuse has no name for:
# "torch-fp32", eager fp32 on the device, the reference every ratio is taken against, and
# "torch-compile", `fuse --engine torch --compile`.
REFERENCE = "torch-fp32"
BENCH_ENGINES = (REFERENCE, "torch", "torch-compile", *(e for e in ENGINES if e != "torch"))
PROJECTED_CARD = "RTX 3090"
REPORT_FILES = ("bench.md", "bench.json", "bench.png")  # what run_bench writes into its folder


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "small"
    sizes: tuple[int, ...] = (128, 256)
    batches: tuple[int, ...] = (1, 4)
    engines: tuple[str, ...] = BENCH_ENGINES
    repeats: int = 10
    warmup: int = 2
    fuse_steps: tuple[int, ...] = (10, 25, 50)
    ddpm_steps: int = 50  # DDPM is timed over this many levels and extrapolated to all T
    fuse_size: int = 256
    threads: int = 0
    cli_repeats: int = 3  # cold `fuse` processes timed per engine setting, when a model is given

    def __post_init__(self) -> None:
        bad = [e for e in self.engines if e not in BENCH_ENGINES]
        if bad:
            raise UserError(f"unknown engine(s) {bad}; choose from {', '.join(BENCH_ENGINES)}")
        if self.repeats < 1 or self.warmup < 0:
            raise UserError("repeats must be >= 1 and warmup >= 0")
        if not self.sizes or not self.batches or min(self.sizes) < 1 or min(self.batches) < 1:
            raise UserError("sizes and batches must be positive")
        if self.cli_repeats < 0 or self.ddpm_steps < 1 or not self.fuse_steps or min(self.fuse_steps) < 1:
            raise UserError("cold runs must be >= 0, and fuse and DDPM steps >= 1")


# --------------------------------------------------------------------------- engines


def random_checkpoint(preset: str, run_dir: Path, seed: int = 0) -> Path:
    """A checkpoint of `preset` with random weights (the zero-initialised output layer made random
    too, so outputs carry signal): speed does not depend on the weights."""
    from tfsdeploy.checkpoint import Configs, save_checkpoint
    from tfsdeploy.config import model_preset
    from tfsdeploy.model import build_model

    torch.manual_seed(seed)
    cfg = model_preset(preset)
    model = build_model(cfg)
    with torch.no_grad():
        model.final.conv.weight.normal_(0, 0.02)
    return save_checkpoint(run_dir, Configs(model=cfg), 0, model.state_dict())


def build_engines(ckpt: Path, cfg: BenchConfig, workdir: Path, log: Callable[[str], None],
                  parity_image: Triplet | None = None,
                  export_s: dict[str, float] | None = None) -> tuple[dict[str, Denoiser], dict[str, str]]:
    """The requested engines that can run here, and the reason for each one that cannot. ONNX files
    and TensorRT engines are exported into `workdir` (each passing its parity gate first); `export_s`
    receives the seconds each ONNX export took, parity gate included."""
    from engines.loader import load_artifact
    from export.onnx_export import default_spec, export_onnx
    from export.trt_build import build_engine, build_plan
    from engines.trt_engine import tensorrt_status
    from tfsdeploy.checkpoint import build_from_checkpoint

    device = resolve_device("auto")
    engines: dict[str, Denoiser] = {}
    skipped: dict[str, str] = {}
    model, _ = build_from_checkpoint(ckpt)
    spec = default_spec(model, max_batch=max(cfg.batches), min_size=min(cfg.sizes), max_size=max(max(cfg.sizes), 256))
    spec = type(spec)(**{**spec.to_json(), "opt_size": cfg.fuse_size})
    onnx_paths: dict[str, Path] = {}

    def onnx(precision: str) -> Path:
        if precision not in onnx_paths:
            t0 = time.perf_counter()
            onnx_paths[precision], _ = export_onnx(ckpt, precision, workdir / "export", spec, parity_steps=2,
                                                   parity_image=parity_image, log=log)
            if export_s is not None:
                export_s[f"onnx-{precision}"] = time.perf_counter() - t0
        return onnx_paths[precision]

    for name in cfg.engines:
        try:
            if name == REFERENCE:
                engines[name] = torch_denoiser(ckpt, device, EngineConfig(precision="fp32", cuda_graph=False,
                                                                          channels_last=False))[0]
            elif name == "torch":
                if device.type == "cpu" and REFERENCE in cfg.engines:
                    raise UserError(f"on a CPU the torch engine is eager fp32, the '{REFERENCE}' row")
                engines[name] = torch_denoiser(ckpt, device, EngineConfig())[0]
            elif name == "torch-compile":
                engines[name] = torch_denoiser(ckpt, device, EngineConfig(compile=True))[0]
            elif name in ("onnx", "onnx-fp16"):
                path = onnx("fp16" if name == "onnx-fp16" else "fp32")
                engines[name] = load_artifact(path, device.type, cfg.threads)[0]
            elif name == "aoti":
                from export.aoti_export import export_aoti

                package, _ = export_aoti(ckpt, workdir / "export", device.type, spec, parity_steps=2,
                                         parity_image=parity_image, log=log)
                engines[name] = load_artifact(package, device.type)[0]
            elif name == "trt":
                trt, reason = tensorrt_status()
                if trt is None:
                    raise UserError(reason)
                plan = build_engine(onnx(build_plan(trt.__version__).onnx_precision), workdir / "export", ckpt,
                                    parity_steps=2, parity_image=parity_image, log=log)
                engines[name] = load_artifact(plan, device.type)[0]
        except UserError as e:
            skipped[name] = str(e)
            log(f"skipping {name}: {e}")
    return engines, skipped


def _inputs(batch: int, size: int, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randn(batch, 5, size, size, generator=g).to(device), torch.rand(batch, generator=g).to(device))


def _precision(engine: Denoiser) -> str:
    """The math whose peak the engine's "of peak" uses: fp32 layers may run on TF32 tensor cores."""
    return gpu_math(engine.dtype)


def measure_latency(engines: dict[str, Denoiser], model: torch.nn.Module, cfg: BenchConfig, peak: dict | None,
                    log: Callable[[str], None]) -> list[dict]:
    rows = []
    gpu = torch.cuda.is_available()
    for size in cfg.sizes:
        for batch in cfg.batches:
            flops = count_flops(model, batch, size)
            inputs = {n: _inputs(batch, size, e.device) for n, e in engines.items()}
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
            base = statistics.median(times[REFERENCE]) if REFERENCE in times else None
            for n, ts in times.items():
                med = statistics.median(ts)
                achieved = flops / med / 1e9
                if engines[n].device.type == "cuda":
                    ref = gpu_peak_tflops(torch.cuda.get_device_name(0), _precision(engines[n]))
                    frac = achieved / (ref * 1e3) if ref else None
                else:
                    frac = achieved / peak["peak"] if peak else None
                try:
                    check_fraction(frac, f"{n} at {size}px batch {batch}")
                except ValueError as e:
                    raise UserError(f"{e} (no report written)") from None
                rows.append({"engine": n, "describe": engines[n].describe(), "size": size, "batch": batch,
                             "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "per_slice_ms": med * 1e3 / batch,
                             "speedup_vs_torch_fp32": (base / med) if base else None, "gflop_per_call": flops / 1e9,
                             "gflops_per_s": achieved, "fraction_of_peak": frac, **mem[n]})
            log(f"latency {size}px batch {batch}: " + ", ".join(
                f"{r['engine']} {r['median_ms']:.1f} ms" for r in rows[-len(times):]))
    return rows


def batching_rows(latency: list[dict], memory: list[dict]) -> list[dict]:
    """Each latency row's time per slice, and its peak memory (the CUDA peak on a GPU; on a CPU the
    peak RSS of a whole fusing process at that batch, from measure_batch_memory), as ratios to batch 1
    of the same engine and size (rows without a batch 1 are left out)."""
    one = {(x["engine"], x["size"]): x for x in latency if x["batch"] == 1}
    process = {(x["engine"], x["batch"]): x["process_peak_mib"] for x in memory}
    out = []
    for x in latency:
        b1 = one.get((x["engine"], x["size"]))
        if b1 is None:
            continue
        mem, mem1 = ((x["cuda_peak_mib"], b1["cuda_peak_mib"]) if x["cuda_peak_mib"] is not None else
                     (process.get((x["engine"], x["batch"])), process.get((x["engine"], 1))))
        out.append({"engine": x["engine"], "size": x["size"], "batch": x["batch"], "per_slice_ms": x["per_slice_ms"],
                    "time_vs_batch1": x["per_slice_ms"] / b1["per_slice_ms"], "peak_mib": mem,
                    "memory_vs_batch1": mem / mem1 if mem is not None and mem1 else None})
    return out


def onnx_break_even(latency: list[dict], export_s: dict[str, float]) -> list[dict]:
    """Denoiser calls after which the fp32 ONNX export's time is won back, per size, at the batch
    where the ONNX engine is fastest per slice, against the torch reference at its own fastest batch
    (`calls` None: ONNX is no faster there)."""
    out = []
    if "onnx-fp32" not in export_s:
        return out
    for size in sorted({x["size"] for x in latency}):
        rows = [x for x in latency if x["size"] == size]
        onnx = min((x for x in rows if x["engine"] == "onnx"), key=lambda x: x["per_slice_ms"], default=None)
        ref = min((x for x in rows if x["engine"] == REFERENCE), key=lambda x: x["per_slice_ms"], default=None)
        if onnx is None or ref is None:
            continue
        saved = (ref["per_slice_ms"] - onnx["per_slice_ms"]) / 1e3
        out.append({"engine": "onnx", "size": size, "batch": onnx["batch"], "per_slice_ms": onnx["per_slice_ms"],
                    "torch_ms": ref["per_slice_ms"], "torch_batch": ref["batch"], "export_s": export_s["onnx-fp32"],
                    "calls": export_s["onnx-fp32"] / saved if saved > 0 else None})
    return out


def project_card(rows: list[dict], model: torch.nn.Module, card: str = PROJECTED_CARD) -> list[dict]:
    """Each GPU latency row projected onto `card` from its FLOPs and bytes and the card's data-sheet
    peaks, at the fraction of peak this GPU reached: a projection, labelled as one."""
    out = []
    for r in rows:
        if r["fraction_of_peak"] is None or not torch.cuda.is_available():
            continue
        precision = "fp32" if r["engine"] == REFERENCE else "fp16"
        dtype = torch.float32 if precision == "fp32" else torch.float16
        nbytes = count_bytes(model, r["batch"], r["size"], dtype)
        proj = project_ms(int(r["gflop_per_call"] * 1e9), nbytes, card, precision, r["fraction_of_peak"])
        out.append({"engine": r["engine"], "size": r["size"], "batch": r["batch"], "measured_ms": r["median_ms"],
                    "mbytes_per_call": nbytes / 1e6, **proj})
    return out


def measure_fuse(engines: dict[str, Denoiser], configs, trip: Triplet, cfg: BenchConfig,
                 log: Callable[[str], None]) -> list[dict]:
    """End-to-end fuse time of one triplet at cfg.fuse_size, x4, per engine and sampler, through the
    same FusionPipeline that `fuse` runs."""
    rows = []
    T = configs.schedule.num_steps
    plans = [("ddim", s) for s in cfg.fuse_steps] + [("ddpm", min(cfg.ddpm_steps, T))]
    for n, e in engines.items():
        FusionPipeline(e, configs, 4, SampleConfig(steps=2)).fuse_triplet(trip, cfg.fuse_size)  # warm-up
        for sampler, steps in plans:
            pipe = FusionPipeline(e, configs, 4, SampleConfig(sampler=sampler, steps=steps))
            sync()
            t0 = time.perf_counter()
            pipe.fuse_triplet(trip, cfg.fuse_size)
            sync()
            dt = time.perf_counter() - t0
            row = {"engine": n, "sampler": sampler, "steps": steps, "seconds": dt, "measured": True}
            if sampler == "ddpm" and steps < T:
                row = {**row, "steps": T, "seconds": dt / steps * T, "measured": False, "measured_steps": steps,
                       "measured_seconds": dt}
            rows.append(row)
        log(f"fuse {n}: " + ", ".join(f"{r['sampler']}-{r['steps']} {r['seconds']:.2f} s"
                                      f"{'' if r['measured'] else ' (extrapolated)'}" for r in rows if r["engine"] == n))
    return rows


def measure_cold_fuse(model: Path, trip: Triplet, cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """A one-shot fuse as a user pays for it: a new Python process per run that imports the library,
    loads the pipeline, reads the three PNGs, fuses x4 with the default sampler and writes the PNG
    (`tfsdeploy.tools.coldstart`, the same library calls as `tfsdeploy fuse`). Wall time of the
    whole process; median of cfg.cli_repeats runs, for engine torch and auto."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfsdeploy-cold-") as tmp:
        tmp = Path(tmp)
        inputs = [str(p) for p in write_triplet(trip, tmp, cfg.fuse_size // 4)]
        for engine in ("torch", "auto"):
            cmd = [sys.executable, "-m", "tfsdeploy.tools.coldstart", *inputs, str(tmp / "fused.png"),
                   "--model", str(model), "--engine", engine, "--threads", str(cfg.threads)]
            times, result = [], {}
            for _ in range(cfg.cli_repeats):
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                if res.returncode != 0:
                    raise UserError(f"a cold fuse failed while benchmarking: {res.stderr.strip()[-300:]}")
                result = json.loads(res.stdout)
            rows.append({"engine": engine, "ran": result["describe"], "seconds": statistics.median(times),
                         "runs": times, "inside_s": result["seconds"]})
            log(f"cold fuse, --engine {engine} ({result['describe']}): {statistics.median(times):.2f} s")
    return rows


def measure_batch_memory(sources: dict[str, tuple[Path, str]], trip: Triplet, cfg: BenchConfig,
                         log: Callable[[str], None]) -> list[dict]:
    """The peak RSS of a whole process that loads an engine and fuses one batch of copies of `trip` (x4,
    default sampler, the model's size), per engine and batch in cfg.batches: what a scan fused at that
    batch holds at its peak, the process's own memory included. One new process each
    (`tfsdeploy.tools.coldstart --batch`), since an allocator keeps what a process once held.
    `sources` maps an engine's name to (model path, `--engine`)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfsdeploy-mem-") as tmp:
        tmp = Path(tmp)
        inputs = [str(p) for p in write_triplet(trip, tmp, cfg.fuse_size // 4)]
        for name, (model, engine) in sources.items():
            for batch in cfg.batches:
                cmd = [sys.executable, "-m", "tfsdeploy.tools.coldstart", *inputs, str(tmp / "fused.png"), "--model",
                       str(model), "--engine", engine, "--threads", str(cfg.threads), "--batch", str(batch)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise UserError(f"a fuse at batch {batch} failed while benchmarking: {res.stderr.strip()[-300:]}")
                peak = json.loads(res.stdout)["peak_rss_mib"]
                rows.append({"engine": name, "batch": batch, "process_peak_mib": peak})
            log(f"peak RSS of a fusing process, {name}: " + ", ".join(
                f"batch {r['batch']} {r['process_peak_mib']:.0f} MiB" for r in rows if r["engine"] == name))
    return rows


def run_bench(ckpt: Path | None, cfg: BenchConfig, out_dir: Path, trip: Triplet | None = None,
              log: Callable[[str], None] = print, cli_model: Path | None = None) -> dict:
    """Measure everything and write bench.md, bench.json and bench.png into out_dir. `trip` is the
    triplet fused end to end (a held-out slice; without one, the synthetic parity phantom). With a
    model, also time a cold one-shot fuse of `cli_model` (default: the checkpoint itself)."""
    from export.parity import phantom_triplet
    from tfsdeploy.checkpoint import build_from_checkpoint
    from tfsdeploy.model import count_parameters

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trip = trip or phantom_triplet(cfg.fuse_size)
    with tempfile.TemporaryDirectory(prefix="tfsdeploy-bench-") as tmp:
        work = Path(tmp)
        given = ckpt is not None
        if ckpt is None:  # speed does not depend on the weights: a random model of the preset
            ckpt = random_checkpoint(cfg.preset, work / "run")
            source = f"random weights, preset {cfg.preset}"
        else:
            source = display_path(ckpt)
        model, ck = build_from_checkpoint(ckpt)
        model = model.to(resolve_device("auto"))
        info = device_info(cfg.threads)
        peak = None if torch.cuda.is_available() else cpu_peak()
        export_s: dict[str, float] = {}
        engines, skipped = build_engines(ckpt, cfg, work, log, trip, export_s)
        if not engines:
            raise UserError("no engine could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        latency = measure_latency(engines, model, cfg, peak, log)
        projection = project_card(latency, model)
        fuse = measure_fuse(engines, ck.configs, trip, cfg, log)
        cold = measure_cold_fuse(cli_model or ckpt, trip, cfg, log) if given and cfg.cli_repeats else []
        memory = []
        if not torch.cuda.is_available() and cfg.cli_repeats:  # a GPU's call memory is its CUDA peak
            sources = {REFERENCE: (ckpt, "torch"), "onnx": (getattr(engines.get("onnx"), "path", None), "onnx")}
            memory = measure_batch_memory({k: v for k, v in sources.items() if k in engines}, trip, cfg, log)
        report = {"config": asdict(cfg), "model": source, "parameters": count_parameters(model),
                  "device": info, "cpu_peak": peak, "skipped": skipped, "latency": latency,
                  "batching": batching_rows(latency, memory), "batch_memory": memory, "export_s": export_s,
                  "onnx_pays_after": onnx_break_even(latency, export_s),
                  "projection": projection, "fuse": fuse, "cli_fuse": cold, "peak_rss_mib": rss_mib()[1],
                  "date": time.strftime("%Y-%m-%d %H:%M")}
    write_bench_report(report, out_dir, log)
    return report


# --------------------------------------------------------------------------- reports


def write_bench_report(r: dict, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """bench.md and bench.json, and the plot bench.png when the `bench` extra (matplotlib) is
    installed; r["plot"] names the plot written, or is None."""
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
    if r.get("cpu_peak"):
        m = r["cpu_peak"]
        lines.append(f"- 'of peak' is against {m['what']}; best measured matmul: "
                     + ", ".join(f"{k}² {v:.0f}" for k, v in sorted(m["kernels"].items(), key=lambda kv: -kv[1])[:2])
                     + " GFLOP/s")
    else:
        lines.append("- 'of peak' is against the GPU's data-sheet dense peak for the engine's precision")
    for k, v in r["skipped"].items():
        lines.append(f"- {k} not measured: {v}")
    lines += ["", "## Denoiser call", "",
              "| engine | runs as | size | batch | median ms | vs torch-fp32 | GFLOP/call | GFLOP/s | of peak | RSS MiB | "
              "CUDA peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["latency"]:
        lines.append(f"| {x['engine']} | {x['describe']} | {x['size']} | {x['batch']} | {x['median_ms']:.1f} | "
                     f"{fmt(x['speedup_vs_torch_fp32'], '.2f')}× | {x['gflop_per_call']:.1f} | {x['gflops_per_s']:.0f} | "
                     f"{fmt(None if x['fraction_of_peak'] is None else 100 * x['fraction_of_peak'], '.0f')}% | "
                     f"{fmt(x['rss_mib'], '.0f')} | {fmt(x['cuda_peak_mib'], '.0f')} |")
    if r.get("batching"):
        lines += ["", "## Batching: per slice, against batch 1 of the same engine", "",
                  "One denoiser call's median divided by its batch (the table above). Peak memory: on a GPU the "
                  "CUDA peak; on a CPU the peak RSS of a new process that loads the engine and fuses one batch "
                  f"of {r['config']['fuse_size']}×{r['config']['fuse_size']} slices, the process's own memory "
                  "included (a scan at that batch holds about as much).", "",
                  "| engine | size | batch | ms per slice | vs batch 1 (time) | peak MiB | vs batch 1 (memory) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for x in r["batching"]:
            lines.append(f"| {x['engine']} | {x['size']} | {x['batch']} | {x['per_slice_ms']:.1f} | "
                         f"{x['time_vs_batch1']:.2f}× | {fmt(x['peak_mib'], '.0f')} | "
                         f"{fmt(x['memory_vs_batch1'], '.2f')}× |")
    if r.get("onnx_pays_after"):
        lines += ["", "## When an ONNX export pays for itself", ""]
        for x in r["onnx_pays_after"]:
            lines.append(f"- {x['size']}px, per denoiser call: onnx {x['per_slice_ms']:.0f} ms a slice (batch "
                         f"{x['batch']}) against torch-fp32 {x['torch_ms']:.0f} ms (batch {x['torch_batch']}); the "
                         f"export took {x['export_s']:.0f} s here (its parity check fuses 2 DDIM steps; `tfsdeploy export` "
                         "fuses 10 and adds the fp16 file unless --no-fp16), "
                         + (f"so it pays for itself after {x['calls']:.0f} denoiser calls (slices x DDIM steps)"
                            if x["calls"] is not None else "and never pays for itself here"))
    if r.get("projection"):
        lines += ["", f"## Projected onto an {PROJECTED_CARD} (a projection, not a measurement)", "",
                  "From each call's FLOPs and bytes (weights read once, every layer output written and read once) "
                  f"and the {PROJECTED_CARD}'s data-sheet peaks: the roofline floor, and that floor divided by the "
                  "fraction of peak the engine reached on this GPU.", "",
                  "| engine | size | batch | measured here ms | MB per call | floor ms | at this GPU's efficiency ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for x in r["projection"]:
            lines.append(f"| {x['engine']} | {x['size']} | {x['batch']} | {x['measured_ms']:.2f} | "
                         f"{x['mbytes_per_call']:.0f} | {x['floor_ms']:.2f} | {fmt(x['at_measured_efficiency_ms'], '.2f')} |")
    lines += ["", f"## Fuse one triplet end to end (x4, {r['config']['fuse_size']}×{r['config']['fuse_size']})", "",
              "| engine | sampler | denoiser calls | seconds | |", "|---|---|---:|---:|---|"]
    for x in r["fuse"]:
        note = "measured" if x["measured"] else (f"extrapolated from {x['measured_steps']} levels "
                                                 f"({x['measured_seconds']:.2f} s)")
        lines.append(f"| {x['engine']} | {x['sampler']} | {x['steps']} | {x['seconds']:.2f} | {note} |")
    if r.get("cli_fuse"):
        lines += ["", f"## One-shot fuse in a new process (x4, {r['config']['fuse_size'] // 4}-px inputs, "
                  "default sampler)", "",
                  "A new Python process per run, from its start to the PNG written: imports, model loading, "
                  "reading, sampling and writing, through the same library calls as `tfsdeploy fuse`. Median of "
                  "the runs listed; 'inside' is the part after the imports, as the process timed it.", "",
                  "| --engine | ran | seconds | inside s | runs |", "|---|---|---:|---:|---|"]
        for x in r["cli_fuse"]:
            lines.append(f"| {x['engine']} | {x['ran']} | {x['seconds']:.2f} | {x['inside_s']:.2f} | "
                         f"{', '.join(f'{t:.2f}' for t in x['runs'])} |")
    with atomic_path(out_dir / "bench.md") as t:
        t.write_text("\n".join(lines) + "\n")
    r["plot"] = "bench.png" if plotting_available() else None
    with atomic_path(out_dir / "bench.json") as t:
        t.write_text(json.dumps(r, indent=2))
    if r["plot"] is None:
        log("no plot: bench.png needs matplotlib (pip install 'tfsdeploy[bench]'); the tables are in bench.md")
        return
    _plot_latency(r, out_dir / r["plot"])


def plotting_available() -> bool:
    """Whether the optional `bench` extra (matplotlib) is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a module hidden by setting sys.modules[name] = None
        return False


def _plot_latency(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(x["size"], x["batch"]) for x in r["latency"]})
    engines = list(dict.fromkeys(x["engine"] for x in r["latency"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(engines))
    for i, e in enumerate(engines):
        lat = [next((x["median_ms"] for x in r["latency"] if x["engine"] == e and (x["size"], x["batch"]) == c), 0)
               for c in combos]
        spd = [next((x["speedup_vs_torch_fp32"] or 0 for x in r["latency"] if x["engine"] == e and (x["size"], x["batch"]) == c), 0)
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
