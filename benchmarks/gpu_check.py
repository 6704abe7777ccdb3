"""The GPU check: everything that matters on a CUDA machine, measured in order of importance within
a time budget, in one offline run (installs nothing, downloads nothing).

    python benchmarks/gpu_check.py --budget 420            # on a CUDA machine (benchmarks/gpu_session.sh)
    python benchmarks/gpu_check.py --budget 120 --quick --allow-cpu --preset tiny --size 64 \\
        --batches 1,2 --repeats 2 --warmup 1 --packaged-batch 2 --out /tmp/c    # smoke test (CI)

The rows, most important first (ROW_ORDER):

1. the device, torch and CUDA versions;
2. CUDA against the CPU for one fuse of the packaged x4 model: the default path on this machine
   against torch fp32 on the CPU, same seed, PSNR in dB;
3. the default path (torch fp16, one CUDA graph per fuse), paper preset, 256x256, x4, DDIM-10, batch 1;
4. the same at the larger batches (`--batches`, 16 and 64): slices/s;
5. the packaged x4 model as a scan runs it (its AOTInductor package built on first use, in a
   child process the budget can stop): slices/s at its largest batch;
6. the cold start: a new process's one-shot x4 fuse, with the package already built;
7. the package: build time, size, and its load in a new process;
8. eager fp32 with TF32 off (the reference of every PSNR column) and on;
9. the rest: eager fp16, the torch engine with a CUDA graph per call, the paper preset's
   AOTInductor package per call and as one graph per fuse, fp16 + torch.compile(reduce-overhead);
   then the per-kernel RTX 3090 projection (tfsdeploy/tools/projection.py; `--anchor` checks it
   against another card's measurement) and the command line, each `tfsdeploy` command a new
   process (`fuse` at x4, `evaluate` on a folder of held-out template slices the check writes, so it
   needs no built dataset, `fuse` of a volume, `demo`, `fuse` at x2 and x8, `bench`).

Each row is estimated before it starts: one that does not fit in what is left of `--budget` is
listed as not run, with the reason, and the next one is tried. Child processes (package builds,
commands, the cold start) are stopped when the budget runs out; timing loops stop early at it. The
report, benchmarks/reports/gpu-check-<device>.md and .json (and -kernels.json, the profiled
kernels, which `--anchor` reads back), is rewritten atomically after every row, so a run that is
cut off keeps what it measured. A row that fails is recorded and the next one runs; the check
then exits 1.

A latency row's label says what ran, not what was asked for: a path whose CUDA graph could not be
recorded says so (with the notice the pipeline gave), and only calls that really replay a graph
are projected without the gaps between kernels.
"""

from __future__ import annotations

import os
import time


def process_age() -> float:
    """Seconds since this process started (Linux: its start time in /proc; elsewhere 0), so that
    the budget also counts the interpreter's own start-up."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


T0 = time.monotonic() - process_age()  # the budget counts from the start of the process, imports included

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsdeploy.checkpoint import Configs, build_from_checkpoint  # noqa: E402
from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.metrics import psnr  # noqa: E402
from tfsdeploy.model import count_parameters  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.bench import random_checkpoint  # noqa: E402
from tfsdeploy.tools.hardware import (count_bytes, count_flops, device_info, device_name, gpu_math,  # noqa: E402
                                      gpu_peak_tflops, project_ms, tf32_mode)
from tfsdeploy.tools.projection import (CARDS, LAUNCH_SOURCE, LAUNCH_US, MATH_KINDS, Kernel,  # noqa: E402
                                        attribute_by_name, card_for, check_fraction, profile_call, project_call,
                                        project_fuse)


# ---------------------------------------------------------------------------------- rows and budget
class NotRun(Exception):
    """A row that cannot run here (no GPU, a package that is not installed): listed as not run."""


class Cut(Exception):
    """A row the budget stopped part-way (a child process killed at the budget)."""


@dataclass(frozen=True)
class Row:
    """One line of the check: `group` is its place in the order of importance (1 to 9),
    `estimate()` the seconds it is expected to take given what has been measured so far, and
    `run(left)` measures it into the report, given the seconds of the budget left."""

    key: str
    group: int
    title: str
    estimate: Callable[[], float]
    run: Callable[[float], None]


class Budget:
    """Seconds allowed from `start` (a reading of `clock`) on."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, start: float | None = None):
        self.seconds, self.clock = seconds, clock
        self.start = clock() if start is None else start

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def deadline(self) -> float:
        """The budget's end as a reading of `clock`."""
        return self.start + self.seconds


def run_rows(rows: list[Row], report: "Report", budget: Budget, log: Callable[[str], None] = print) -> None:
    """Each row in order: skipped (not run, with the reason) when its estimate exceeds what is left
    of the budget, else run; its status, time and any error go into the report, which is written
    after every row."""
    for row in rows:
        left = budget.left()
        try:
            est = float(row.estimate())
        except Exception as e:  # noqa: BLE001 - an estimate that fails must not stop the check
            est, why = 0.0, f"its estimate failed ({type(e).__name__}: {e}); run anyway"
            log(f"note: {row.title}: {why}")
        if est > left:
            status, why, took = "not run", f"needs about {est:.0f} s; {max(0.0, left):.0f} s of the budget left", 0.0
        else:
            t0 = budget.clock()
            try:
                row.run(left)
                status, why = "done", ""
            except NotRun as e:
                status, why = "not run", str(e)
            except Cut as e:
                status, why = "cut", str(e)
            except Exception as e:  # noqa: BLE001 - record it, keep what was measured, run the next row
                status, why = "failed", f"{type(e).__name__}: {first_line(e)}"
            took = budget.clock() - t0
        report.add_row({"key": row.key, "group": row.group, "title": row.title, "status": status,
                        "seconds": took, "estimate_s": est, "note": why})
        log(f"[{row.group}] {row.title}: {status}" + (f" ({why})" if why else "") + f", {took:.1f} s")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def last_json(out: str) -> dict:
    """The last line of a child's output that is a JSON object (warnings may follow it)."""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError(f"no JSON line in the child's output: {(out.splitlines() or ['(none)'])[-1][:200]}")


