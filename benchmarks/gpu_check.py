"""The GPU check: the real command line on a CUDA machine, then the paper-preset latency table, in one
offline run (installs nothing, downloads nothing) of under 8 minutes, compile included.

    python benchmarks/gpu_check.py                         # on a CUDA machine
    python benchmarks/gpu_check.py --quick --allow-cpu --out /tmp/c   # smoke test anywhere (CI)

1. `tfsdeploy demo`, then `tfsdeploy fuse` of its inputs at x2, x4 and x8 with the packaged model,
   `fuse` of a volume (three NIfTI files cut from the installed templates; a long job, so on a GPU it
   compiles the x4 member's AOTInductor package on first use), `evaluate --limit 4` and `bench`, each
   as a new process: exit code, wall time, last line, no traceback. Then the cold start: a new
   process's one-shot x4 fuse, with the package built.
2. The paper preset (random weights: speed does not depend on them), 256x256, x4, DDIM-10, through
   FusionPipeline, one row per path in PATHS (eager fp32 with TF32 off and on, eager fp16, the torch
   fp16 engine with a CUDA graph per call and with one graph per fuse (the default), the AOTInductor
   package both ways (its build, and its load in a new process, timed), and fp16 +
   torch.compile(reduce-overhead)), at batch 1, 16 and 64: per denoiser call, per DDIM-10 fuse and in
   slices/s, the fraction of the data-sheet peak of the math that ran (a fraction over 100 % fails
   the check), and the fused-image PSNR of each path against eager fp32. The default path slower
   than eager fp32 at any batch fails the check. And the packaged x4 model as a scan runs it, with
   its own sampler (DDIM-2), at its largest batch.
3. One denoiser call per row under torch.profiler, and from it an RTX 3090 projection, kernel by
   kernel (tfsdeploy/tools/projection.py); `--anchor` checks such projections against a measurement
   made on another card.

It writes benchmarks/reports/gpu-check-<device>.md and .json (and -kernels.json, the profiled
kernels, which `--anchor` reads back), rewritten after every step, so a run cut short keeps what it
measured. A step that fails is recorded and the next one runs.

A row is a BenchPath: a name and a function from a checkpoint to the FusionPipeline to time. To add
one, append to PATHS, e.g. `torch_path("my path", EngineConfig(...), graph=True)` or
`BenchPath("my engine", lambda ckpt: FusionPipeline(my_denoiser(ckpt), configs, 4, SampleConfig(steps=10)))`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsdeploy.checkpoint import Configs, build_from_checkpoint  # noqa: E402
from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.metrics import psnr  # noqa: E402
from tfsdeploy.model import count_parameters  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.bench import random_checkpoint  # noqa: E402
from tfsdeploy.tools.hardware import (count_bytes, count_flops, device_info, gpu_math, gpu_peak_tflops,  # noqa: E402
                                      project_ms, tf32_mode)
from tfsdeploy.tools.projection import (CARDS, LAUNCH_SOURCE, LAUNCH_US, MATH_KINDS, Kernel,  # noqa: E402
                                        attribute_by_name, card_for, check_fraction, profile_call, project_call,
                                        project_fuse)


@dataclass(frozen=True)
class BenchPath:
    """One row of the latency table: a name, and how to build its pipeline (x4, DDIM-10) from a
    checkpoint. `graph`: its denoiser calls replay CUDA graphs, so the projection adds no gaps
    between kernels; `tf32`: TF32 for fp32 math while the row runs (None: torch's defaults);
    `cuda_only`: skipped on a CPU."""

    name: str
    load: Callable[[Path], FusionPipeline]
    graph: bool = False
    tf32: bool | None = None
    cuda_only: bool = False


def torch_path(name: str, engine: EngineConfig, **kw) -> BenchPath:
    return BenchPath(name, lambda ckpt: FusionPipeline.load(ckpt, 4, SampleConfig(steps=10), engine), **kw)


EAGER_FP32 = EngineConfig(engine="torch", precision="fp32", cuda_graph=False, channels_last=False)
DEFAULT = "default: torch fp16, one CUDA graph per fuse"
AOTI_BUILDS: dict[str, dict] = {}  # checkpoint -> the package built for the AOTInductor rows, and its timings


def aoti_pipeline(ckpt: Path, whole_loop: bool, max_batch: int) -> FusionPipeline:
    """The checkpoint's AOTInductor package (built on the first call, timed, and loaded once in a new
    process to time what a later run pays), x4, DDIM-10."""
    from engines.aoti_engine import AotiDenoiser
    from export.aoti_export import export_aoti
    from export.onnx_export import default_spec

    key = str(ckpt)
    if key not in AOTI_BUILDS:
        model, _ = build_from_checkpoint(ckpt)
        t0 = time.perf_counter()
        path, _ = export_aoti(ckpt, Path(ckpt).parent / "aoti", "cuda", default_spec(model, max_batch=max_batch),
                              log=lambda s: print(s, flush=True))
        AOTI_BUILDS[key] = {"package": path.name, "build_s": time.perf_counter() - t0,
                            "megabytes": path.stat().st_size / 1e6, **load_in_new_process(path)}
    path = Path(ckpt).parent / "aoti" / AOTI_BUILDS[key]["package"]
    denoiser = AotiDenoiser(path)
    return FusionPipeline(denoiser, Configs.from_json(denoiser.meta["configs"]), 4, SampleConfig(steps=10),
                          whole_loop=whole_loop)


def load_in_new_process(path: Path) -> dict:
    """A new process that loads the package and makes one call: its wall time, and the load and first
    call measured inside it."""
    code = ("import time; t0 = time.perf_counter(); import torch; from engines.aoti_engine import AotiDenoiser; "
            f"d = AotiDenoiser({str(path)!r}); t1 = time.perf_counter(); s = d.spec.opt_size; "
            "d(torch.randn(1, 3, s, s), torch.randn(1, 5, s, s), torch.rand(1)); torch.cuda.synchronize(); "
            "print(t1 - t0, time.perf_counter() - t1)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"new_process_error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    load_s, first_call_s = map(float, res.stdout.split()[-2:])
    return {"new_process_s": wall, "load_s": load_s, "first_call_s": first_call_s}


def aoti_path(name: str, whole_loop: bool) -> BenchPath:
    return BenchPath(name, lambda ckpt: aoti_pipeline(ckpt, whole_loop, BATCHES_MAX[0]), graph=True, cuda_only=True)


BATCHES_MAX = [64]  # the largest batch of this run, set by main(): the AOTInductor package's range
PATHS = [  # the first row is the reference of the PSNR column
    torch_path("eager fp32, TF32 off", EAGER_FP32, tf32=False),
    torch_path("eager fp32, TF32 on", EAGER_FP32, tf32=True),
    # the default path without its graphs: the launch cost they save, and names for their kernels' FLOPs
    torch_path("eager fp16, native GroupNorm", EngineConfig(engine="torch", cuda_graph=False)),
    torch_path("torch fp16, a CUDA graph per call", EngineConfig(engine="torch", whole_loop=False), graph=True,
               cuda_only=True),
    torch_path(DEFAULT, EngineConfig(engine="torch"), graph=True),
    aoti_path("AOTInductor fp16, a CUDA graph per call", whole_loop=False),
    aoti_path("AOTInductor fp16, one CUDA graph per fuse", whole_loop=True),
    torch_path("fp16, compile(reduce-overhead)",
               EngineConfig(engine="torch", compile=True, cuda_graph=False), graph=True, cuda_only=True),
]
TARGET = "RTX 3090"
TARGETS = {"ddim10_batch1_ms": 20.0, "paper_slices_per_s": 120.0, "packaged_slices_per_s": 1000.0,
           "setup_s": 10.0, "cold_start_s": 5.0}


class Report:
    def __init__(self, out: Path, info: dict, args: argparse.Namespace):
        name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
        self.stem = out / f"gpu-check-{name}"
        self.data = {"device": info, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "cli": [],
                     "latency": [], "packaged": None, "profiles": [], "projection": [], "projection_note": "",
                     "anchors": [], "aoti": {}, "cold_start": None, "notes": []}
        # every profiled kernel, for `--anchor` runs on other cards; kept out of the report's JSON
        self.kernels = {"device": info.get("gpu") or info["device"], "card": card_for(info.get("gpu", "")),
                        "profiles": []}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def kernels_path(self) -> Path:
        return self.stem.with_name(self.stem.name + "-kernels.json")

    def write(self) -> None:
        d, info = self.data, self.data["device"]
        self.stem.with_suffix(".json").write_text(json.dumps(d, indent=2, default=str))
        self.kernels_path.write_text(json.dumps(self.kernels))
        lines = [f"# GPU check: {info['device']}", "", f"- {d['date']}; torch {info['torch']}"
                 + (f", CUDA {info.get('cuda')}, driver {info.get('driver')}" if info.get("cuda") else ""),
                 "- produced by `python benchmarks/gpu_check.py` in one run; every timing below comes from it", "",
                 "## The command line on this device", "", "| command | exit | seconds | last line |", "|---|---:|---:|---|"]
        for r in d["cli"]:
            lines.append(f"| `{r['command']}` | {r['exit']} | {r['seconds']:.1f} | {r['last'][:160]} |")
        if d["cold_start"]:
            c = d["cold_start"]
            lines += ["", f"Cold start: a new `tfsdeploy fuse` process, packaged x4 model, to its first fused image: "
                      f"**{c['process_s']:.1f} s** whole process ({c['after_imports_s']:.1f} s after the imports), "
                      f"engine {c['describe']}."]
        if d["latency"]:
            lines += self._latency_lines()
        for ck, b in d["aoti"].items():
            if "new_process_s" in b:
                lines += ["", f"AOTInductor package of the {ck} preset ({b['megabytes']:.0f} MB): built "
                          f"in {b['build_s']:.0f} s once (export, compile and parity gate); a new process loads it in "
                          f"{b['load_s']:.1f} s and makes its first call {b['first_call_s']:.2f} s later "
                          f"({b['new_process_s']:.1f} s for the whole process, interpreter and imports included)."]
            else:
                lines += ["", f"AOTInductor package built in {b['build_s']:.0f} s; loading it in a new process failed: "
                          f"{b.get('new_process_error')}"]
        if d["packaged"]:
            k = d["packaged"]
            lines += ["", f"Packaged x4 model, default path, its own sampler (DDIM-{k['steps']}): batch {k['batch']}, "
                      f"{k['fuse_ms']:.1f} ms per batch, **{k['slices_per_s']:.0f} slices/s**; batch 1: "
                      f"{k['batch1_ms']:.1f} ms."]
        if d["profiles"]:
            lines += self._profile_lines()
        lines += self._projection_lines() + self._anchor_lines()
        if d.get("targets"):
            lines += ["", "## Targets", ""] + [f"- {t}" for t in d["targets"]]
        lines += [""] + [f"- note: {n}" for n in d["notes"]]
        self.stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    def _latency_lines(self) -> list[str]:
        p = self.data["paper"]
        lines = ["", f"## {p['preset'].capitalize()} preset ({p['parameters'] / 1e6:.1f} M parameters, "
                 f"{p['gflop']:.0f} GFLOP per call at batch 1), {p['size']}x{p['size']}, x4, DDIM-10", "",
                 "Medians after warm-up; CUDA-event timing. A DDIM-10 fuse is FusionPipeline on a condition "
                 "already on the GPU: ten denoiser calls and the sampler around them. \"Of peak\" is the call's "
                 "FLOPs per second over the data-sheet dense peak of the math that ran (column \"math\": fp16 or "
                 "bf16 tensor, TF32 tensor when torch allows TF32 for fp32 layers, else fp32 SIMT); a value over "
                 "100 % would be a bug in this report and fails the check.", "",
                 "| path | runs as | math (peak TFLOP/s) | batch | ms per call | DDIM-10 ms | slices/s | of peak | "
                 "fused PSNR vs fp32 | set-up s |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.data["latency"]:
            if "error" in r:
                lines.append(f"| {r['path']} | | | {r['batch']} | failed: {r['error'][:120]} | | | | | |")
                continue
            frac = "–" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.0f}%"
            if r.get("fraction_error"):
                frac += " (impossible: check failed)"
            ps = "–" if r.get("psnr_vs_fp32") is None else f"{r['psnr_vs_fp32']:.1f} dB"
            mk = MATH_KINDS.get(r["math"], r["math"]) + (f" ({r['peak_tflops']:g})" if r["peak_tflops"] else "")
            lines.append(f"| {r['path']} | {r['engine']} | {mk} | {r['batch']} | {r['call_ms']:.2f} | "
                         f"{r['fuse_ms']:.1f} | {r['slices_per_s']:.1f} | {frac} | {ps} | {r['setup_s']:.1f} |")
        return lines

    def _profile_lines(self) -> list[str]:
        unit = self.data["profiles"][0]["unit"]
        lines = ["", f"## One denoiser call under torch.profiler ({unit})", "",
                 f"Busy: the {unit}' own time; idle: the measured call time (above) less that, the time the "
                 f"device waited for work to be issued. At launch cost: {unit} no longer than the {LAUNCH_US:g} us "
                 "a kernel launch costs. "
                 "FLOPs and bytes come from the operator that launched each kernel (the profiler's FLOPs, bytes "
                 "from its input shapes), else from kernels of the same name in an earlier row (\"by name\"), "
                 "else the kernel is taken as compute- or memory-bound by its name (\"assumed\").", "",
                 f"| path | batch | {unit} | busy ms | idle ms | at launch cost | FLOPs and bytes from |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        for r in self.data["profiles"]:
            share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["time_share"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {r['path']} | {r['batch']} | {r['kernels']} | {r['busy_ms']:.2f} | {r['idle_ms']:.2f} | "
                         f"{r['at_launch_floor']} | {share} |")
        return lines

    def _projection_lines(self) -> list[str]:
        d = self.data
        if not d["projection"]:
            return ["", f"## {TARGET}: no projection", "", d["projection_note"]] if d["projection_note"] else []
        c, src = CARDS[TARGET], d["projection"][0]["source_card"]
        lines = ["", f"## {TARGET}: a projection, not a measurement", "",
                 f"Each kernel of the profiled call costs a launch ({LAUNCH_US:g} us on both cards) plus its work, "
                 f"and its work runs on the {TARGET} at the efficiency it reached here: its roofline time there, "
                 "max(FLOPs / peak of its math, bytes / bandwidth), divided by its roofline time here over its "
                 "measured time less the launch. The call is the sum over its kernels, plus the idle time between "
                 "kernels measured here when no CUDA graph replays them; DDIM-10 adds the sampler's own time as "
                 "measured here.", "",
                 f"- {TARGET}: {c['fp32']:g} TFLOP/s fp32, {c['tf32']:g} TF32, {c['fp16']:g} fp16/bf16 tensor, "
                 f"{c['bandwidth_gbs']:g} GB/s ({c['source']})",
                 f"- {src}: {CARDS[src]['fp32']:g} / {CARDS[src]['tf32']:g} / {CARDS[src]['fp16']:g} TFLOP/s, "
                 f"{CARDS[src]['bandwidth_gbs']:g} GB/s ({CARDS[src]['source']})",
                 f"- launch cost: {LAUNCH_SOURCE}", "",
                 f"| path | batch | measured here ms per call | {TARGET} ms per call | {TARGET} DDIM-10 ms | "
                 f"{TARGET} slices/s | old method ms per call |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in d["projection"]:
            old = "–" if r["old_ms"] is None else f"{r['old_ms']:.2f}"
            lines.append(f"| {r['path']} | {r['batch']} | {r['measured_ms']:.2f} | {r['projected_ms']:.2f} | "
                         f"{r['fuse_ms']:.1f} | {r['slices_per_s']:.1f} | {old} |")
        lines += ["", "The last column is the earlier whole-call method (the call's roofline floor divided by the "
                  "fraction of peak reached here), kept beside the new one for this run only: it charges launch "
                  "and idle time at the arithmetic's slow-down, so it overstates launch-bound paths."]
        return lines

    def _anchor_lines(self) -> list[str]:
        if not self.data["anchors"]:
            return []
        lines = ["", "## The projection against measurements on other cards", "",
                 "Each row's profiled kernels projected onto the other card kernel by kernel (tools/projection.py), beside what "
                 "that card measured for the same row.", "",
                 "| path | batch | projected from | onto | projected ms per call | measured ms per call | error |",
                 "|---|---:|---|---|---:|---:|---:|"]
        for r in self.data["anchors"]:
            lines.append(f"| {r['path']} | {r['batch']} | {r['from']} | {r['to']} | {r['projected_ms']:.2f} | "
                         f"{r['measured_ms']:.2f} | {100 * r['error']:+.0f}% |")
        return lines


def run_cli(report: Report, args: list[str], timeout: float) -> bool:
    """One `tfsdeploy` command as a new process; records exit code, time and its last line."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "tfsdeploy", *args], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
        code, text = res.returncode, (res.stdout + res.stderr).strip()
    except subprocess.TimeoutExpired:
        code, text = "timeout", f"stopped after {timeout:.0f} s"
    if "Traceback" in text:
        code = f"{code} (traceback)"
    shown = " ".join(re.sub(r".*/gpu-check-[^/]+/", "", a) for a in args)  # the temporary folder says nothing
    last = text.splitlines()[-1] if text else ""
    report.data["cli"].append({"command": f"tfsdeploy {shown}", "exit": code, "seconds": time.perf_counter() - t0,
                               "last": last.replace("|", "/")})
    report.write()
    print(f"[{code}] tfsdeploy {shown}: {last}", flush=True)
    return code == 0


