"""Every GPU measurement in one invocation, offline (installs nothing, downloads nothing).

    python benchmarks/gpu_run.py                      # paper preset, 256x256, batch 1 and 4
    python benchmarks/gpu_run.py --preset tiny --size 64 --allow-cpu --out /tmp/r   # smoke test anywhere

On the `paper` preset (random weights: speed does not depend on them) it times one denoiser call
for: fp32, fp32 with TF32 matmuls, bf16 autocast, fp16 weights, fp16 + torch.compile, fp16 + a
CUDA graph, and fp16 + torch.compile(mode="reduce-overhead"); then checks parity of the reduced
precisions against fp32 (relative L2 of one call, and PSNR between fused images from the same seed
and DDIM steps on a held-out SPM slice) and writes benchmarks/reports/gpu-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.parity import relative_l2  # noqa: E402
from tfsdeploy.bench import count_flops, device_info, gpu_peak_tflops  # noqa: E402
from tfsdeploy.config import SampleConfig, ScheduleConfig, model_preset  # noqa: E402
from tfsdeploy.diffusion import Diffusion, NoiseSchedule  # noqa: E402
from tfsdeploy.metrics import psnr  # noqa: E402
from tfsdeploy.model import build_model, count_parameters  # noqa: E402
from tfsdeploy.pipeline import Triplet, fuse_tensor, make_condition  # noqa: E402


class Variant:
    """A callable denoiser at one precision / compilation setting; fp32 in, fp32 out."""

    def __init__(self, name, model, dtype=torch.float32, autocast=None, compile_mode=None, cuda_graph=False,
                 tf32=False):
        self.name, self.dtype, self.autocast, self.tf32 = name, dtype, autocast, tf32
        self.model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        self.fn = torch.compile(self.model, mode=compile_mode) if compile_mode else self.model
        self.cuda_graph = cuda_graph
        self.graph = None

    def _run(self, x, c, l):
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        if self.autocast is not None:
            with torch.autocast(x.device.type, dtype=self.autocast):
                return self.fn(x, c, l).float()
        return self.fn(x.to(self.dtype), c.to(self.dtype), l.float()).float()

    @torch.no_grad()
    def __call__(self, x, c, l):
        if not self.cuda_graph:
            return self._run(x, c, l)
        if self.graph is None or self.static[0].shape != x.shape:
            self.static = [x.clone(), c.clone(), l.clone()]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):  # warm up outside the capture
                    self._run(*self.static)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self._run(*self.static)
        for buf, t in zip(self.static, (x, c, l)):
            buf.copy_(t)
        self.graph.replay()
        return self.static_out.clone()


def time_variant(v, args, repeats, warmup, cuda) -> list[float]:
    for _ in range(warmup):
        v(*args)
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            v(*args)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            v(*args)
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--parity-steps", type=int, default=10)
    ap.add_argument("--data", type=Path, default=None,
                    help="a built dataset folder to take the parity slice from (default: cut it from the templates)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test of the script)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        sys.exit("error: no CUDA GPU; pass --allow-cpu to smoke-test the script on a CPU")
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cfg = model_preset(a.preset)
    model = build_model(cfg)
    with torch.no_grad():
        model.final.conv.weight.normal_(0, 0.02)
    model = model.to(dev).eval()
    half = torch.float16 if cuda else torch.bfloat16  # CPU has no fast fp16 convolutions

    variants = [Variant("fp32", model), Variant("fp32 + TF32", model, tf32=True),
                Variant("bf16 autocast", model, autocast=torch.bfloat16),
                Variant(f"{str(half)[6:]} weights", model, dtype=half)]
    if cuda:
        variants += [Variant("fp16 + torch.compile", model, dtype=half, compile_mode="default"),
                     Variant("fp16 + CUDA graph", model, dtype=half, cuda_graph=True),
                     Variant("fp16 + compile(reduce-overhead)", model, dtype=half, compile_mode="reduce-overhead")]
    info = device_info(0)
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"device": info, "preset": a.preset, "parameters": count_parameters(model), "size": a.size,
              "gflop_per_call_batch1": count_flops(model, 1, a.size) / 1e9, "repeats": a.repeats,
              "warmup": a.warmup, "rows": [], "parity_ddim_steps": a.parity_steps,
              "date": time.strftime("%Y-%m-%d %H:%M")}

    # Fused-image parity first (it is quick), on a real held-out slice, DDIM from the same seed.
    diffusion = Diffusion(NoiseSchedule(ScheduleConfig()))
    cond01 = parity_condition(a.size, a.data).to(dev)
    sample = SampleConfig(steps=a.parity_steps)
    fused = {v.name: fuse_tensor(v, diffusion, cond01, sample).cpu() for v in variants[:4]}
    report["fused_psnr_vs_fp32_db"] = {k: min(200.0, float(psnr(im, fused["fp32"]).mean()))
                                       for k, im in fused.items() if k != "fp32"}
    write_report(report, a.out / f"gpu-{name}", cuda)

    # Timings; the report is rewritten after every row, so a run cut short keeps what it measured.
    rows = report["rows"]
    for b in (int(x) for x in a.batches.split(",")):
        g = torch.Generator().manual_seed(1)
        args = (torch.randn(b, 3, a.size, a.size, generator=g).to(dev),
                torch.randn(b, 5, a.size, a.size, generator=g).to(dev), torch.rand(b, generator=g).to(dev))
        flops = count_flops(model, b, a.size)
        ref = variants[0](*args)
        for v in variants:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                ts = time_variant(v, args, a.repeats, a.warmup, cuda)
                err = relative_l2(v(*args), ref)
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                rows.append({"variant": v.name, "batch": b, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            med = statistics.median(ts)
            prec = "fp32" if v.dtype == torch.float32 and v.autocast is None and not v.tf32 else "fp16"
            peak = gpu_peak_tflops(info.get("gpu", ""), prec) if cuda else None
            rows.append({"variant": v.name, "batch": b, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                         "tflops_per_s": flops / med / 1e12,
                         "fraction_of_peak": (flops / med / 1e12 / peak) if peak else None,
                         "relative_l2_vs_fp32": err, "setup_and_timing_s": time.perf_counter() - t0,
                         "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})
            base = next(r["median_ms"] for r in rows if r["batch"] == b and r["variant"] == "fp32" and "median_ms" in r)
            rows[-1]["speedup_vs_fp32"] = base / rows[-1]["median_ms"]
            print(f"batch {b} {v.name}: {med * 1e3:.2f} ms, rel err {err:.2e}", flush=True)
            write_report(report, a.out / f"gpu-{name}", cuda)
    print((a.out / f"gpu-{name}.md").read_text())


def parity_condition(size: int, data: Path | None) -> torch.Tensor:
    """The x4 condition [1,5,size,size] of one held-out slice: from a built dataset's test split when
    `data` is given, else cut from the installed templates."""
    from training.data import open_split, reference_triplet

    if data is not None:
        samples = open_split(data, "test", size).load()
        s = samples[len(samples) // 2].hr.float() / 255.0
        trip = Triplet(s[0:1], s[1:2], s[2:5])
    else:
        trip = reference_triplet(size)
    return make_condition(trip, 4, size)[0]


def write_report(report: dict, stem: Path, cuda: bool) -> None:
    info = report["device"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU run: {info['device']}", "",
             f"- {report['preset']} preset ({report['parameters'] / 1e6:.1f} M parameters), "
             f"{report['size']}x{report['size']}, {report['gflop_per_call_batch1']:.0f} GFLOP per call at batch 1; "
             f"{report['date']}",
             f"- torch {info['torch']}" + (f", CUDA {info.get('cuda')}, driver {info.get('driver')}" if cuda else ""),
             f"- CUDA-event timing, {report['repeats']} repeats after {report['warmup']} warm-up calls, medians",
             "", "| variant | batch | median ms | vs fp32 | TFLOP/s | of peak | rel. L2 vs fp32 | CUDA peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | failed: {r['error']} | | | | | |")
            continue
        frac = "–" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.0f}%"
        mem = "–" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f}"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | {r['speedup_vs_fp32']:.2f}× | "
                     f"{r['tflops_per_s']:.1f} | {frac} | {r['relative_l2_vs_fp32']:.1e} | {mem} |")
    parity = report["fused_psnr_vs_fp32_db"]
    lines += ["", f"Fused-image PSNR against fp32 (DDIM-{report['parity_ddim_steps']}, same seed, x4 held-out "
              "slice, random weights): " + ", ".join(f"{k} {v:.1f} dB" for k, v in parity.items()), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
