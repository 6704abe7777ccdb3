"""Per-step denoiser latency of every engine, side by side, with achieved GFLOP/s.

    python benchmarks/engine_latency.py --preset small --size 256 --batch 1

Speed does not depend on the weights, so a checkpoint with random weights of the chosen preset is
made in a temporary folder and exported (fp32 and fp16 ONNX). The engines are then timed
round-robin (one call of each in turn, repeated), so drifting machine load hits all of them alike;
the report gives medians, ratios against torch eager, and FLOPs counted once with torch's
FlopCounterMode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.onnx_engine import OnnxDenoiser  # noqa: E402
from engines.torch_engine import TorchDenoiser  # noqa: E402
from export.onnx_export import default_spec, export_onnx  # noqa: E402
from tfsdeploy.checkpoint import Configs, save_checkpoint  # noqa: E402
from tfsdeploy.config import model_preset  # noqa: E402
from tfsdeploy.model import build_model, count_parameters  # noqa: E402



def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> dict[str, float]:
    """Measured fp32 matrix-multiply throughput of this machine: a square n x n product through
    torch and through ONNX Runtime's MLAS; the better of the two is the peak engines are held to."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    out = {"torch": 2 * n**3 / ((time.perf_counter() - t0) / repeats) / 1e9}
    info = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", info[:2], info[2:])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"A": a.numpy(), "B": b.numpy().astype(np.float32)}
    sess.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, feed)
    out["onnxruntime"] = 2 * n**3 / ((time.perf_counter() - t0) / repeats) / 1e9
    out["peak"] = max(out["torch"], out["onnxruntime"])
    return out


def count_flops(model: torch.nn.Module, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return int(fc.get_total_flops())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_engines(preset: str, size: int, batch: int, workdir: Path, threads: int):
    torch.manual_seed(0)
    cfg = Configs(model=model_preset(preset))
    model = build_model(cfg.model)
    with torch.no_grad():  # non-zero output layer, so every engine does the full work
        model.final.conv.weight.normal_(0, 0.02)
    ckpt = save_checkpoint(workdir / "run", cfg, 0, model.state_dict())
    spec = default_spec(model, max_batch=max(batch, 4))
    spec = type(spec)(**{**spec.to_json(), "opt_batch": batch, "opt_size": size,
                         "max_size": max(spec.max_size, size)})
    engines = {"torch eager fp32": TorchDenoiser(model.eval())}
    for p in ("fp32", "fp16"):
        path, rep = export_onnx(ckpt, p, spec=spec, parity_steps=2, log=lambda s: None)
        engines[f"onnxruntime {p}"] = OnnxDenoiser(path, device="cpu", threads=threads)
    return model, engines


def run(preset: str, size: int, batch: int, repeats: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, engines = make_engines(preset, size, batch, Path(tmp), threads)
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 5, size, size, generator=g),
                  torch.rand(batch, generator=g))
        flops = count_flops(model, inputs)
        peak = matmul_peak_gflops()
        for _ in range(warmup):
            for eng in engines.values():
                eng(*inputs)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(repeats):
            for name, eng in engines.items():
                t0 = time.perf_counter()
                eng(*inputs)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["torch eager fp32"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"engine": name, "median_s": med, "min_s": min(ts), "speedup_vs_torch": base / med,
                     "gflops_per_s": flops / med / 1e9, "fraction_of_peak": flops / med / 1e9 / peak["peak"]})
    return {
        "preset": preset, "parameters": count_parameters(model), "size": size, "batch": batch,
        "gflop_per_call": flops / 1e9, "repeats": repeats, "warmup": warmup, "threads": threads,
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)", "matmul_gflops": peak,
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"), "rows": rows,
    }


def to_markdown(r: dict) -> str:
    lines = [
        f"# Denoiser latency per step: {r['preset']} preset ({r['parameters'] / 1e6:.2f} M parameters), "
        f"{r['size']}x{r['size']}, batch {r['batch']}",
        "",
        f"- device: {r['device']}, {r['threads']} threads; {r['date']}",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- {r['gflop_per_call']:.1f} GFLOP per call (torch FlopCounterMode; a multiply-add counts as 2)",
        f"- {r['repeats']} round-robin repeats after {r['warmup']} warm-up calls each; medians",
        f"- measured fp32 matrix-multiply peak (4096x4096): {r['matmul_gflops']['peak']:.0f} GFLOP/s "
        f"(torch {r['matmul_gflops']['torch']:.0f}, onnxruntime {r['matmul_gflops']['onnxruntime']:.0f}); "
        f"the fraction column is against it",
        "",
        "| engine | median ms | min ms | speed-up vs torch eager | GFLOP/s | fraction of peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['engine']} | {row['median_s'] * 1e3:.1f} | {row['min_s'] * 1e3:.1f} | "
                     f"{row['speedup_vs_torch']:.2f}x | {row['gflops_per_s']:.1f} | "
                     f"{row['fraction_of_peak'] * 100:.0f}% |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    a = ap.parse_args()
    r = run(a.preset, a.size, a.batch, a.repeats, a.warmup, a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"engine-latency-{r['preset']}-{r['size']}-b{r['batch']}-cpu"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2))
    md = to_markdown(r)
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
