"""The sampler study: quality against denoiser calls and time, DDPM over all T against DDIM at
several step counts, on held-out slices. It picks the DDIM step count a bundle recommends."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tfsdeploy.config import SampleConfig
from tfsdeploy.data import Sample, make_batch
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.metrics import psnr, ssim
from tfsdeploy.paths import display_path
from tfsdeploy.pipeline import FusionPipeline
from tfsdeploy.tools.hardware import device_info, sync
from tfsdeploy.tools.report import fmt

STUDY_FILES = ("study.md", "study.json", "study.png")  # what sampler_study writes into its folder


@dataclass(frozen=True)
class StudyConfig:
    images: int = 4
    size: int = 256
    ddim_steps: tuple[int, ...] = (10, 25, 50, 100, 250)
    ddpm_full: int = 0  # DDPM levels; 0 = all T (the paper's sampler)
    seed: int = 0


# The sampler target: within MAX_LOSS_DB of the full DDPM's PSNR with at least MIN_FEWER x fewer calls.
MAX_LOSS_DB, MIN_FEWER = 0.3, 80


def pick_sampler(rows: list[dict]) -> dict | None:
    """Annotate every DDIM row (rows[2:]) with its PSNR difference from DDPM (rows[1]) and how many
    times fewer denoiser calls it makes, and return the one with the fewest calls that meets the
    target, or None."""
    ref, pick = rows[1], None
    for r in rows[2:]:
        r["delta_psnr_vs_ddpm"] = r["psnr"] - ref["psnr"]
        r["fewer_calls_than_ddpm"] = ref["calls"] / r["calls"]
        good = r["delta_psnr_vs_ddpm"] >= -MAX_LOSS_DB and r["fewer_calls_than_ddpm"] >= MIN_FEWER
        if good and (pick is None or r["calls"] < pick["calls"]):
            pick = r
    return pick


def sampler_study(pipeline: FusionPipeline, samples: list[Sample], cfg: StudyConfig, out_dir: Path,
                  log: Callable[[str], None] = print) -> dict:
    """PSNR / SSIM against the ground truth, and time, for DDPM over all T and DDIM at several step
    counts, on held-out slices (`samples`, at cfg.size); writes study.md / study.json / study.png.
    `pipeline` gives the model, engine and scale; the sampler settings are the study's own."""
    if not samples:
        raise UserError("the test split is empty")
    schedule = pipeline.diffusion.schedule
    picks = np.linspace(0, len(samples) - 1, min(cfg.images, len(samples))).round().astype(int)
    b = make_batch(samples, picks, [pipeline.scale], 0, np.random.default_rng(0))
    rows = [{"sampler": "baseline", "steps": 0, "calls": 0, "seconds": 0.0,
             "psnr": float(psnr(b.base01, b.gt01).mean()), "ssim": float(ssim(b.base01, b.gt01).mean())}]
    plans = [("ddpm", cfg.ddpm_full or schedule.num_steps)] + [("ddim", s) for s in cfg.ddim_steps
                                                                 if s <= schedule.num_steps]
    for sampler, steps in plans:
        sync()
        t0 = time.perf_counter()
        run = FusionPipeline(pipeline.denoiser, pipeline.configs, pipeline.scale,
                             SampleConfig(sampler=sampler, steps=steps, seed=cfg.seed))
        out = run(b.cond01).cpu()
        sync()
        dt = time.perf_counter() - t0
        rows.append({"sampler": sampler, "steps": steps, "calls": steps, "seconds": dt / len(picks),
                     "psnr": float(psnr(out, b.gt01).mean()), "ssim": float(ssim(out, b.gt01).mean())})
        log(f"{sampler}-{steps}: {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.4f}, "
            f"{rows[-1]['seconds']:.1f} s per image")
    pick = pick_sampler(rows)
    report = {"model": display_path(pipeline.source) if pipeline.source else "", "engine": pipeline.denoiser.describe(),
              "device": device_info(0)["device"], "scale": pipeline.scale, "config": asdict(cfg), "images": [samples[i].name for i in picks],
              "rows": rows, "target": f"within {MAX_LOSS_DB} dB PSNR of full DDPM with at least {MIN_FEWER}x fewer denoiser calls",
              "meets_target": pick, "date": time.strftime("%Y-%m-%d %H:%M")}
    _write_study(report, out_dir)
    return report


def _write_study(r: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    c = r["config"]
    lines = [f"# Sampler study: x{r['scale']}, {c['size']}×{c['size']}, {len(r['images'])} held-out slices", "",
             f"- model: {r['model']}; engine: {r['engine']}; device: {r['device']}; {r['date']}",
             f"- target: {r['target']}: " + (f"met by {r['meets_target']['sampler']}-{r['meets_target']['steps']}"
                                              if r["meets_target"] else "not met by any measured setting"), "",
             "| sampler | denoiser calls | PSNR dB | SSIM | Δ PSNR vs DDPM | fewer calls | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['sampler']} | {x['calls']} | {x['psnr']:.2f} | {x['ssim']:.4f} | "
                     f"{fmt(x.get('delta_psnr_vs_ddpm'), '+.2f')} | {fmt(x.get('fewer_calls_than_ddpm'), '.0f')}"
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
