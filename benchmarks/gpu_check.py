"""The GPU check: the real command line on a CUDA machine, then the paper-preset latency table, in one
offline run (installs nothing, downloads nothing) of under 8 minutes, compile included.

    python benchmarks/gpu_check.py                         # on a CUDA machine
    python benchmarks/gpu_check.py --quick --allow-cpu --out /tmp/c   # smoke test anywhere (CI)

1. `tfsdeploy demo`, then `tfsdeploy fuse` of its inputs at x2, x4 and x8 with the packaged model,
   `fuse` of a volume (three NIfTI files cut from the installed templates), `evaluate --limit 4`
   and `bench`, each as a new process: exit code, wall time, last line, no traceback.
2. The paper preset (random weights: speed does not depend on them), 256x256, x4, DDIM-10, through
   FusionPipeline: eager fp32, the default CUDA path (fp16, channels-last, CUDA graphs) and fp16 +
   torch.compile(reduce-overhead), at batch 1, 16 and 64; per denoiser call, per DDIM-10 fuse and in
   slices/s, with the fused-image PSNR of each path against eager fp32. And the packaged x4 model
   with its own sampler (DDIM-2) at its largest batch.
3. A projected RTX 3090 column from each call's FLOPs and bytes and the card's data-sheet peaks.

It writes benchmarks/reports/gpu-check-<device>.md and .json, rewritten after every step, so a run
cut short keeps what it measured. A step that fails is recorded and the next one runs.
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsdeploy.checkpoint import build_from_checkpoint  # noqa: E402
from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.metrics import psnr  # noqa: E402
from tfsdeploy.model import count_parameters  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.bench import random_checkpoint  # noqa: E402
from tfsdeploy.tools.hardware import count_bytes, count_flops, device_info, gpu_peak_tflops, project_ms  # noqa: E402

PATHS = {  # label -> EngineConfig of the torch engine
    "eager fp32": EngineConfig(engine="torch", precision="fp32", cuda_graph=False, channels_last=False),
    "default: fp16, channels-last, CUDA graph": EngineConfig(engine="torch"),
    "fp16, channels-last, compile(reduce-overhead)": EngineConfig(engine="torch", compile=True, cuda_graph=False),
}
TARGETS = {"ddim10_batch1_ms": 20.0, "paper_slices_per_s": 120.0, "packaged_slices_per_s": 1000.0}


class Report:
    def __init__(self, out: Path, info: dict, args: argparse.Namespace):
        name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
        self.stem = out / f"gpu-check-{name}"
        self.data = {"device": info, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "cli": [],
                     "latency": [], "packaged": None, "projection": [], "notes": []}
        out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        d, info = self.data, self.data["device"]
        self.stem.with_suffix(".json").write_text(json.dumps(d, indent=2, default=str))
        lines = [f"# GPU check: {info['device']}", "", f"- {d['date']}; torch {info['torch']}"
                 + (f", CUDA {info.get('cuda')}, driver {info.get('driver')}" if info.get("cuda") else ""),
                 "- produced by `python benchmarks/gpu_check.py` in one run; every timing below comes from it", "",
                 "## The command line on this device", "", "| command | exit | seconds | last line |", "|---|---:|---:|---|"]
        for r in d["cli"]:
            lines.append(f"| `{r['command']}` | {r['exit']} | {r['seconds']:.1f} | {r['last'][:160]} |")
        if d["latency"]:
            p = d["paper"]
            lines += ["", f"## {p['preset'].capitalize()} preset ({p['parameters'] / 1e6:.1f} M parameters, {p['gflop']:.0f} GFLOP per call "
                      f"at batch 1), {p['size']}x{p['size']}, x4, DDIM-10", "",
                      "Medians after warm-up; CUDA-event timing. A DDIM-10 fuse is FusionPipeline on a condition "
                      "already on the GPU: ten denoiser calls and the sampler around them.", "",
                      "| path | runs as | batch | ms per call | DDIM-10 ms | slices/s | of peak | fused PSNR vs fp32 | "
                      "set-up s |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in d["latency"]:
                if "error" in r:
                    lines.append(f"| {r['path']} | | {r['batch']} | failed: {r['error'][:120]} | | | | | |")
                    continue
                frac = "–" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.0f}%"
                ps = "–" if r.get("psnr_vs_fp32") is None else f"{r['psnr_vs_fp32']:.1f} dB"
                lines.append(f"| {r['path']} | {r['engine']} | {r['batch']} | {r['call_ms']:.2f} | {r['fuse_ms']:.1f} | "
                             f"{r['slices_per_s']:.1f} | {frac} | {ps} | {r['setup_s']:.1f} |")
        if d["packaged"]:
            k = d["packaged"]
            lines += ["", f"Packaged x4 model, default path, its own sampler (DDIM-{k['steps']}): batch {k['batch']}, "
                      f"{k['fuse_ms']:.1f} ms per batch, **{k['slices_per_s']:.0f} slices/s**; batch 1: "
                      f"{k['batch1_ms']:.1f} ms."]
        if d["projection"]:
            lines += ["", "## RTX 3090: a projection, not a measurement", "",
                      "From each call's FLOPs and bytes (weights read once, every layer output written and read once) "
                      "and the RTX 3090's data-sheet peaks (35.6 TFLOP/s fp32, 71 TFLOP/s fp16 tensor with fp32 "
                      "accumulation, 936 GB/s): the roofline floor, and that floor at the fraction of peak the same "
                      "path reached here.", "",
                      "| path | batch | measured here ms | MB per call | 3090 floor ms | 3090 at this efficiency ms |",
                      "|---|---:|---:|---:|---:|---:|"]
            for r in d["projection"]:
                eff = "–" if r["at_measured_efficiency_ms"] is None else f"{r['at_measured_efficiency_ms']:.2f}"
                lines.append(f"| {r['path']} | {r['batch']} | {r['measured_ms']:.2f} | {r['mbytes']:.0f} | "
                             f"{r['floor_ms']:.2f} | {eff} |")
        if d.get("targets"):
            lines += ["", "## Targets", ""] + [f"- {t}" for t in d["targets"]]
        lines += [""] + [f"- note: {n}" for n in d["notes"]]
        self.stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


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
        run_cli(report, ["fuse", *vols, "--scale", "4", "--out", str(work / "fused.nii.gz"), "--no-progress"], 300)
    ev = ["evaluate", "--limit", "1" if quick else "4", "--out", str(work / "eval"), "--no-progress"]
    run_cli(report, ev + (["--scales", "4"] if quick else []), 400)
    bench = ["bench", "-m", "default", "--sizes", "64" if quick else "256", "--batches", "1" if quick else "1,16",
             "--fuse-steps", "2" if quick else "10", "--ddpm-steps", "2" if quick else "20", "--repeats",
             "1" if quick else "10", "--engines", "torch,torch-fast", "--cold-runs", "1" if quick else "3",
             "--out", str(work / "bench")]
    run_cli(report, bench, 400)


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


def latency_table(report: Report, a: argparse.Namespace, work: Path, cuda: bool) -> None:
    ckpt = random_checkpoint(a.preset, work / "paper")
    model, _ = build_from_checkpoint(ckpt)
    report.data["paper"] = {"preset": a.preset, "parameters": count_parameters(model), "size": a.size,
                            "gflop": count_flops(model, 1, a.size) / 1e9}
    gpu_name = report.data["device"].get("gpu", "")
    weight_bytes = {p: sum(q.numel() for q in model.parameters()) * (4 if p == "fp32" else 2) for p in ("fp32", "fp16")}
    # FLOPs and bytes grow with the batch (the weights are read once): count at batch 1, on the CPU
    flops1 = report.data["paper"]["gflop"] * 1e9
    act_bytes = {p: count_bytes(model.to(torch.float32 if p == "fp32" else torch.float16), 1, a.size) - weight_bytes[p]
                 for p in ("fp32", "fp16")} if cuda else {}
    model.float()
    fused_fp32 = {}
    paths = {k: v for k, v in PATHS.items() if cuda or not v.compile}
    for batch in (int(b) for b in a.batches.split(",")):
        g = torch.Generator().manual_seed(1)
        cond = torch.rand(batch, 5, a.size, a.size, generator=g)
        for label, engine_cfg in paths.items():
            t0 = time.perf_counter()
            try:
                pipe = FusionPipeline.load(ckpt, 4, SampleConfig(steps=10), engine_cfg)
                dev = pipe.device
                c = cond.to(dev)
                x, lvl = torch.randn(batch, 3, a.size, a.size).to(dev), torch.full((batch,), 0.5, device=dev)
                call = statistics.median(time_ms(lambda: pipe.denoiser(x, c, lvl), a.repeats, a.warmup, cuda))
                fused = pipe(c)  # warms the sampler path too
                setup = time.perf_counter() - t0
                fuse = statistics.median(time_ms(lambda: pipe(c), max(3, a.repeats // 3), 1, cuda))
            except Exception as e:  # noqa: BLE001 - one failing path must not lose the others
                report.data["latency"].append({"path": label, "batch": batch, "error": f"{type(e).__name__}: {e}"})
                report.write()
                continue
            flops = flops1 * batch
            precision = "fp32" if pipe.denoiser.dtype == torch.float32 else "fp16"
            peak = gpu_peak_tflops(gpu_name, precision) if cuda else None
            frac = flops / (call / 1e3) / 1e12 / peak if peak else None
            if label == "eager fp32":
                fused_fp32[batch] = fused.float().cpu()
            ref = fused_fp32.get(batch)
            row = {"path": label, "batch": batch, "call_ms": call, "fuse_ms": fuse, "slices_per_s": batch / fuse * 1e3,
                   "fraction_of_peak": frac, "setup_s": setup, "engine": pipe.denoiser.describe(),
                   "psnr_vs_fp32": None if ref is None or label == "eager fp32" else
                   min(200.0, float(psnr(fused.float().cpu(), ref).mean()))}
            report.data["latency"].append(row)
            if cuda:
                nbytes = weight_bytes[precision] + batch * act_bytes[precision]
                proj = project_ms(flops, nbytes, "RTX 3090", precision, frac)
                report.data["projection"].append({"path": label, "batch": batch, "measured_ms": call,
                                                  "mbytes": nbytes / 1e6, **proj})
            print(f"{label}, batch {batch}: {call:.2f} ms per call, DDIM-10 {fuse:.1f} ms", flush=True)
            report.write()
            pipe = None  # free the engine (and its CUDA graphs) before the next one
            if cuda:
                torch.cuda.empty_cache()


def packaged_throughput(report: Report, a: argparse.Namespace, cuda: bool) -> None:
    pipe = FusionPipeline.load(None, 4)
    size = pipe.image_size
    batch = pipe.max_batch(size, cap=a.packaged_batch)
    cond = torch.rand(batch, 5, size, size).to(pipe.device)
    ms = statistics.median(time_ms(lambda: pipe(cond), 5, 2, cuda))
    one = statistics.median(time_ms(lambda: pipe(cond[:1]), 5, 2, cuda))
    report.data["packaged"] = {"batch": batch, "steps": pipe.steps, "fuse_ms": ms, "slices_per_s": batch / ms * 1e3,
                               "batch1_ms": one, "describe": pipe.describe()}
    report.write()


def judge(report: Report) -> None:
    d, out = report.data, []
    default = "default: fp16, channels-last, CUDA graph"
    best1 = [r for r in d["latency"] if r.get("batch") == 1 and "fuse_ms" in r]
    if best1:
        r = min(best1, key=lambda r: r["fuse_ms"])
        out.append(f"DDIM-10 at batch 1 <= {TARGETS['ddim10_batch1_ms']:.0f} ms: best {r['fuse_ms']:.1f} ms "
                   f"({r['path']}) -> {'met' if r['fuse_ms'] <= TARGETS['ddim10_batch1_ms'] else 'not met'}")
        dflt = [r for r in best1 if r["path"] == default]
        if dflt:
            out.append(f"the default path at batch 1: {dflt[0]['fuse_ms']:.1f} ms")
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
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        sys.exit("error: no CUDA GPU; pass --allow-cpu to smoke-test the script on a CPU")
    report = Report(a.out, device_info(0), a)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if not a.skip_cli:
            cli_checks(report, work, a.quick)
        for step in (lambda: latency_table(report, a, work, cuda), lambda: packaged_throughput(report, a, cuda)):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - record it, keep what was measured
                report.data["notes"].append(f"a step failed: {type(e).__name__}: {e}")
                report.write()
    report.data["notes"].append(f"whole check: {time.perf_counter() - t0:.0f} s")
    judge(report)
    print(report.stem.with_suffix(".md").read_text())
    failed = [r for r in report.data["cli"] if r["exit"] != 0] + [r for r in report.data["latency"] if "error" in r]
    if failed or any(n.startswith("a step failed") for n in report.data["notes"]):
        sys.exit("error: some checks failed (see the report)")


if __name__ == "__main__":
    main()