def write_volumes(folder: Path, slices: int) -> list[str] | None:
    """T1 / T2 / SPECT volumes cut from the installed templates, as NIfTI files (None without nibabel)."""
    try:
        import nibabel as nib

        from tfsdeploy.data import load_spm_volumes
    except ImportError:
        return None
    vols = load_spm_volumes()
    mid = vols["t1"].shape[0] // 2
    keep = slice(mid - slices // 2, mid - slices // 2 + slices)
    paths = []
    for key in ("t1", "t2", "spect"):
        data = vols[key][keep][:, ::-1, :].transpose(2, 1, 0)  # back to [x, y, z], RAS
        paths.append(str(folder / f"{key}.nii.gz"))
        nib.save(nib.Nifti1Image(data.copy(), np.diag([2.0, 2.0, 2.0, 1.0])), paths[-1])
    return paths


def cli_checks(report: Report, work: Path, quick: bool) -> None:
    demo = work / "demo"
    run_cli(report, ["demo", "--out", str(demo), "--no-progress"], 300)
    inputs = [str(demo / f"{m}.png") for m in ("t1", "t2", "func")]
    for scale in (2, 4, 8):
        run_cli(report, ["fuse", *inputs, "--scale", str(scale), "--out", str(work / f"fused-x{scale}.png"),
                         "--no-progress"], 300)
    vols = write_volumes(work, 4 if quick else 91)
    if vols is None:
        report.data["notes"].append("volume fuse skipped: nibabel is not installed here")
    else:
        # a scan is a long job: on a GPU it builds the x4 member's AOTInductor package on first use
        run_cli(report, ["fuse", *vols, "--scale", "4", "--out", str(work / "fused.nii.gz"), "--no-progress"], 400)
    cold_start(report, inputs, work)
    ev = ["evaluate", "--limit", "1" if quick else "4", "--out", str(work / "eval"), "--no-progress"]
    run_cli(report, ev + (["--scales", "4"] if quick else []), 400)
    bench = ["bench", "-m", "default", "--sizes", "64" if quick else "256", "--batches", "1" if quick else "1,16",
             "--fuse-steps", "2" if quick else "10", "--ddpm-steps", "2" if quick else "20", "--repeats",
             "1" if quick else "10", "--engines", "torch-fp32,torch", "--cold-runs", "1" if quick else "3",
             "--out", str(work / "bench")]
    run_cli(report, bench, 400)


def cold_start(report: Report, inputs: list[str], work: Path) -> None:
    """A new process's one-shot x4 fuse with whatever the machine has built by now (on a GPU, the
    package the volume fuse compiled): the whole process, and the part after the imports."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "tfsdeploy.tools.coldstart", *inputs, str(work / "cold.png")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        report.data["notes"].append(f"cold start failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    else:
        inner = json.loads(res.stdout.strip().splitlines()[-1])
        report.data["cold_start"] = {"process_s": wall, "after_imports_s": inner["seconds"],
                                     "describe": inner["describe"]}
    report.write()


def time_ms(fn, repeats: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_path(path: BenchPath, ckpt: Path, cond: torch.Tensor, a: argparse.Namespace, cuda: bool):
    """One row: the pipeline built, a denoiser call and a DDIM-10 fuse timed, one call profiled."""
    t0 = time.perf_counter()
    pipe = path.load(ckpt)
    dev, batch = pipe.device, cond.shape[0]
    c = cond.to(dev)
    x, lvl = torch.randn(batch, 3, a.size, a.size).to(dev), torch.full((batch,), 0.5, device=dev)
    call = statistics.median(time_ms(lambda: pipe.denoiser(x, c, lvl), a.repeats, a.warmup, cuda))
    fused = pipe(c)  # warms the sampler path too
    setup = time.perf_counter() - t0
    fuse = statistics.median(time_ms(lambda: pipe(c), max(3, a.repeats // 3), 1, cuda))
    dtype = pipe.denoiser.dtype
    math = gpu_math(dtype) if cuda else "fp32"  # a CPU has no TF32
    elem = torch.tensor([], dtype=dtype).element_size()
    try:
        kernels = profile_call(lambda: pipe.denoiser(x, c, lvl), cuda, math, elem)
        profile_error = ""
    except Exception as e:  # noqa: BLE001 - a profiler that fails must not lose the timings
        kernels, profile_error = [], f"{type(e).__name__}: {e}"
    row = {"path": path.name, "batch": batch, "call_ms": call, "fuse_ms": fuse, "slices_per_s": batch / fuse * 1e3,
           "setup_s": setup, "engine": pipe.denoiser.describe(), "math": math,
           "precision": "fp32" if dtype == torch.float32 else "fp16", "profile_error": profile_error}
    return row, fused.float().cpu(), kernels


def latency_table(report: Report, a: argparse.Namespace, work: Path, cuda: bool) -> None:
    ckpt = random_checkpoint(a.preset, work / "paper")
    model, _ = build_from_checkpoint(ckpt)
    report.data["paper"] = {"preset": a.preset, "parameters": count_parameters(model), "size": a.size,
                            "gflop": count_flops(model, 1, a.size) / 1e9}
    gpu_name = report.data["device"].get("gpu", "")
    card = card_for(gpu_name) if cuda else None
    if not cuda:
        report.data["projection_note"] = ("No projection: this run measured a CPU, and the profile above lists CPU "
                                          "operators, not GPU kernels.")
    elif card is None:
        report.data["projection_note"] = f"No projection: {gpu_name} is not in the data-sheet table (CARDS)."
    elif card == TARGET:
        report.data["projection_note"] = f"No projection: the tables above are measured on the {TARGET} itself."
    weight_bytes = {p: sum(q.numel() for q in model.parameters()) * (4 if p == "fp32" else 2) for p in ("fp32", "fp16")}
    # FLOPs and bytes grow with the batch (the weights are read once): count at batch 1, on the CPU
    flops1 = report.data["paper"]["gflop"] * 1e9
    act_bytes = {p: count_bytes(model.to(torch.float32 if p == "fp32" else torch.float16), 1, a.size) - weight_bytes[p]
                 for p in ("fp32", "fp16")} if card else {}
    model.float()
    fused_ref: dict[int, torch.Tensor] = {}
    named: dict[int, list[Kernel]] = {}  # kernels an operator claimed, per batch, for "by name"
    for batch in (int(b) for b in a.batches.split(",")):
        g = torch.Generator().manual_seed(1)
        cond = torch.rand(batch, 5, a.size, a.size, generator=g)
        for path in (p for p in PATHS if cuda or not p.cuda_only):
            try:
                with tf32_mode(path.tf32):
                    row, fused, kernels = measure_path(path, ckpt, cond, a, cuda)
            except Exception as e:  # noqa: BLE001 - one failing path must not lose the others
                report.data["latency"].append({"path": path.name, "batch": batch, "error": f"{type(e).__name__}: {e}"})
                report.write()
                continue
            flops = flops1 * batch
            peak = gpu_peak_tflops(gpu_name, row["math"]) if cuda else None
            row["peak_tflops"] = peak
            row["fraction_of_peak"] = frac = flops / (row["call_ms"] / 1e3) / 1e12 / peak if peak else None
            try:
                check_fraction(frac, f"{path.name}, batch {batch}")
            except ValueError as e:
                row["fraction_error"] = str(e)
            if path.name == PATHS[0].name:
                fused_ref[batch] = fused
            ref = fused_ref.get(batch)
            row["psnr_vs_fp32"] = (None if ref is None or path.name == PATHS[0].name
                                   else min(200.0, float(psnr(fused, ref).mean())))
            report.data["latency"].append(row)
            kernels, idle_ms = record_profile(report, path, row, kernels, named.setdefault(batch, []), cuda, card)
            if card and card != TARGET and not kernels:
                report.data["notes"].append(f"{path.name}, batch {batch}: the profiler recorded no kernels "
                                            f"({row['profile_error'] or 'no error'}); no projection for this row")
            elif card and card != TARGET:
                nbytes = weight_bytes[row["precision"]] + batch * act_bytes[row["precision"]]
                old = project_ms(flops, nbytes, TARGET, row["math"], frac)["at_measured_efficiency_ms"]
                proj = project_call(kernels, card, TARGET, path.graph, gaps_us=idle_ms * 1e3)
                fuse = project_fuse(row["call_ms"], proj["projected_ms"], row["fuse_ms"], 10, batch)
                report.data["projection"].append({"path": path.name, "batch": batch, "measured_ms": row["call_ms"],
                                                  "source_card": card, "projected_ms": proj["projected_ms"],
                                                  "old_ms": old, **{k: fuse[k] for k in ("fuse_ms", "slices_per_s")}})
            print(f"{path.name}, batch {batch}: {row['call_ms']:.2f} ms per call, DDIM-10 {row['fuse_ms']:.1f} ms",
                  flush=True)
            report.write()
            if cuda:
                torch.cuda.empty_cache()  # the engine (and its CUDA graphs) went with measure_path
    report.data["aoti"] = {a.preset: v for v in AOTI_BUILDS.values()}


def record_profile(report: Report, path: BenchPath, row: dict, kernels: list[Kernel], named: list[Kernel],
                   cuda: bool, card: str | None) -> tuple[list[Kernel], float]:
    """The row's profiled call: its summary in the report, its kernels in the kernels file. Returns
    the kernels, given FLOPs and bytes by name where no operator claimed them, and the idle ms."""
    kernels = attribute_by_name(kernels, named)
    named += [k for k in kernels if k.source == "operator"]
    graph = path.graph and cuda
    busy = sum(k.dur_us for k in kernels) / 1e3
    idle = max(0.0, row["call_ms"] - busy)
    label = {"operator": "operator", "by name": "by name", "none": "assumed"}
    share: dict[str, float] = {}
    for k in kernels:
        share[label[k.source]] = share.get(label[k.source], 0.0) + (k.dur_us / (busy * 1e3) if busy else 0.0)
    report.data["profiles"].append({
        "path": path.name, "batch": row["batch"], "unit": "GPU kernels" if cuda else "CPU operators",
        "kernels": len(kernels), "busy_ms": busy, "idle_ms": idle, "graph": graph,
        "at_launch_floor": sum(k.dur_us <= LAUNCH_US for k in kernels), "time_share": share})
    report.kernels["profiles"].append({"path": path.name, "batch": row["batch"], "card": card, "graph": graph,
                                       "device": report.kernels["device"], "call_ms": row["call_ms"],
                                       "idle_ms": idle, "kernels": [k.as_row() for k in kernels]})
    return kernels, idle


def anchor_checks(report: Report, files: list[Path]) -> None:
    """Project each row profiled on another card (its -kernels.json) onto this one, and this run's
    rows onto that card, and keep how far each projection lands from the measurement."""
    here = {(p["path"], p["batch"]): p for p in report.kernels["profiles"]}
    for f in files:
        for o in json.loads(Path(f).read_text())["profiles"]:
            h = here.get((o["path"], o["batch"]))
            if h is None or not h["card"] or not o["card"] or h["card"] == o["card"] or not o["kernels"]:
                continue
            for src, dst in ((o, h), (h, o)):
                proj = project_call([Kernel.from_row(k) for k in src["kernels"]], src["card"], dst["card"],
                                    src["graph"], gaps_us=src["idle_ms"] * 1e3)["projected_ms"]
                report.data["anchors"].append({"path": o["path"], "batch": o["batch"], "from": src["device"],
                                               "to": dst["device"], "projected_ms": proj,
                                               "measured_ms": dst["call_ms"], "error": proj / dst["call_ms"] - 1})
    report.write()


def packaged_throughput(report: Report, a: argparse.Namespace, cuda: bool) -> None:
    pipe = FusionPipeline.load(None, 4, engine=EngineConfig(build_missing=True))  # as a scan runs it
    size = pipe.image_size
    batch = pipe.max_batch(size, cap=a.packaged_batch)
    cond = torch.rand(batch, 5, size, size).to(pipe.device)
    ms = statistics.median(time_ms(lambda: pipe(cond), 5, 2, cuda))
    one = statistics.median(time_ms(lambda: pipe(cond[:1]), 5, 2, cuda))
    report.data["packaged"] = {"batch": batch, "steps": pipe.steps, "fuse_ms": ms, "slices_per_s": batch / ms * 1e3,
                               "batch1_ms": one, "describe": pipe.describe()}
    report.write()


def min_batch(d: dict) -> int:
    """The first batch of the run: where the AOTInductor rows' set-up includes the package's build."""
    return min((r["batch"] for r in d["latency"]), default=1)


def default_slower_than_fp32(rows: list[dict]) -> list[str]:
    """Every batch at which the default path's DDIM-10 fuse is slower than the faster eager fp32 row."""
    out = []
    for r in (r for r in rows if r.get("path") == DEFAULT and "fuse_ms" in r):
        fp32 = [x["fuse_ms"] for x in rows if x.get("batch") == r["batch"] and "fuse_ms" in x
                and x["path"].startswith("eager fp32")]
        if fp32 and r["fuse_ms"] > min(fp32):
            out.append(f"batch {r['batch']}: {r['fuse_ms']:.1f} ms against {min(fp32):.1f} ms")
    return out


def judge(report: Report) -> None:
    d, out = report.data, []
    default = DEFAULT
    best1 = [r for r in d["latency"] if r.get("batch") == 1 and "fuse_ms" in r]
    if best1:
        r = min(best1, key=lambda r: r["fuse_ms"])
        out.append(f"DDIM-10 at batch 1 <= {TARGETS['ddim10_batch1_ms']:.0f} ms: best {r['fuse_ms']:.1f} ms "
                   f"({r['path']}) -> {'met' if r['fuse_ms'] <= TARGETS['ddim10_batch1_ms'] else 'not met'}")
        dflt = [r for r in best1 if r["path"] == default]
        if dflt:
            out.append(f"the default path at batch 1: {dflt[0]['fuse_ms']:.1f} ms (aim: 10 ms; floor about 4.5 ms) -> "
                       f"{'met' if dflt[0]['fuse_ms'] <= TARGETS['ddim10_batch1_ms'] else 'not met'}")
    slower = default_slower_than_fp32(d["latency"])
    if any(r.get("path") == default for r in d["latency"]):
        out.append("the default path is never slower than eager fp32" if not slower
                   else f"the default path is slower than eager fp32: {'; '.join(slower)}")
    setups = [(r["path"], r["batch"], r["setup_s"]) for r in d["latency"]
              if "setup_s" in r and "compile" not in r["path"] and not (r["path"].startswith("AOTInductor")
                                                                       and r["batch"] == min_batch(d))]
    if setups:
        worst = max(setups, key=lambda t: t[2])
        out.append(f"set-up per process once the artifact exists <= {TARGETS['setup_s']:.0f} s: worst {worst[2]:.1f} s "
                   f"({worst[0]}, batch {worst[1]}) -> {'met' if worst[2] <= TARGETS['setup_s'] else 'not met'}")
    if d["cold_start"]:
        c = d["cold_start"]["process_s"]
        out.append(f"cold start <= {TARGETS['cold_start_s']:.0f} s: {c:.1f} s -> "
                   f"{'met' if c <= TARGETS['cold_start_s'] else 'not met'}")
    rows = [r for r in d["latency"] if "slices_per_s" in r]
    if rows:
        r = max(rows, key=lambda r: r["slices_per_s"])
        out.append(f"paper preset >= {TARGETS['paper_slices_per_s']:.0f} slices/s: best {r['slices_per_s']:.0f} "
                   f"({r['path']}, batch {r['batch']}) -> "
                   f"{'met' if r['slices_per_s'] >= TARGETS['paper_slices_per_s'] else 'not met'}")
    if d["packaged"]:
        k = d["packaged"]["slices_per_s"]
        out.append(f"packaged model >= {TARGETS['packaged_slices_per_s']:.0f} slices/s: {k:.0f} -> "
                   f"{'met' if k >= TARGETS['packaged_slices_per_s'] else 'not met'}")
    failed = [r["command"] for r in d["cli"] if r["exit"] != 0]
    out.append("every command exited 0" if not failed else f"commands that failed: {', '.join(failed)}")
    bad = [r["fraction_error"] for r in d["latency"] if r.get("fraction_error")]
    if any(r.get("fraction_of_peak") is not None for r in d["latency"]):
        out.append("every fraction of peak <= 100%" if not bad else f"impossible fractions of peak: {'; '.join(bad)}")
    d["targets"] = out
    report.write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--packaged-batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small everything: a smoke test of the script")
    ap.add_argument("--skip-cli", action="store_true", help="only the latency table")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test of the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports")
    ap.add_argument("--anchor", type=Path, action="append", default=[], metavar="KERNELS_JSON",
                    help="a gpu-check-*-kernels.json from another card: project its rows onto this card and "
                         "this run's onto it, and report how far each lands from the measurement")
    a = ap.parse_args()
    for f in a.anchor:
        if not f.is_file():
            sys.exit(f"error: --anchor {f}: no such file")
    BATCHES_MAX[0] = max(int(b) for b in a.batches.split(","))
    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        sys.exit("error: no CUDA GPU; pass --allow-cpu to smoke-test the script on a CPU")
    report = Report(a.out, device_info(0), a)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if not a.skip_cli:
            cli_checks(report, work, a.quick)
        steps = [lambda: latency_table(report, a, work, cuda), lambda: packaged_throughput(report, a, cuda)]
        if a.anchor:
            steps.append(lambda: anchor_checks(report, a.anchor))
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - record it, keep what was measured
                report.data["notes"].append(f"a step failed: {type(e).__name__}: {e}")
                report.write()
    report.data["notes"].append(f"whole check: {time.perf_counter() - t0:.0f} s")
    judge(report)
    print(report.stem.with_suffix(".md").read_text())
    failed = [r for r in report.data["cli"] if r["exit"] != 0] + [r for r in report.data["latency"]
                                                                  if "error" in r or r.get("fraction_error")]
    failed += default_slower_than_fp32(report.data["latency"]) if cuda else []
    if failed or any(n.startswith("a step failed") for n in report.data["notes"]):
        sys.exit("error: some checks failed (see the report)")


if __name__ == "__main__":
    main()
