"""Does test-time adaptation (`fuse --adapt N`, tfsdeploy.tools.adapt) help? Measured on data the
packaged model never saw, one slice at a time (each slice adapts a fresh copy of the model on
itself alone), against the ground truth.

    pip download nilearn --no-deps -d /tmp/nl            # once: the ICBM volumes (read, never installed)
    python benchmarks/adapt_study.py --threads 1          # the whole study (resumes); ~50 min on a busy 2-core CPU
    python benchmarks/adapt_study.py --images 2 --variants A,B --steps 10,25 --out /tmp/pilot   # a pilot

Datasets (benchmarks/cases.py makes them):
  icbm  axial slices synthesised from the 1 mm ICBM 2009a volumes in the nilearn wheel, finer anatomy
        than the 2 mm SPM templates the model was trained on, bicubic down by the scale (the paper's
        degradation); the set cases.py calls icbm.
  spm   the SPM test split with another degradation than training's: Gaussian blur (sigma 0.7 x
        scale px), area downsampling, Gaussian noise (sigma 0.01) and 8-bit quantisation. Ground
        truth as stored (cases.py: spm-blur).
  spm-bicubic  the same SPM test slices degraded as in training: the in-domain control, where the
        model is at its best and adaptation can only lose (variants B and E only; cases.py: spm-test).

For each slice, scale and variant (learning rate, extra degradation, ...), one adaptation runs to the
largest N, and the fused image is scored after each N in --steps (the adaptation uses a constant
rate, so the model after N steps of a long run is the model of an N-step run). N = 0 is the
packaged model; the baseline is "upsample, then fuse" (make_condition + fuse_condition).

adapt.md and adapt.json are rewritten after every run; adapt.json keeps every run, so an
interrupted study resumes where it stopped (delete it to start afresh). Last, `adapt` is timed on
one slice per scale (--timing steps) at --threads. The report's Findings section is the text of
--notes (benchmarks/reports/adapt/findings.md: what the first full run said).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cases import (SIZE, WHEEL_GLOB, Case, find_wheel, load_cases, require_wheel,  # noqa: E402
                              score_baseline)
from tfsdeploy.config import EngineConfig  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.metrics import score_image  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.adapt import AdaptConfig, adapt  # noqa: E402
from tfsdeploy.tools.hardware import device_info  # noqa: E402

# The study's data sets and the cases.py sets they are
DATASETS = {"icbm": "icbm", "spm": "spm-blur", "spm-bicubic": "spm-test"}


@dataclass(frozen=True)
class Variant:
    """One adaptation setting; `scales` limits it to some scales."""

    name: str
    lr: float
    extra_scale: int = 0  # 0 = the scale (not AdaptConfig's default)
    batch_size: int = 4
    crop: int = 0
    scales: tuple[int, ...] = (4, 8)
    max_steps: int = 0  # score only the N up to this (0: every N asked for)
    datasets: tuple[str, ...] = ("icbm", "spm")

    def steps(self, asked: list[int]) -> list[int]:
        return [n for n in asked if not self.max_steps or n <= self.max_steps]

    def config(self, steps: int, seed: int, scale: int) -> AdaptConfig:
        return AdaptConfig(steps=steps, lr=self.lr, batch_size=self.batch_size, extra_scale=self.extra_scale or scale,
                           crop=self.crop, seed=seed)


VARIANTS = [
    Variant("A", 1e-5, max_steps=25),  # the plain recipe: degrade the LR input again by the scale
    Variant("B", 1e-5, extra_scale=2, datasets=("icbm", "spm", "spm-bicubic")),  # a milder extra degradation
    Variant("C", 3e-5, extra_scale=2, max_steps=25),
    Variant("D", 1e-4, extra_scale=2, max_steps=10),
    Variant("E", 1e-5, extra_scale=4, scales=(8,), datasets=("icbm", "spm", "spm-bicubic")),
]


# --------------------------------------------------------------------------- measuring


def run_case(pipe: FusionPipeline, case: Case, variant: Variant | None, steps: list[int], seed: int) -> dict:
    """Baseline and unadapted model (variant None), or one adaptation scored at each N in `steps`."""
    if variant is None:
        base = score_baseline(case, pipe.scale)
        t0 = time.perf_counter()
        fused = pipe.fuse_triplet(case.lr, SIZE)
        return {"baseline": base, "model": score_image(fused, case.gt01), "fuse_seconds": time.perf_counter() - t0}
    scores: dict[str, dict[str, float]] = {}

    def on_snapshot(step: int, adapted: FusionPipeline) -> None:
        scores[str(step)] = score_image(adapted.fuse_triplet(case.lr, SIZE), case.gt01)

    res = adapt(pipe, case.lr, SIZE, variant.config(max(steps), seed, pipe.scale), snapshots=set(steps),
                on_snapshot=on_snapshot)
    return {"scores": scores, "seconds": res.seconds, "seconds_per_step": res.seconds_per_step,
            "loss_first": res.losses[0], "loss_last10": float(np.mean(res.losses[-10:])), "pairs": res.pairs,
            "lr_side": res.lr_side, "extra_scale": res.extra_scale}


def time_adaptation(pipe: FusionPipeline, case: Case, steps: int, threads: int) -> dict:
    """Seconds per adaptation step (batch 4, whole LR image, the default extra degradation) and per
    fuse, on this machine as loaded now."""
    import os

    load = os.getloadavg()[0]
    res = adapt(pipe, case.lr, SIZE, AdaptConfig(steps=steps, lr=1e-5))
    t0 = time.perf_counter()
    res.pipeline.fuse_triplet(case.lr, SIZE)
    return {"seconds_per_step": res.seconds_per_step, "adapt_seconds": res.seconds, "steps": steps,
            "fuse_seconds": time.perf_counter() - t0, "threads": threads, "lr_side": res.lr_side,
            "extra_scale": res.extra_scale, "load_before": load, "load_after": os.getloadavg()[0]}


def run_key(dataset: str, case: str, scale: int, variant: Variant | None, seed: int) -> str:
    if variant is None:
        return f"{dataset}|{case}|x{scale}|none"
    v = asdict(variant)
    for k in ("name", "scales", "max_steps", "datasets"):
        v.pop(k)
    return f"{dataset}|{case}|x{scale}|" + ",".join(f"{k}={val}" for k, val in v.items()) + f",seed={seed}"


def load_cache(path: Path) -> dict[str, dict]:
    """The runs of an earlier (possibly interrupted) study, from its adapt.json."""
    if not path.is_file():
        return {}
    return {r["key"]: r for r in json.loads(path.read_text()).get("runs", [])}


# --------------------------------------------------------------------------- the report


def summarise(records: list[dict], cases_of: dict[tuple[str, int], list[str]], variants: list[Variant],
              steps: list[int], seed: int) -> list[dict]:
    """Mean over the slices `cases_of` names per dataset x scale x variant x N: PSNR / SSIM, their
    change over the baseline and over the unadapted model, and how many slices adaptation improved."""
    by_key = {r["key"]: r for r in records}
    rows = []
    for (dataset, scale), cases in sorted(cases_of.items()):
        base = [by_key.get(run_key(dataset, c, scale, None, seed)) for c in cases]
        if any(b is None for b in base):
            continue
        b_psnr = np.array([b["baseline"]["psnr"] for b in base])
        b_ssim = np.array([b["baseline"]["ssim"] for b in base])
        m_psnr = np.array([b["model"]["psnr"] for b in base])
        m_ssim = np.array([b["model"]["ssim"] for b in base])
        common = {"dataset": dataset, "scale": scale, "images": len(cases),
                  "baseline_psnr": b_psnr.mean(), "baseline_ssim": b_ssim.mean()}
        rows.append({**common, "variant": "-", "lr": None, "extra_scale": None, "steps": 0, "psnr": m_psnr.mean(),
                     "ssim": m_ssim.mean(), "gain_db": (m_psnr - b_psnr).mean(),
                     "d_ssim_vs_base": (m_ssim - b_ssim).mean(),
                     "d_db_vs_n0": 0.0, "d_ssim_vs_n0": 0.0, "improved": None, "seconds_per_step": None,
                     "fuse_seconds": float(np.mean([b["fuse_seconds"] for b in base]))})
        for v in variants:
            if scale not in v.scales or dataset not in v.datasets:
                continue
            runs = [by_key.get(run_key(dataset, c, scale, v, seed)) for c in cases]
            if any(r is None for r in runs):
                continue
            for n in v.steps(steps):
                if any(str(n) not in r["scores"] for r in runs):
                    continue
                p = np.array([r["scores"][str(n)]["psnr"] for r in runs])
                s = np.array([r["scores"][str(n)]["ssim"] for r in runs])
                rows.append({**common, "variant": v.name, "lr": v.lr, "extra_scale": v.extra_scale or scale,
                             "batch_size": v.batch_size, "crop": v.crop, "steps": n, "psnr": p.mean(), "ssim": s.mean(),
                             "gain_db": (p - b_psnr).mean(), "d_ssim_vs_base": (s - b_ssim).mean(),
                             "d_db_vs_n0": (p - m_psnr).mean(), "d_db_vs_n0_min": (p - m_psnr).min(),
                             "d_db_vs_n0_max": (p - m_psnr).max(), "d_ssim_vs_n0": (s - m_ssim).mean(),
                             "improved": int((p > m_psnr).sum()),
                             "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs]))})
    return [{k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()} for r in rows]


def write_report(out: Path, rows: list[dict], records: list[dict], meta: dict) -> None:
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["# Test-time adaptation study (`fuse --adapt N`)", "",
             f"- model: the packaged default bundle, torch fp32 eager on {meta['device']['cpu']} "
             f"(threads: {meta['device']['threads']}); sampler {meta['sampler']}; output {SIZE}×{SIZE}; "
             f"{meta['date']}",
             "- each slice adapts a fresh copy of the model on itself alone; scores against the ground truth",
             "- **gain** = PSNR of the fused image minus PSNR of the baseline (bicubic up, then classical "
             "fusion); **Δ vs N=0** = change against the unadapted model (min / max over slices); "
             "**better** = slices where adaptation raised PSNR",
             f"- datasets: {'; '.join(meta['datasets'].values())}", "",
             "| data | scale | variant | lr | extra ↓ | N | PSNR dB | gain dB | Δ vs N=0 dB (min / max) | SSIM | "
             "ΔSSIM vs N=0 | better | s / step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["variant"] == "-":
            lines.append(f"| {r['dataset']} | ×{r['scale']} | baseline | | | | {r['baseline_psnr']:.2f} | 0 | | "
                         f"{r['baseline_ssim']:.4f} | | | |")
            lines.append(f"| {r['dataset']} | ×{r['scale']} | no adaptation | | | 0 | {r['psnr']:.2f} | "
                         f"{r['gain_db']:+.2f} | 0 | {r['ssim']:.4f} | 0 | | |")
            continue
        lines.append(f"| {r['dataset']} | ×{r['scale']} | {r['variant']} | {r['lr']:g} | ×{r['extra_scale']} | "
                     f"{r['steps']} | {r['psnr']:.2f} | {r['gain_db']:+.2f} | {r['d_db_vs_n0']:+.2f} "
                     f"({r['d_db_vs_n0_min']:+.2f} / {r['d_db_vs_n0_max']:+.2f}) | {r['ssim']:.4f} | "
                     f"{r['d_ssim_vs_n0']:+.4f} | {r['improved']}/{r['images']} | {f(r['seconds_per_step'], '.2f')} |")
    lines += ["", "Best setting per data set and scale (largest mean Δ vs N=0):", "",
              "| data | scale | best | lr | extra ↓ | N | Δ vs N=0 dB (min / max) | better |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (dataset, scale) in sorted({(r["dataset"], r["scale"]) for r in rows}):
        cand = [r for r in rows if r["dataset"] == dataset and r["scale"] == scale and r["variant"] != "-"]
        if cand:
            b = max(cand, key=lambda r: r["d_db_vs_n0"])
            lines.append(f"| {dataset} | ×{scale} | {b['variant']} | {b['lr']:g} | ×{b['extra_scale']} | "
                         f"{b['steps']} | "
                         f"{b['d_db_vs_n0']:+.2f} ({b['d_db_vs_n0_min']:+.2f} / {b['d_db_vs_n0_max']:+.2f}) | "
                         f"{b['improved']}/{b['images']} |")
    timing = [r for r in records if r["key"].startswith("timing|")]
    if timing:
        lines += ["", "Time on this machine (`adapt` on one slice, batch 4, whole LR image; the machine was shared, "
                  "so the 1-minute load average when it started is shown; an idle machine reads about 1 by then):", "",
                  "| scale | LR side | extra ↓ | threads | s / step | s for N = 10 | s / fuse (DDIM-2) | load |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(timing, key=lambda r: (r["scale"], r["threads"])):
            lines.append(f"| ×{r['scale']} | {r['lr_side']} | ×{r['extra_scale']} | {r['threads']} | "
                         f"{r['seconds_per_step']:.2f} | {10 * r['seconds_per_step']:.0f} | {r['fuse_seconds']:.2f} | "
                         f"{r['load_before']:.1f} |")
    lines += ["", "Variants: " + "; ".join(
        f"{v['name']}: lr {v['lr']:g}, extra degradation "
        f"{'×' + str(v['extra_scale']) if v['extra_scale'] else 'the scale'}, "
        f"batch {v['batch_size']}, {'crop ' + str(v['crop']) if v['crop'] else 'whole LR image'}, "
        f"scales {', '.join('×' + str(s) for s in v['scales'])}"
        + (f", N ≤ {v['max_steps']}" if v["max_steps"] else "") for v in meta["variants"]) + ".", "",
        f"Rerun: `{meta['command']}`", ""]
    if meta.get("notes"):
        lines += ["## Findings", "", meta["notes"], ""]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapt.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "adapt.json") as tmp:
        tmp.write_text(json.dumps({**meta, "rows": rows, "runs": records}, indent=1))


# --------------------------------------------------------------------------- main


@dataclass
class Plan:
    """What the study runs, from the command line."""

    args: argparse.Namespace
    datasets: list[str]
    scales: list[int]
    steps: list[int]
    variants: list[Variant]
    wheel: Path | None
    notes: str


@dataclass
class Runs:
    """The runs so far (those of an earlier study included), what the report is written from."""

    cache: dict[str, dict]
    cases_of: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    sampler: str = ""


def plan(argv: list[str] | None = None) -> Plan:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "adapt"))
    ap.add_argument("--datasets", default="icbm,spm,spm-bicubic")
    ap.add_argument("--scales", default="4,8")
    ap.add_argument("--images", type=int, default=6, help="slices per dataset")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    ap.add_argument("--steps", default="10,25,50", help="N values scored (the run goes to the largest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wheel", default="", help=f"the nilearn wheel (default: {WHEEL_GLOB})")
    ap.add_argument("--budget-min", type=float, default=0.0, help="start no new run after this many minutes (0: none)")
    ap.add_argument("--timing", type=int, default=20, help="steps of the timing run per scale (0: none)")
    ap.add_argument("--retime", action="store_true", help="time again even if this thread count was timed")
    ap.add_argument("--notes", default=str(ROOT / "benchmarks" / "reports" / "adapt" / "findings.md"),
                    help="a file whose text becomes the report's Findings section ('': none)")
    args = ap.parse_args(argv)

    datasets = args.datasets.split(",")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        sys.exit(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    wheel = find_wheel(args.wheel)
    if "icbm" in datasets:
        require_wheel(wheel)
    return Plan(args, datasets, [int(s) for s in args.scales.split(",")], sorted(int(s) for s in args.steps.split(",")),
                [v for v in VARIANTS if v.name in args.variants.split(",")], wheel,
                Path(args.notes).read_text().strip() if args.notes else "")


def report(p: Plan, runs: Runs, argv: list[str] | None) -> None:
    """adapt.md and adapt.json from every run so far."""
    args = p.args
    described = {"icbm": f"icbm: {args.images} axial slices synthesised from the ICBM 2009a 1 mm T1 / GM / WM in "
                         f"{p.wheel.name if p.wheel else '?'} (T2-like from tissue maps, SPECT/PET-like from "
                         f"blurred GM), bicubic down by the scale",
                 "spm": f"spm: {args.images} slices of the SPM test split, Gaussian blur σ = 0.7·scale px + area "
                        f"down + noise σ 0.01 + 8-bit",
                 "spm-bicubic": f"spm-bicubic: the same {args.images} SPM test slices degraded as in training (bicubic "
                                f"down): the in-domain control, defaults B / E only"}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_info(args.threads), "sampler": runs.sampler,
            "datasets": {d: described[d] for d in p.datasets}, "variants": [asdict(v) for v in p.variants],
            "steps": p.steps, "images": args.images, "seed": args.seed, "notes": p.notes,
            "command": "python benchmarks/adapt_study.py --threads 1; python benchmarks/adapt_study.py --threads 2"
                       " (the second only adds the 2-thread timing rows)",
            "last_invocation": " ".join(argv if argv is not None else sys.argv[1:])}
    records = list(runs.cache.values())
    write_report(Path(args.out), summarise(records, runs.cases_of, p.variants, p.steps, args.seed), records, meta)


def run(p: Plan, runs: Runs, on_run: Callable[[], None]) -> None:
    """Every run the cache lacks, variant by variant (so that a budget stop leaves whole variants),
    calling `on_run` after each; then the timing runs."""
    args = p.args
    t_start = time.perf_counter()
    engine = EngineConfig(engine="torch", device="cpu", threads=args.threads)
    pipes: dict[int, FusionPipeline] = {}
    cases: dict[tuple[str, int], list[Case]] = {}
    for variant in [None, *p.variants]:
        for scale in p.scales:
            if variant is not None and scale not in variant.scales:
                continue
            if scale not in pipes:
                pipes[scale] = FusionPipeline.load(None, scale, engine=engine)
            pipe = pipes[scale]
            runs.sampler = f"{pipe.sample.sampler}-{pipe.steps} (the bundle's recommendation), seed 0"
            wanted = p.steps if variant is None else variant.steps(p.steps)
            for dataset in p.datasets:
                if (dataset, scale) not in cases:
                    cases[(dataset, scale)] = load_cases(DATASETS[dataset], scale, args.images, p.wheel)
                    runs.cases_of[(dataset, scale)] = [c.name for c in cases[(dataset, scale)]]
                if variant is not None and dataset not in variant.datasets:
                    continue
                for case in cases[(dataset, scale)]:
                    key = run_key(dataset, case.name, scale, variant, args.seed)
                    have = runs.cache.get(key)
                    if have is not None and (variant is None or all(str(n) in have["scores"] for n in wanted)):
                        continue
                    if args.budget_min and time.perf_counter() - t_start > 60 * args.budget_min:
                        print(f"budget of {args.budget_min} min spent; stopping (rerun to continue)")
                        return
                    t0 = time.perf_counter()
                    res = run_case(pipe, case, variant, wanted, args.seed)
                    if have is not None and variant is not None:  # keep scores of N beyond this run's
                        res["scores"] = {**have["scores"], **res["scores"]}
                    rec = {"key": key, "dataset": dataset, "case": case.name, "scale": scale,
                           "variant": None if variant is None else asdict(variant), **res,
                           "wall_seconds": time.perf_counter() - t0, "threads": args.threads}
                    runs.cache[key] = rec
                    what = "baseline + N=0" if variant is None else f"variant {variant.name}"
                    detail = (f"base {res['baseline']['psnr']:.2f} model {res['model']['psnr']:.2f}" if variant is None
                              else " ".join(f"N={n}:{s['psnr']:.2f}" for n, s in sorted(res['scores'].items(),
                                                                                        key=lambda kv: int(kv[0]))))
                    print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] x{scale} {dataset} {case.name} {what}: "
                          f"{detail} ({rec['wall_seconds']:.0f} s)", flush=True)
                    on_run()
    if args.timing:
        for scale in p.scales:
            key = f"timing|x{scale}|threads={args.threads}"
            if key in runs.cache and not args.retime:
                continue
            pipe = pipes.get(scale) or FusionPipeline.load(None, scale, engine=engine)
            case = (cases.get((p.datasets[0], scale))
                    or load_cases(DATASETS[p.datasets[0]], scale, args.images, p.wheel))[0]
            rec = {"key": key, "scale": scale, **time_adaptation(pipe, case, args.timing, args.threads)}
            runs.cache[key] = rec
            print(f"timing x{scale}, {args.threads} thread(s): {rec['seconds_per_step']:.2f} s/step, "
                  f"fuse {rec['fuse_seconds']:.2f} s (load {rec['load_before']:.1f})", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = plan(argv)
    torch.set_num_threads(p.args.threads)
    Path(p.args.out).mkdir(parents=True, exist_ok=True)
    runs = Runs(load_cache(Path(p.args.out) / "adapt.json"))
    run(p, runs, on_run=lambda: report(p, runs, argv))
    report(p, runs, argv)


if __name__ == "__main__":
    main()