def run_child(args: list[str], timeout: float, env: dict | None = None) -> tuple[int | str, str, float]:
    """A child process in its own session, so that the budget stops it and everything it started
    (Inductor's compile workers): (exit code or "timeout", its output, wall seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = "timeout"
    finally:  # the check itself stopped (SIGTERM, Ctrl-C): its child goes with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, (out or "").strip(), time.monotonic() - t0


def time_ms(fn, repeats: int, warmup: int, cuda: bool, until: float = float("inf")) -> list[float]:
    """Milliseconds of `repeats` calls after `warmup` (CUDA events on a GPU); once time.monotonic()
    passes `until`, no further warm-up runs and timing stops after at least one timed call."""
    for _ in range(warmup):
        if time.monotonic() > until:
            break
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
        if time.monotonic() > until:
            break
    return out


def release_memory(cuda: bool, notes: list[str]) -> None:
    """Free what the last row held, on the default stream. After a failed capture the process may
    still be on the capture's side stream (torch.cuda.graph leaves it there when capture_end
    raises), and freeing can itself raise (the allocator may still believe a capture runs): each is
    recorded, never fatal."""
    gc.collect()
    if not cuda:
        return
    try:
        if torch.cuda.current_stream() != torch.cuda.default_stream():
            notes.append("a row left the process on a side stream; back on the default stream")
            torch.cuda.set_stream(torch.cuda.default_stream())
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - the rows measured so far are kept, the next rows still run
        notes.append(f"releasing GPU memory failed after a row: {type(e).__name__}: {first_line(e)}")


# ------------------------------------------------------------------------------------- latency paths
@dataclass(frozen=True)
class BenchPath:
    """A latency row's path: a key, and how to build its pipeline (x4, DDIM-10) from a checkpoint,
    handing `notice` what the pipeline says (a capture that fell back). `kind` sets its set-up
    estimate; `tf32`: TF32 for fp32 math while it runs (None: torch's defaults); `cuda_only`:
    not run on a CPU."""

    key: str
    load: Callable[[Path, Callable[[str], None]], FusionPipeline]
    kind: str = "eager"  # eager, graph, aoti or compile
    tf32: bool | None = None
    cuda_only: bool = False


def torch_path(key: str, engine: EngineConfig, **kw) -> BenchPath:
    return BenchPath(key, lambda ckpt, notice: FusionPipeline.load(ckpt, 4, SampleConfig(steps=10), engine,
                                                                   notice=notice), **kw)


EAGER_FP32 = EngineConfig(engine="torch", precision="fp32", cuda_graph=False, channels_last=False)
DEFAULT = "default: torch fp16, one CUDA graph per fuse"
FP32_OFF, FP32_ON = "eager fp32, TF32 off", "eager fp32, TF32 on"  # FP32_OFF: the reference of the PSNR column
AOTI_CALL, AOTI_FUSE = "AOTInductor fp16, per call, no graph", "AOTInductor fp16, one CUDA graph per fuse"


def aoti_path(key: str, whole_loop: bool) -> BenchPath:
    return BenchPath(key, lambda ckpt, notice: CHECK[0].aoti_pipeline(ckpt, whole_loop, notice), kind="aoti",
                     cuda_only=True)


CHECK: list["Check"] = []  # the running check, for the AOTInductor paths' package
PATHS = {p.key: p for p in [
    torch_path(DEFAULT, EngineConfig(engine="torch"), kind="graph"),
    torch_path(FP32_OFF, EAGER_FP32, tf32=False),
    torch_path(FP32_ON, EAGER_FP32, tf32=True),
    # the default path without its graphs: the launch cost they save, and names for their kernels' FLOPs
    # (on a CPU it would be eager fp32 again)
    torch_path("eager fp16, native GroupNorm", EngineConfig(engine="torch", cuda_graph=False), cuda_only=True),
    torch_path("torch fp16, a CUDA graph per call", EngineConfig(engine="torch", whole_loop=False), kind="graph",
               cuda_only=True),
    aoti_path(AOTI_CALL, whole_loop=False),
    aoti_path(AOTI_FUSE, whole_loop=True),
    torch_path("fp16, compile(reduce-overhead)", EngineConfig(engine="torch", compile=True, cuda_graph=False),
               kind="compile", cuda_only=True),
]}
GROUP8 = [FP32_OFF, FP32_ON]
GROUP9 = ["eager fp16, native GroupNorm", "torch fp16, a CUDA graph per call", AOTI_CALL, AOTI_FUSE,
          "fp16, compile(reduce-overhead)"]
TARGET = "RTX 3090"
TARGETS = {"ddim10_batch1_ms": 20.0, "paper_slices_per_s": 120.0, "packaged_slices_per_s": 1000.0,
           "setup_s": 10.0, "cold_start_s": 5.0}

# What a row is expected to cost before anything like it was measured. Never measured on a GPU:
# set-up seconds per kind of path (the package build of the paper preset included for "aoti"),
# seconds for the packaged model's first-use package build, and for a new process.
SETUP_S = {"cuda": {"eager": 8.0, "graph": 15.0, "aoti": 420.0, "compile": 180.0},
           "cpu": {"eager": 3.0, "graph": 3.0, "aoti": 3.0, "compile": 3.0}}
CALL_MS_PER_SLICE = {"cuda": 10.0, "cpu": 5.0}  # fp16 paper preset on a GPU; tiny at 64x64 on a CPU
PACKAGE_BUILD_S = 240.0
PROCESS_S = {"cuda": 15.0, "cpu": 12.0}  # a new process: interpreter, torch, the model, one fuse
TIMING_CAP_S = 20.0  # the longest a row's timed calls (and, again, its timed fuses) may run
EXIT_S = 5.0  # kept back from the rows: the verdict, the report and the interpreter's exit (seconds when loaded)


# ------------------------------------------------------------------------------------------- report
class Report:
    """The check's results, rewritten atomically (Markdown, JSON and the kernels file) after every
    row and whenever a row stores something it must not lose (a package build's timings)."""

    def __init__(self, out: Path, device: str, args: dict):
        name = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
        self.stem = out / f"gpu-check-{name}"
        self.data = {"device": {"device": device}, "date": time.strftime("%Y-%m-%d %H:%M"), "args": args,
                     "budget_s": args.get("budget"), "rows": [], "parity": None, "cli": [], "latency": [],
                     "paper": None, "packaged": None, "package": None, "cold_start": None, "aoti": {},
                     "profiles": [], "projection": [], "projection_note": "", "anchors": [], "notes": []}
        # every profiled kernel, for `--anchor` runs on other cards; kept out of the report's JSON
        self.kernels = {"device": device, "card": card_for(device), "profiles": []}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def kernels_path(self) -> Path:
        return self.stem.with_name(self.stem.name + "-kernels.json")

    def add_row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()

    def write(self) -> None:
        for path, text in ((self.stem.with_suffix(".json"), json.dumps(self.data, indent=2, default=str)),
                           (self.kernels_path, json.dumps(self.kernels)),
                           (self.stem.with_suffix(".md"), self.markdown())):
            with atomic_path(path) as tmp:
                tmp.write_text(text)

    def markdown(self) -> str:
        d, info = self.data, self.data["device"]
        lines = [f"# GPU check: {info['device']}", "", f"- {d['date']}; torch {info.get('torch', torch.__version__)}"
                 + (f", CUDA {info.get('cuda')}, driver {info.get('driver')}" if info.get("cuda") else "")
                 + (f", compute capability {info['compute_capability']}" if info.get("compute_capability") else ""),
                 f"- produced by `python benchmarks/gpu_check.py --budget {d['budget_s']:g}` in one run; every timing "
                 "below comes from it", "", "## Rows, in order of importance", "",
                 "| # | row | status | seconds | estimate s | note |", "|---:|---|---|---:|---:|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['group']} | {r['title']} | {r['status']} | {r['seconds']:.1f} | {r['estimate_s']:.0f} "
                         f"| {r['note'][:200].replace('|', '/')} |")
        if d["parity"]:
            p = d["parity"]
            lines += ["", f"CUDA against the CPU, one fuse of the packaged x4 model at {p['size']}x{p['size']} "
                      f"({p['image']}): **{p['psnr_db']:.1f} dB** PSNR of {p['device_path']} against {p['cpu_path']}."]
        if d["latency"]:
            lines += self._latency_lines()
        if d["packaged"]:
            k = d["packaged"]
            lines += ["", f"Packaged x4 model as a scan runs it ({k['describe']}), its own sampler "
                      f"(DDIM-{k['steps']}), "
                      f"{k['size']}x{k['size']}: batch {k['batch']}, {k['fuse_ms']:.1f} ms per batch, "
                      f"**{k['slices_per_s']:.0f} slices/s**; batch 1: {k['batch1_ms']:.1f} ms."]
        if d["cold_start"]:
            c = d["cold_start"]
            lines += ["", f"Cold start: a new process's one-shot x4 fuse of the packaged model, to its fused PNG: "
                      f"**{c['process_s']:.1f} s** whole process ({c['after_imports_s']:.1f} s after the imports), "
                      f"engine {c['describe']}."]
        if d["package"]:
            lines += ["", self._package_line("The packaged x4 model's AOTInductor package", d["package"])]
        for preset, b in d["aoti"].items():
            lines += ["", self._package_line(f"The {preset} preset's AOTInductor package (latency rows)", b)]
        if d["profiles"]:
            lines += self._profile_lines()
        lines += self._projection_lines() + self._anchor_lines()
        if d["cli"]:
            lines += ["", "## The command line on this device", "", "| command | exit | seconds | last line |",
                      "|---|---:|---:|---|"]
            for r in d["cli"]:
                lines.append(f"| `{r['command']}` | {r['exit']} | {r['seconds']:.1f} | {r['last'][:160]} |")
        if d.get("targets"):
            lines += ["", "## Targets", ""] + [f"- {t}" for t in d["targets"]]
        lines += [""] + [f"- note: {n}" for n in d["notes"]]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _package_line(what: str, b: dict) -> str:
        if "error" in b:
            return f"{what}: the build failed after {b.get('build_s', 0):.0f} s: {b['error']}"
        line = f"{what} ({b['megabytes']:.0f} MB): built in {b['build_s']:.0f} s once"
        if "load_s" in b:
            line += (f"; a new process loads it in {b['load_s']:.1f} s and makes its first call "
                     f"{b['first_call_s']:.2f} s later ({b['new_process_s']:.1f} s for the whole process, "
                     "interpreter and imports included)")
        elif "new_process_error" in b:
            line += f"; loading it in a new process failed: {b['new_process_error']}"
        return line + "."

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
                 "from its input shapes), else from kernels of the same name that an operator claimed in another "
                 "row at the same batch (\"by name\", filled in by the projection row), else the kernel is taken "
                 "as compute- or memory-bound by its name (\"assumed\").", "",
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




# -------------------------------------------------------------------------------------------- check
def cli_commands(quick: bool) -> list[tuple[str, float]]:
    """The command-line rows, most telling first: a name and its expected time in new processes
    (one process is the cold start's time, once measured)."""
    return [("fuse x4", 1.0), ("evaluate", 2.0), ("fuse a volume", 2.0), ("demo", 1.5), ("fuse x2", 1.0),
            ("fuse x8", 1.0), ("bench", 2.5 if quick else 8.0)]


class Check:
    """The state one run of the check shares between its rows: the options, the device, the
    report, the budget, the paper-preset checkpoint and what the rows measured."""

    def __init__(self, a: argparse.Namespace, cuda: bool, report: Report, budget: Budget, work: Path):
        self.a, self.cuda, self.report, self.budget, self.work = a, cuda, report, budget, work
        self.dev = "cuda" if cuda else "cpu"
        self.batches = [int(b) for b in a.batches.split(",")]
        self._ckpt: Path | None = None
        self._inputs: list[str] | None = None
        self.fused: dict[tuple[str, int], torch.Tensor] = {}  # (path key, batch) -> fused images, for PSNR
        self.aoti_package: Path | None = None  # the paper preset's package, built by the first AOTI row
        CHECK[:] = [self]

    @property
    def notes(self) -> list[str]:
        return self.report.data["notes"]

    def until(self, cap: float = TIMING_CAP_S) -> float:
        """When a timing loop stops: after `cap` seconds, or at the budget's end."""
        return min(time.monotonic() + cap, self.budget.deadline())

    # ---------------------------------------------------------------------------------- the plan
    def rows(self) -> list[Row]:
        """Every row, in the order of importance (module docstring)."""
        first, more = self.batches[0], self.batches[1:]
        rows = [Row("versions", 1, "device, torch and CUDA versions", lambda: 2.0, self.versions),
                Row("parity", 2, "CUDA against the CPU, one fuse of the packaged x4 model (dB)",
                    lambda: 20.0 if self.cuda else 10.0, self.parity),
                self.latency_row(3, DEFAULT, first)]
        rows += [self.latency_row(4, DEFAULT, b) for b in more]
        rows += [Row("packaged", 5, "the packaged x4 model's slices/s, as a scan runs it", self.estimate_packaged,
                     self.packaged),
                 Row("cold-start", 6, "cold start: a new process's one-shot x4 fuse, the package built",
                     lambda: self.process_s(), self.cold_start),
                 Row("package", 7, "the package: build time, size, load time in a new process",
                     self.estimate_package, self.package)]
        rows += [self.latency_row(8, key, b) for b in self.batches for key in GROUP8]
        rows += [self.latency_row(9, key, b) for b in self.batches for key in GROUP9]
        rows.append(Row("projection", 9, f"per-kernel projection onto the {TARGET}", lambda: 5.0, self.projection))
        if self.a.anchor:
            rows.append(Row("anchors", 9, "the projection against other cards' measurements", lambda: 2.0,
                            lambda left: anchor_checks(self.report, self.a.anchor)))
        if not self.a.skip_cli:
            rows += [Row(f"cli:{name}", 9, f"tfsdeploy {name}", lambda s=s: self.process_s(s),
                         lambda left, name=name: self.cli(name, left)) for name, s in cli_commands(self.a.quick)]
        return rows

    def latency_row(self, group: int, key: str, batch: int) -> Row:
        return Row(f"latency:{key}:{batch}", group, f"{key}, batch {batch}", lambda: self.estimate_latency(key, batch),
                   lambda left: self.latency(key, batch))

    # ------------------------------------------------------------------------------- estimates
    def process_s(self, processes: float = 1.0) -> float:
        """Seconds of work worth `processes` new processes: one is the cold start's time when it
        was measured, else a guess."""
        return processes * ((self.report.data["cold_start"] or {}).get("process_s") or PROCESS_S[self.dev])

    def estimate_latency(self, key: str, batch: int) -> float:
        """Set-up, then the timed calls and fuses (each loop capped at TIMING_CAP_S), the first
        fuse and the profiled call, from this path's measured times per slice where it ran at
        another batch, else the default path's (three times that for fp32), else a guess; with
        half again on top, for a machine whose load changes under the check."""
        path = PATHS[key]
        if path.cuda_only and not self.cuda:
            return 0.0
        done = [r for r in self.report.data["latency"] if r["key"] == key]
        setup = max((r["setup_s"] for r in done), default=SETUP_S[self.dev][path.kind])
        if path.kind == "aoti" and self.aoti_package is not None:
            setup = SETUP_S[self.dev]["graph"]
        ref = done or [r for r in self.report.data["latency"] if r["key"] == DEFAULT]
        slower = 3.0 if not done and "fp32" in key else 1.0
        call_ms = max((r["call_ms"] / r["batch"] for r in ref), default=CALL_MS_PER_SLICE[self.dev])
        fuse_ms = max((r["fuse_ms"] / r["batch"] for r in ref), default=10 * call_ms)
        call, fuse = (slower * batch * ms / 1e3 for ms in (call_ms, fuse_ms))
        a = self.a
        timing = (min(TIMING_CAP_S, (a.warmup + a.repeats) * call) + fuse
                  + min(TIMING_CAP_S, (1 + max(3, a.repeats // 3)) * fuse) + 2 * call)
        return 1.5 * (setup + timing)

    def estimate_packaged(self) -> float:
        build = PACKAGE_BUILD_S if self.cuda and self.report.data["package"] is None else 0.0
        return build + (20.0 if self.cuda else 10.0)

    def estimate_package(self) -> float:
        if not self.cuda:
            return 0.0
        return (PACKAGE_BUILD_S if self.report.data["package"] is None else 0.0) + self.process_s()

    # ------------------------------------------------------------------------------------- rows
    def versions(self, left: float) -> None:
        info = device_info(0)
        info["device"] = self.report.data["device"]["device"]  # the report's name, as its file is named
        self.report.data["device"] = info

    def reference_image(self, size: int):
        """One held-out SPM triplet at `size` (the templates, installed with spm-runtime)."""
        from tfsdeploy.data import reference_triplet

        try:
            return reference_triplet(size)
        except ImportError as e:
            raise NotRun(f"the SPM templates cannot be read here ({e})") from None

    def parity(self, left: float) -> None:
        """The packaged x4 model's fuse of one real triplet, the default path on this machine against
        torch fp32 on the CPU, from the same seed."""
        cpu = FusionPipeline.load(None, 4, engine=EngineConfig(engine="torch", device="cpu", precision="fp32"))
        here = FusionPipeline.load(None, 4, notice=self.notes.append)
        size = self.a.size if self.a.quick else cpu.image_size
        trip = self.reference_image(size)
        ref, out = cpu.fuse_triplet(trip, size), here.fuse_triplet(trip, size)
        self.report.data["parity"] = {
            "size": size, "image": "a held-out SPM triplet", "psnr_db": min(200.0, float(psnr(out[None], ref[None]))),
            "device_path": here.describe().split(", model ")[0], "cpu_path": cpu.describe().split(", model ")[0]}
        if not self.cuda:
            self.notes.append("no GPU: the parity row compared the CPU with itself")
        del cpu, here
        release_memory(self.cuda, self.notes)

    def paper_ckpt(self) -> Path:
        """The paper preset with random weights (speed does not depend on them), and its counts."""
        if self._ckpt is None:
            self._ckpt = random_checkpoint(self.a.preset, self.work / "paper")
            model, _ = build_from_checkpoint(self._ckpt)
            n = sum(q.numel() for q in model.parameters())
            weights = {p: n * d.itemsize for p, d in (("fp32", torch.float32), ("fp16", torch.float16))}
            self.report.data["paper"] = {
                "preset": self.a.preset, "parameters": count_parameters(model), "size": self.a.size,
                "gflop": count_flops(model, 1, self.a.size) / 1e9, "weight_bytes": weights,
                # activations move per slice, the weights once per call (meta device: shapes only)
                "activation_bytes": {p: count_bytes(model, 1, self.a.size, d) - weights[p]
                                     for p, d in (("fp32", torch.float32), ("fp16", torch.float16))}}
            del model
        return self._ckpt

    def latency(self, key: str, batch: int) -> None:
        path = PATHS[key]
        if path.cuda_only and not self.cuda:
            raise NotRun("needs a GPU")
        ckpt = self.paper_ckpt()
        cond = torch.rand(batch, 5, self.a.size, self.a.size, generator=torch.Generator().manual_seed(1))
        heard: list[str] = []
        try:
            with tf32_mode(path.tf32):
                row, fused, kernels = measure_path(path, ckpt, cond, self, heard.append)
        finally:
            self.notes.extend(f"{key}, batch {batch}: {n}" for n in heard)
            release_memory(self.cuda, self.notes)
        row["notices"] = heard
        flops = self.report.data["paper"]["gflop"] * 1e9 * batch
        peak = gpu_peak_tflops(self.report.data["device"].get("gpu", ""), row["math"]) if self.cuda else None
        row["peak_tflops"] = peak
        row["fraction_of_peak"] = frac = flops / (row["call_ms"] / 1e3) / 1e12 / peak if peak else None
        try:
            check_fraction(frac, f"{row['path']}, batch {batch}")
        except ValueError as e:
            row["fraction_error"] = str(e)
        self.fused[(key, batch)] = fused
        self.report.data["latency"].append(row)
        self.fill_psnr()
        record_profile(self.report, row, kernels, self.cuda)
        print(f"{row['path']}, batch {batch}: {row['call_ms']:.2f} ms per call, DDIM-10 {row['fuse_ms']:.1f} ms",
              flush=True)
        if row.get("fraction_error"):
            raise ValueError(row["fraction_error"])

    def fill_psnr(self) -> None:
        """Each row's fused images against eager fp32's at its batch, once both are measured."""
        for r in self.report.data["latency"]:
            ref = self.fused.get((FP32_OFF, r["batch"]))
            if r.get("psnr_vs_fp32") is None and ref is not None and r["key"] != FP32_OFF:
                r["psnr_vs_fp32"] = min(200.0, float(psnr(self.fused[(r["key"], r["batch"])], ref).mean()))

    def aoti_pipeline(self, ckpt: Path, whole_loop: bool, notice: Callable[[str], None]) -> FusionPipeline:
        """The paper preset's AOTInductor package (built by the first row that needs it, in a child
        process the budget stops), x4, DDIM-10; per call (no graph) or recorded as one graph per fuse."""
        from engines.aoti_engine import AotiDenoiser

        tried = self.report.data["aoti"].get(self.a.preset)
        if tried is not None and "error" in tried:  # built once per check, not again by every row
            raise (Cut if tried.get("cut") else RuntimeError)(f"the package build failed: {tried['error']}")
        if self.aoti_package is None:
            out = Path(ckpt).parent / "aoti"
            code = ("import json, sys, time; from pathlib import Path; t0 = time.perf_counter(); "
                    "from tfsdeploy.checkpoint import build_from_checkpoint; "
                    "from export.aoti_export import export_aoti; from export.onnx_export import default_spec; "
                    f"m, _ = build_from_checkpoint({str(ckpt)!r}); "
                    f"p, _ = export_aoti({str(ckpt)!r}, {str(out)!r}, 'cuda', default_spec(m, max_batch="
                    f"{max(self.batches)}), log=lambda s: print(s, flush=True)); "
                    "print(json.dumps({'package': str(p), 'build_s': time.perf_counter() - t0}))")
            info = build_in_child(code, self.budget.left())
            self.report.data["aoti"][self.a.preset] = info
            self.report.write()  # the build's timings before anything that can fail
            if info.get("cut"):
                raise Cut(f"the package build {info['error']}")
            if "error" in info:
                raise RuntimeError(f"the package build failed: {info['error']}")
            self.aoti_package = Path(info["package"])
            info.update(load_in_new_process(self.aoti_package, self.budget.left()))
            self.report.write()
        denoiser = AotiDenoiser(self.aoti_package)
        return FusionPipeline(denoiser, Configs.from_json(denoiser.meta["configs"]), 4, SampleConfig(steps=10),
                              whole_loop=whole_loop, notice=notice)

    def build_package(self, left: float) -> dict:
        """The packaged x4 model's AOTInductor package, built as a long job builds it on first use
        (FusionPipeline.load with build_missing), in a child process the budget stops."""
        code = ("import json, time; t0 = time.perf_counter(); from tfsdeploy.config import EngineConfig; "
                "from tfsdeploy.pipeline import FusionPipeline; "
                "p = FusionPipeline.load(None, 4, engine=EngineConfig(build_missing=True), "
                "notice=lambda s: print(s, flush=True)); "
                "print(json.dumps({'package': str(getattr(p.denoiser, 'path', '')), "
                "'build_s': time.perf_counter() - t0, 'describe': p.denoiser.describe()}))")
        info = build_in_child(code, left)
        if "error" not in info and not info["package"]:
            info = {"build_s": info["build_s"], "error": f"no package: the long job ran on {info['describe']}"}
        self.report.data["package"] = info
        self.report.write()  # the build's timings before anything that can fail
        return info

    def packaged(self, left: float) -> None:
        """The packaged x4 model as a scan runs it: the engine `auto` picks (on a GPU the package,
        built first), its own sampler, at its largest batch."""
        info = self.report.data["package"]
        if self.cuda and info is None:
            info = self.build_package(left)
        if info is not None and info.get("cut"):
            raise Cut(f"the package build {info['error']}")
        pipe = FusionPipeline.load(None, 4, notice=self.notes.append)
        size = self.a.size if self.a.quick else pipe.image_size
        batch = pipe.max_batch(size, cap=self.a.packaged_batch)
        cond = torch.rand(batch, 5, size, size).to(pipe.device)
        ms = statistics.median(time_ms(lambda: pipe(cond), 5, 2, self.cuda, self.until()))
        one = statistics.median(time_ms(lambda: pipe(cond[:1]), 5, 2, self.cuda, self.until()))
        self.report.data["packaged"] = {"batch": batch, "size": size, "steps": pipe.steps, "fuse_ms": ms,
                                        "slices_per_s": batch / ms * 1e3, "batch1_ms": one,
                                        "describe": pipe.describe().split(", model ")[0]}
        del pipe, cond
        release_memory(self.cuda, self.notes)
        if info is not None and "error" in info:
            raise RuntimeError(f"the package build failed, measured without it: {info['error']}")

    def package(self, left: float) -> None:
        if not self.cuda:
            raise NotRun("needs a GPU: the first-use package is built for CUDA")
        info = self.report.data["package"] or self.build_package(left)
        if info.get("cut"):
            raise Cut(f"the package build {info['error']}")
        if "error" in info:
            raise RuntimeError(f"the package build failed: {info['error']}")
        info.update(load_in_new_process(Path(info["package"]), self.budget.left()))
        self.report.write()
        if "new_process_error" in info:
            raise RuntimeError(f"loading the package in a new process failed: {info['new_process_error']}")

    def inputs(self) -> list[str]:
        """The three low-resolution PNGs a user hands to `fuse` (t1, t2, func; 64 px, for x4 at
        256), cut from the templates once."""
        if self._inputs is None:
            from tfsdeploy.inputs import write_triplet

            folder = self.work / "inputs"
            folder.mkdir(exist_ok=True)
            self._inputs = [str(p) for p in write_triplet(self.reference_image(256), folder, 64)]
        return self._inputs

    def cold_start(self, left: float) -> None:
        """A new process's one-shot x4 fuse with whatever the machine has built by now (on a GPU,
        the package): the whole process, and the part after the imports."""
        code, out, wall = run_child([sys.executable, "-m", "tfsdeploy.tools.coldstart", *self.inputs(),
                                     str(self.work / "cold.png")], self.budget.left())
        if code == "timeout":
            raise Cut(f"stopped after {wall:.0f} s: the budget ran out")
        if code != 0:
            raise RuntimeError(f"exit {code}: {(out.splitlines() or ['?'])[-1]}")
        inner = last_json(out)
        self.report.data["cold_start"] = {"process_s": wall, "after_imports_s": inner["seconds"],
                                          "describe": inner["describe"].split(", model ")[0]}

    def eval_folder(self, images: int) -> Path:
        """A user's folder of `images` held-out SPM triplets (t1/, t2/, func/NAME.png; no gt/, which
        evaluate makes classically), so `evaluate` needs no built dataset."""
        from tfsdeploy.data.spm import spm_plan
        from tfsdeploy.imaging import write_png

        root = self.work / "eval-data"
        try:
            splits, _ = spm_plan(["t1-t2-spect"], 256)
        except ImportError as e:
            raise NotRun(f"the SPM templates cannot be read here ({e})") from None
        for i, (name, images3, _) in enumerate(splits["test"]):
            if i == images:
                break
            for d, img in zip(("t1", "t2", "func"), images3):
                (root / d).mkdir(parents=True, exist_ok=True)
                write_png(root / d / f"{name}.png", img)
        return root

    def cli(self, name: str, left: float) -> None:
        """One `tfsdeploy` command as a new process: exit code, time, its last line, no traceback."""
        w, q = self.work, self.a.quick
        if name == "demo":
            args = ["demo", "--out", str(w / "demo"), "--no-progress"]
        elif name.startswith("fuse x"):
            s = name[len("fuse x"):]
            args = ["fuse", *self.inputs(), "--scale", s, "--out", str(w / f"fused-x{s}.png"), "--no-progress"]
        elif name == "fuse a volume":
            vols = write_volumes(w, 4 if q else 91)
            if vols is None:
                raise NotRun("nibabel is not installed here")
            # a scan is a long job: on a GPU it loads the x4 member's package (built by row 5)
            args = ["fuse", *vols, "--scale", "4", "--out", str(w / "fused.nii.gz"), "--no-progress"]
        elif name == "evaluate":
            args = ["evaluate", "--data", str(self.eval_folder(1 if q else 4)), "--limit", "1" if q else "4",
                    "--out", str(w / "eval"), "--no-progress"] + (["--scales", "4"] if q else [])
        else:
            args = ["bench", "-m", "default", "--sizes", "64" if q else "256", "--batches", "1" if q else "1,16",
                    "--fuse-steps", "2" if q else "10", "--ddpm-steps", "2" if q else "20", "--repeats",
                    "1" if q else "10", "--engines", "torch-fp32,torch", "--cold-runs", "1" if q else "3",
                    "--out", str(w / "bench")]
        code, text, wall = run_child([sys.executable, "-m", "tfsdeploy", *args], self.budget.left())
        if "Traceback" in text:
            code = f"{code} (traceback)"
        shown = " ".join(re.sub(r".*/gpu-check-[^/]+/", "", a) for a in args)  # the temporary folder says nothing
        last = text.splitlines()[-1] if text else ""
        if code == "timeout":
            last = f"stopped after {wall:.0f} s: the budget ran out"
        self.report.data["cli"].append({"command": f"tfsdeploy {shown}", "exit": code, "seconds": wall,
                                        "last": last.replace("|", "/")})
        print(f"[{code}] tfsdeploy {shown}: {last}", flush=True)
        if code == "timeout":
            raise Cut(last)
        if code != 0:
            raise RuntimeError(f"exit {code}: {last}")

    def projection(self, left: float) -> None:
        """Every profiled row's call projected onto the TARGET card, kernel by kernel."""
        d = self.report.data
        gpu = d["device"].get("gpu", "")
        card = card_for(gpu) if self.cuda else None
        if not self.cuda:
            d["projection_note"] = ("No projection: this run measured a CPU, and the profiles list CPU operators, "
                                    "not GPU kernels.")
        elif card is None:
            d["projection_note"] = f"No projection: {gpu} is not in the data-sheet table (CARDS)."
        elif card == TARGET:
            d["projection_note"] = f"No projection: the tables above are measured on the {TARGET} itself."
        if d["projection_note"]:
            raise NotRun(d["projection_note"])
        project_rows(self.report, card)


def build_in_child(code: str, timeout: float) -> dict:
    """A package build in a child process (`code` prints a JSON line with `package` and `build_s`
    last): that line, with its size, or the error."""
    status, out, wall = run_child([sys.executable, "-c", code], timeout)
    if status == "timeout":
        return {"build_s": wall, "error": f"stopped after {wall:.0f} s: the budget ran out", "cut": True}
    if status != 0:
        return {"build_s": wall, "error": f"exit {status}: {(out.splitlines() or ['?'])[-1][:300]}"}
    info = last_json(out)
    if info.get("package"):
        info["megabytes"] = Path(info["package"]).stat().st_size / 1e6
    return info


def load_in_new_process(path: Path, timeout: float) -> dict:
    """A new process that loads the package and makes one call: its wall time, and the load and
    first call measured inside it."""
    code = ("import json, time; t0 = time.perf_counter(); import torch; from engines.aoti_engine import AotiDenoiser; "
            f"d = AotiDenoiser({str(path)!r}); t1 = time.perf_counter(); s = d.spec.opt_size; "
            "d(torch.randn(1, 3, s, s), torch.randn(1, 5, s, s), torch.rand(1)); torch.cuda.synchronize(); "
            "print(json.dumps({'load_s': t1 - t0, 'first_call_s': time.perf_counter() - t1}))")
    status, out, wall = run_child([sys.executable, "-c", code], timeout)
    if status != 0:
        return {"new_process_error": f"exit {status}: {(out.splitlines() or ['?'])[-1]}"}
    return {"new_process_s": wall, **last_json(out)}


def write_volumes(folder: Path, slices: int) -> list[str] | None:
    """T1 / T2 / SPECT volumes cut from the installed templates, as NIfTI files (None without nibabel)."""
    try:
        import nibabel as nib
        import numpy as np

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


def call_replays_graph(denoiser, cuda: bool) -> bool:
    """Whether a denoiser call replays a CUDA graph: the torch engine's own per-call graph (off
    once its capture failed), or torch.compile's reduce-overhead graphs unless Inductor skipped
    them. An AOTInductor package has none of its own."""
    if not cuda:
        return False
    if getattr(denoiser, "compiled", False):
        from torch._dynamo.utils import counters

        return not counters["inductor"]["cudagraph_skips"]
    return bool(getattr(denoiser, "cuda_graph", False))


def row_label(path: BenchPath, cuda: bool, call_graph: bool, fuse_graph: bool, engine: str = "") -> str:
    """The path's name, and on a GPU what it fell back to: another engine than the package it
    asked for (`engine`, the name of the one that ran), or no graph where it asked for one (the
    whole fuse's, or the per-call one's)."""
    if not cuda:
        return path.key
    if path.kind == "aoti" and engine and engine != "aoti":
        return f"{path.key} (fell back: the {engine} engine" + (", one CUDA graph per fuse)" if fuse_graph else ")")
    if path.key in (DEFAULT, AOTI_FUSE):
        return path.key if fuse_graph else f"{path.key} (fell back: no whole-fuse graph)"
    if path.kind in ("graph", "compile") and not call_graph:
        return f"{path.key} (fell back: no per-call graph)"
    return path.key


def measure_path(path: BenchPath, ckpt: Path, cond: torch.Tensor, check: Check, notice: Callable[[str], None]):
    """One row: the pipeline built, a denoiser call and a DDIM-10 fuse timed, one call profiled;
    labelled by what ran (a graph that could not be recorded is named, and not counted as one)."""
    a, cuda = check.a, check.cuda
    t0 = time.perf_counter()
    pipe = path.load(ckpt, notice)
    dev, batch = pipe.device, cond.shape[0]
    c = cond.to(dev)
    x, lvl = torch.randn(batch, 3, a.size, a.size).to(dev), torch.full((batch,), 0.5, device=dev)
    call = statistics.median(time_ms(lambda: pipe.denoiser(x, c, lvl), a.repeats, a.warmup, cuda, check.until()))
    fused = pipe(c)  # warms the sampler path, and records the whole fuse where it can be
    setup = time.perf_counter() - t0
    fuse = statistics.median(time_ms(lambda: pipe(c), max(3, a.repeats // 3), 1, cuda, check.until()))
    dtype = pipe.denoiser.dtype
    math = gpu_math(dtype) if cuda else "fp32"  # a CPU has no TF32
    kernels, profile_error = [], "not profiled: the budget ran out"
    if time.monotonic() < check.budget.deadline():
        try:
            kernels = profile_call(lambda: pipe.denoiser(x, c, lvl), cuda, math, dtype.itemsize)
            profile_error = ""
        except Exception as e:  # noqa: BLE001 - a profiler that fails must not lose the timings
            profile_error = f"{type(e).__name__}: {e}"
    call_graph = call_replays_graph(pipe.denoiser, cuda)
    fuse_graph = pipe.loop is not None and pipe.loop.supports(pipe.sample)
    engine = pipe.denoiser.describe() + (", one CUDA graph per fuse" if fuse_graph else "")
    label = row_label(path, cuda, call_graph, fuse_graph, getattr(pipe.denoiser, "name", ""))
    row = {"key": path.key, "path": label, "batch": batch, "call_ms": call, "fuse_ms": fuse,
           "slices_per_s": batch / fuse * 1e3, "setup_s": setup, "engine": engine, "math": math,
           "precision": "fp32" if dtype == torch.float32 else "fp16", "call_graph": call_graph,
           "fuse_graph": fuse_graph, "profile_error": profile_error, "psnr_vs_fp32": None}
    return row, fused.float().cpu(), kernels


def record_profile(report: Report, row: dict, kernels: list[Kernel], cuda: bool) -> None:
    """The row's profiled call: its summary in the report, its kernels in the kernels file.
    `graph`: the profiled call replays a CUDA graph, so its projection adds no gaps between kernels."""
    busy = sum(k.dur_us for k in kernels) / 1e3
    idle = max(0.0, row["call_ms"] - busy)
    report.data["profiles"].append({
        "path": row["path"], "batch": row["batch"], "unit": "GPU kernels" if cuda else "CPU operators",
        "kernels": len(kernels), "busy_ms": busy, "idle_ms": idle, "graph": row["call_graph"],
        "at_launch_floor": sum(k.dur_us <= LAUNCH_US for k in kernels), "time_share": time_share(kernels)})
    report.kernels["profiles"].append({"path": row["path"], "key": row["key"], "batch": row["batch"],
                                       "card": report.kernels["card"] if cuda else None, "graph": row["call_graph"],
                                       "device": report.kernels["device"], "call_ms": row["call_ms"],
                                       "idle_ms": idle, "kernels": [k.as_row() for k in kernels]})


def time_share(kernels: list[Kernel]) -> dict[str, float]:
    """The share of the busy time whose FLOPs and bytes came from each source."""
    label = {"operator": "operator", "by name": "by name", "none": "assumed"}
    busy = sum(k.dur_us for k in kernels)
    share: dict[str, float] = {}
    for k in kernels:
        share[label[k.source]] = share.get(label[k.source], 0.0) + (k.dur_us / busy if busy else 0.0)
    return share


def project_rows(report: Report, card: str) -> None:
    """Kernels no operator claimed (graph replays) borrow FLOPs and bytes by name from every row
    profiled at the same batch; then each row's call and DDIM-10 fuse are projected onto TARGET,
    beside the earlier whole-call method."""
    d = report.data
    rows = {(r["path"], r["batch"]): r for r in d["latency"]}
    named: dict[int, list[Kernel]] = {}
    for p in report.kernels["profiles"]:
        named.setdefault(p["batch"], []).extend(k for k in map(Kernel.from_row, p["kernels"]) if k.source == "operator")
    for p, summary in zip(report.kernels["profiles"], d["profiles"]):
        r = rows[(p["path"], p["batch"])]
        kernels = attribute_by_name([Kernel.from_row(k) for k in p["kernels"]], named[p["batch"]])
        p["kernels"] = [k.as_row() for k in kernels]
        summary["time_share"] = time_share(kernels)
        if not kernels:
            d["notes"].append(f"{p['path']}, batch {p['batch']}: the profiler recorded no kernels "
                              f"({r['profile_error'] or 'no error'}); no projection for this row")
            continue
        paper = d["paper"]
        nbytes = paper["weight_bytes"][r["precision"]] + p["batch"] * paper["activation_bytes"][r["precision"]]
        flops = paper["gflop"] * 1e9 * p["batch"]
        old = project_ms(flops, nbytes, TARGET, r["math"], r["fraction_of_peak"])["at_measured_efficiency_ms"]
        proj = project_call(kernels, card, TARGET, p["graph"], gaps_us=p["idle_ms"] * 1e3)
        fuse = project_fuse(r["call_ms"], proj["projected_ms"], r["fuse_ms"], 10, p["batch"])
        d["projection"].append({"path": p["path"], "batch": p["batch"], "measured_ms": r["call_ms"],
                                "source_card": card, "projected_ms": proj["projected_ms"], "old_ms": old,
                                **{k: fuse[k] for k in ("fuse_ms", "slices_per_s")}})


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


# -------------------------------------------------------------------------------------------- verdict
def default_slower_than_fp32(rows: list[dict]) -> list[str]:
    """Every batch at which the default path's DDIM-10 fuse is slower than the faster eager fp32 row."""
    out = []
    for r in (r for r in rows if r["key"] == DEFAULT):
        fp32 = [x["fuse_ms"] for x in rows if x["batch"] == r["batch"] and x["key"] in GROUP8]
        if fp32 and r["fuse_ms"] > min(fp32):
            out.append(f"batch {r['batch']}: {r['fuse_ms']:.1f} ms against {min(fp32):.1f} ms")
    return out


def judge(report: Report) -> None:
    """The targets, each met or not, from what was measured."""
    d, out = report.data, []
    best1 = [r for r in d["latency"] if r["batch"] == 1]
    if best1:
        r = min(best1, key=lambda r: r["fuse_ms"])
        out.append(f"DDIM-10 at batch 1 <= {TARGETS['ddim10_batch1_ms']:.0f} ms: best {r['fuse_ms']:.1f} ms "
                   f"({r['path']}) -> {'met' if r['fuse_ms'] <= TARGETS['ddim10_batch1_ms'] else 'not met'}")
        dflt = [r for r in best1 if r["key"] == DEFAULT]
        if dflt:
            out.append(f"the default path at batch 1: {dflt[0]['fuse_ms']:.1f} ms -> "
                       f"{'met' if dflt[0]['fuse_ms'] <= TARGETS['ddim10_batch1_ms'] else 'not met'}")
    slower = default_slower_than_fp32(d["latency"])
    if any(r["key"] == DEFAULT for r in d["latency"]) and any(r["key"] in GROUP8 for r in d["latency"]):
        out.append("the default path is never slower than eager fp32" if not slower
                   else f"the default path is slower than eager fp32: {'; '.join(slower)}")
    setups = [(r["path"], r["batch"], r["setup_s"]) for r in d["latency"] if r["key"] not in GROUP9[2:]]
    if setups:
        worst = max(setups, key=lambda t: t[2])
        out.append(f"set-up per process once the artifact exists <= {TARGETS['setup_s']:.0f} s: worst {worst[2]:.1f} s "
                   f"({worst[0]}, batch {worst[1]}) -> {'met' if worst[2] <= TARGETS['setup_s'] else 'not met'}")
    if d["cold_start"]:
        c = d["cold_start"]["process_s"]
        out.append(f"cold start <= {TARGETS['cold_start_s']:.0f} s: {c:.1f} s -> "
                   f"{'met' if c <= TARGETS['cold_start_s'] else 'not met'}")
    if d["latency"]:
        r = max(d["latency"], key=lambda r: r["slices_per_s"])
        out.append(f"paper preset >= {TARGETS['paper_slices_per_s']:.0f} slices/s: best {r['slices_per_s']:.0f} "
                   f"({r['path']}, batch {r['batch']}) -> "
                   f"{'met' if r['slices_per_s'] >= TARGETS['paper_slices_per_s'] else 'not met'}")
    if d["packaged"]:
        k = d["packaged"]["slices_per_s"]
        out.append(f"packaged model >= {TARGETS['packaged_slices_per_s']:.0f} slices/s: {k:.0f} -> "
                   f"{'met' if k >= TARGETS['packaged_slices_per_s'] else 'not met'}")
    spent, budget = d.get("seconds", 0.0), d["budget_s"]
    out.append(f"the whole check within its budget ({budget:g} s, plus 10 %): {spent:.0f} s -> "
               f"{'met' if spent <= 1.1 * budget else 'not met'}")
    counts = {s: sum(r["status"] == s for r in d["rows"]) for s in ("done", "failed", "cut", "not run")}
    out.append("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    d["targets"] = out
    report.write()


def failures(report: Report, cuda: bool) -> list[str]:
    """What makes the check fail: a row that failed, and on a GPU a default path slower than fp32."""
    out = [f"{r['title']}: {r['note']}" for r in report.data["rows"] if r["status"] == "failed"]
    return out + (default_slower_than_fp32(report.data["latency"]) if cuda else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for the whole check, package builds included (rows that do not fit are not run)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,16,64", help="the first is row 3's batch, the others row 4's")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--packaged-batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small everything: a smoke test of the script")
    ap.add_argument("--skip-cli", action="store_true", help="no command-line rows")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test of the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports")
    ap.add_argument("--anchor", type=Path, action="append", default=[], metavar="KERNELS_JSON",
                    help="a gpu-check-*-kernels.json from another card: project its rows onto this card and "
                         "this run's onto it, and report how far each lands from the measurement")
    return ap.parse_args(argv)


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.budget <= 0:
        refuse(f"--budget must be positive, got {a.budget:g}")
    try:
        batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        refuse(f"--batches must be positive integers separated by commas, got {a.batches!r}")
    for f in a.anchor:
        if not f.is_file():
            refuse(f"--anchor {f}: no such file")
    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        refuse("no CUDA GPU; pass --allow-cpu to smoke-test the script on a CPU")
    report = Report(a.out, device_name(), vars(a))
    budget = Budget(a.budget - min(EXIT_S, a.budget / 10), start=T0)
    # stopped from outside (`timeout`): unwind, so that a running child's session is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(a, cuda, report, budget, Path(tmp))
        run_rows(check.rows(), report, budget)
    report.data["seconds"] = time.monotonic() - T0
    report.data["notes"].append(f"whole check: {report.data['seconds']:.0f} s of a budget of {a.budget:g} s")
    judge(report)
    print(report.stem.with_suffix(".md").read_text())
    failed = failures(report, cuda)
    if failed:
        print(f"error: some checks failed: {'; '.join(failed)[:1000]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
