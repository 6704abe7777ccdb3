"""`tfsdeploy evaluate`: Table-1 / Table-2 style reports and a Fig-2 style montage.

For every scale and every image of a split, the low-resolution inputs are made exactly as in
training (bicubic down, bicubic up). Each "upsample, then fuse" baseline and each checkpoint fuses
them, and the eight reference metrics (tfsdeploy.metrics) plus the source-based fusion metrics are
computed against the ground truth. Per-image values are cached in `values.jsonl` under keys that
include the checkpoint's hash and the sampler settings, so an interrupted evaluation resumes and a
changed setting is never served stale numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tfsdeploy.config import SCALES, SampleConfig
from tfsdeploy.data import Sample
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.fusion import METHODS, fuse_condition
from tfsdeploy.imaging import quantise_uint8, resize
from tfsdeploy.inputs import check_scale_size, upsample
from tfsdeploy.modelref import ModelRef, resolve_model
from tfsdeploy.pipeline import FusionPipeline
from tfsdeploy.report_metrics import (HIGHER_IS_BETTER, REFERENCE_METRICS, SOURCE_METRICS, reference_metrics,
                                      source_metrics)

CACHE_FILE = "values.jsonl"
# What a report folder holds: an existing one is written into only when it holds nothing else.
REPORT_FILES = ("report.md", "table1_x*.md", "table1_x*.csv", "values.json", CACHE_FILE, "montage.png")


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    scales: tuple[int, ...] = (2, 4, 8)
    methods: tuple[str, ...] = ("classical", "laplacian", "guided")
    sample: SampleConfig = field(default_factory=SampleConfig)
    engine: str = "auto"
    limit: int = 0  # evaluate at most this many images (0 = all)
    size: int = 0  # image side; 0 = the first model's training size (256 without models)
    montage_image: str = ""  # image name for the montage ("" = the middle one)

    def __post_init__(self) -> None:
        bad = [s for s in self.scales if s not in SCALES]
        if bad or not self.scales:
            raise UserError(f"scales must be drawn from {SCALES}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")


@dataclass
class Entry:
    label: str
    kind: str  # "baseline" or "model"
    key: str  # cache key prefix: what makes its numbers what they are
    run: Callable[[torch.Tensor, int, int], torch.Tensor]  # (LR sources [1,5,h,w], size, scale) -> fused [1,3,size,size]
    info: dict = field(default_factory=dict)


def model_entry(ref: ModelRef, pipelines: dict[int, FusionPipeline], cfg: EvalConfig, taken: set) -> Entry:
    """A model under test: its pipeline per scale (a bundle's member each), labelled, with a cache
    key made of its fingerprint and the sampler settings each scale runs."""
    path, sha = ref.path, ref.fingerprint()
    s = cfg.sample
    steps = "/".join(str(pipelines[scale].sample.steps) for scale in cfg.scales)
    key = f"model:{sha[:16]}:{s.sampler}:{steps}:{s.spacing}:{s.seed}"
    if any(pipelines[scale].backproject for scale in cfg.scales):  # absent when 0: earlier caches stay valid
        key += ":bp" + "/".join(f"{pipelines[scale].backproject:g}" for scale in cfg.scales)
    gates = [pipelines[scale].backproject_gate for scale in cfg.scales]
    if any(gates):  # likewise
        key += ":gate" + "/".join(f"{g[0]:g}-{g[1]:g}" if g else "-" for g in gates)
    if s.ensemble:
        key += ":ensemble8"
    first = pipelines[cfg.scales[0]]
    mc, tc = first.configs.model, first.configs.train
    info = {"path": str(path), "engine": first.denoiser.describe(),
            "tmfa": mc.tmfa, "psf": bool(tc.psf_mse > 0 or tc.psf_ssim > 0),
            "prediction": first.configs.diffusion.prediction, "target": first.configs.diffusion.target,
            "preset_channels": mc.inner_channels, "image_size": mc.image_size,
            "sampling": ", ".join(f"x{scale} {pipelines[scale].sample.sampler}-{pipelines[scale].steps}"
                                  for scale in cfg.scales)}
    return Entry(_label(path, taken), "model", key,
                 lambda lr, size, scale: pipelines[scale](pipelines[scale].upsample(lr, size)).cpu(), info)


def _label(path: Path, taken: set) -> str:
    path = Path(path)
    base = path.parent.name if path.name.startswith("ckpt-") or path.suffix else path.name
    label, i = base or "model", 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def evaluation_inputs(models: list[Path], data: Path | None, cfg: EvalConfig, engine_cfg,
                      log: Callable[[str], None] = lambda s: None) -> tuple[list[Entry], list[Sample]]:
    """What `evaluate` is handed: one entry per model (its pipeline at every scale) and the split's
    samples, at cfg.size or the first model's training size. `engine_cfg` is an EngineConfig."""
    from tfsdeploy.data import ensure_dataset, open_split

    entries, labels, first_size = [], set(), 0
    for ref in (resolve_model(m) for m in models):
        pipes = {s: FusionPipeline.load(ref, s, cfg.sample, engine_cfg, notice=log) for s in cfg.scales}
        first_size = first_size or pipes[cfg.scales[0]].image_size
        entries.append(model_entry(ref, pipes, cfg, labels))
    samples = open_split(ensure_dataset(data, log=log), cfg.split, cfg.size or first_size or 256).load()
    return entries, samples


def evaluate(models: list[Entry], samples: list[Sample], out_dir: Path, cfg: EvalConfig = EvalConfig(),
             lpips_backbone: Path | None = None, lpips_lin: Path | None = None,
             progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Every baseline and every model (`model_entry`) on `samples` (a split, already limited), at
    every scale; writes the reports into out_dir and returns the summary."""
    from tfsdeploy.lpips import load_lpips

    if cfg.limit:
        samples = samples[: cfg.limit]
    if not samples:
        raise UserError(f"the {cfg.split} split is empty")
    for e in models:
        log(f"{e.label}: {e.info['path']} on {e.info['engine']}, {e.info['sampling']}")
    notes = []
    if any(s.gt_made for s in samples):
        notes.append("ground truth missing for some images: made with the classical tri-modal fusion of the "
                     "high-resolution sources (the paper's way of making targets)")
        log("note: " + notes[-1])
    lpips_fn, lpips_reason = load_lpips(lpips_backbone, lpips_lin)
    if lpips_fn is None:
        notes.append(f"LPIPS unavailable: {lpips_reason}")
        log("note: " + notes[-1])

    entries = [Entry(f"bicubic + {m}", "baseline", f"baseline:{m}",
                     lambda lr, size, _scale, m=m: fuse_condition(upsample(lr, size), m)) for m in cfg.methods]
    entries += models
    montage_name = cfg.montage_image or samples[len(samples) // 2].name
    if montage_name not in {s.name for s in samples}:
        raise UserError(f"--montage-image {montage_name!r} is not in the {cfg.split} split")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create ({e.strerror})") from None
    cache = _read_cache(out_dir / CACHE_FILE)
    montage: dict[int, dict[str, torch.Tensor]] = {}
    total, done = len(cfg.scales) * len(samples) * len(entries), 0
    with open(out_dir / CACHE_FILE, "a") as cache_out:
        for scale in cfg.scales:
            for smp in samples:
                hr = smp.hr.float() / 255.0
                side = hr.shape[-1]
                check_scale_size(scale, side, 1)
                lr = resize(hr[None, :5], (side // scale, side // scale))
                cond01 = upsample(lr, side)  # as training degrades: bicubic down, bicubic up
                gt = hr[5:]
                want_picture = smp.name == montage_name
                if want_picture:
                    montage[scale] = {"T1 (LR)": cond01[0, 0:1], "T2 (LR)": cond01[0, 1:2],
                                      "functional (LR)": cond01[0, 2:5], "ground truth": gt}
                for e in entries:
                    key = f"{e.key}|x{scale}|{smp.name}"
                    if key not in cache or want_picture:
                        fused = e.run(lr, side, scale)[0].cpu()
                        if want_picture:
                            montage[scale][e.label] = fused
                    if key not in cache:
                        vals = reference_metrics(fused, gt, lpips_fn)
                        vals.update(source_metrics(fused, [hr[0:1], hr[1:2], hr[2:5]]))
                        cache[key] = vals
                        cache_out.write(json.dumps({"key": key, "values": _jsonable(vals)}) + "\n")
                        cache_out.flush()
                    done += 1
                    if progress:
                        progress(done, total)

    return _write_reports(out_dir, entries, samples, cfg, cache, montage, notes, lpips_reason)


def _jsonable(vals: dict) -> dict:
    return {k: (None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v) for k, v in vals.items()}


def _read_cache(path: Path) -> dict[str, dict]:
    cache: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                cache[row["key"]] = {k: (float("nan") if v is None else v) for k, v in row["values"].items()}
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by an interruption: recomputed
    return cache


def _mean(vals: list[float]) -> float:
    good = [v for v in vals if v is not None and not math.isnan(v) and not math.isinf(v)]
    return float(np.mean(good)) if good else float("nan")


def _table(rows: dict[str, dict[str, float]], metrics: tuple[str, ...]) -> tuple[str, str]:
    """Markdown (best in bold) and CSV (with a final 'best' row) for rows x metrics."""
    best = {}
    for m in metrics:
        vals = {r: v[m] for r, v in rows.items() if not math.isnan(v[m])}
        if vals:
            best[m] = (max if HIGHER_IS_BETTER[m] else min)(vals, key=vals.get)
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in metrics}
    md = ["| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |",
          "|---|" + "---:|" * len(metrics)]
    for r, v in rows.items():
        cells = []
        for m in metrics:
            txt = "n/a" if math.isnan(v[m]) else f"{v[m]:.4f}"
            cells.append(f"**{txt}**" if best.get(m) == r else txt)
        md.append(f"| {r} | " + " | ".join(cells) + " |")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", *metrics])
    for r, v in rows.items():
        w.writerow([r, *("" if math.isnan(v[m]) else f"{v[m]:.6g}" for m in metrics)])
    w.writerow(["best", *(best.get(m, "") for m in metrics)])
    return "\n".join(md) + "\n", buf.getvalue()


def _write_reports(out_dir: Path, entries: list[Entry], samples, cfg: EvalConfig, cache: dict, montage: dict,
                   notes: list[str], lpips_reason: str) -> dict:
    per_image: dict = {}
    summary: dict = {"split": cfg.split, "images": len(samples), "config": asdict(cfg), "notes": notes,
                     "methods": {e.label: {"kind": e.kind, **e.info} for e in entries}, "tables": {}}
    md_all = [f"# Evaluation on the {cfg.split} split ({len(samples)} images)", ""]
    md_all += [f"- {n}" for n in notes] + ([""] if notes else [])
    s = cfg.sample
    md_all.append(f"Samplers ({s.spacing} spacing, seed {s.seed}): "
                  + "; ".join(f"{e.label}: {e.info['sampling']}" for e in entries if e.kind == "model")
                  + ". Metrics are defined in the README; ↑ higher is better, ↓ lower; best in bold."
                  if any(e.kind == "model" for e in entries) else
                  "Metrics are defined in the README; ↑ higher is better, ↓ lower; best in bold.")
    md_all.append("")
    for scale in cfg.scales:
        rows, src_rows = {}, {}
        for e in entries:
            vals = [cache[f"{e.key}|x{scale}|{smp.name}"] for smp in samples]
            rows[e.label] = {m: _mean([v[m] for v in vals]) for m in REFERENCE_METRICS}
            src_rows[e.label] = {m: _mean([v[m] for v in vals]) for m in SOURCE_METRICS}
            per_image.setdefault(f"x{scale}", {})[e.label] = {
                smp.name: _jsonable(v) for smp, v in zip(samples, vals)}
        md, csv_text = _table(rows, REFERENCE_METRICS)
        md_src, _ = _table(src_rows, SOURCE_METRICS)
        with atomic_path(out_dir / f"table1_x{scale}.md") as t:
            t.write_text(f"# x{scale}\n\n" + md)
        with atomic_path(out_dir / f"table1_x{scale}.csv") as t:
            t.write_text(csv_text)
        md_all += [f"## x{scale}", "", md, "Source-based fusion metrics (against T1, T2 and the functional image):",
                   "", md_src]
        summary["tables"][f"x{scale}"] = {"reference": rows, "source": src_rows}

    models = [e for e in entries if e.kind == "model"]
    if len(models) > 1:
        md_all += _ablation(models, summary, cfg)
    with atomic_path(out_dir / "report.md") as t:
        t.write_text("\n".join(md_all))
    with atomic_path(out_dir / "values.json") as t:
        t.write_text(json.dumps({"summary": _jsonable_tree(summary), "per_image": per_image}, indent=1))
    if montage:
        write_comparison(out_dir / "montage.png", montage, [e.label for e in entries])
    return summary


def _ablation(models: list[Entry], summary: dict, cfg: EvalConfig) -> list[str]:
    """Table-2 style: each checkpoint's TMFA / PSF setting beside its PSNR and SSIM at every scale."""
    head = "| model | TMFA | PSF | " + " | ".join(f"x{s} PSNR | x{s} SSIM" for s in cfg.scales) + " |"
    lines = ["## Ablation", "", head, "|---|---|---|" + "---:|---:|" * len(cfg.scales)]
    for e in models:
        cells = []
        for s in cfg.scales:
            r = summary["tables"][f"x{s}"]["reference"][e.label]
            cells += [f"{r['PSNR']:.2f}", f"{r['SSIM']:.4f}"]
        lines.append(f"| {e.label} | {e.info['tmfa']} | {'yes' if e.info['psf'] else 'no'} | " + " | ".join(cells) + " |")
    return lines + [""]


def _jsonable_tree(x):
    if isinstance(x, dict):
        return {k: _jsonable_tree(v) for k, v in x.items()}
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def write_comparison(path: Path, rows: dict[int, dict[str, torch.Tensor]], entry_labels: list[str]) -> None:
    """A labelled grid of images to compare, as a PNG: rows are scales; columns the three LR inputs,
    each method, and the ground truth. (A scan's overview of its slices is scans.write_montage.)"""
    from PIL import Image, ImageDraw

    cols = ["T1 (LR)", "T2 (LR)", "functional (LR)", *entry_labels, "ground truth"]
    first = next(iter(rows.values()))
    h, w = first["ground truth"].shape[-2:]
    pad, head, side = 4, 18, 34
    canvas = Image.new("RGB", (side + len(cols) * (w + pad), head + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        draw.text((side + j * (w + pad) + 2, 3), c[: max(4, w // 6)], fill="black")
    for i, (scale, imgs) in enumerate(sorted(rows.items())):
        y = head + i * (h + pad)
        draw.text((4, y + h // 2 - 5), f"x{scale}", fill="black")
        for j, c in enumerate(cols):
            t = imgs[c].clamp(0, 1)
            t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
            arr = quantise_uint8(t).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr), (side + j * (w + pad), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


__all__ = ["EvalConfig", "Entry", "model_entry", "evaluate", "write_comparison"]
