"""Does test-time adaptation (`fuse --adapt N`, tfsdeploy.tools.adapt) help? Measured on data the
packaged model never saw, one slice at a time (each slice adapts a fresh copy of the model on
itself alone), against the ground truth.

    pip download nilearn --no-deps -d /tmp/nl            # once: the ICBM volumes (read, never installed)
    python benchmarks/adapt_study.py --threads 1          # the whole study (resumes); ~50 min on a busy 2-core CPU
    python benchmarks/adapt_study.py --images 2 --variants A,B --steps 10,25 --out /tmp/pilot   # a pilot

Datasets:
  icbm  axial slices synthesised from the 1 mm ICBM 2009a T1 and grey / white matter maps that ship
        inside the nilearn wheel (read from the wheel; nilearn itself is not needed): T1 as is, a
        T2-like image from the tissue maps (CSF bright, grey > white), and a SPECT- or PET-like
        image from blurred grey matter with smooth regional variation, colour-mapped. Finer anatomy
        than the 2 mm SPM templates the model was trained on. Ground truth: the classical fusion
        of the 256 px sources; inputs: bicubic down by the scale (the paper's degradation).
  spm   the SPM test split with another degradation than training's: Gaussian blur (sigma 0.7 x
        scale px), area downsampling, Gaussian noise (sigma 0.01) and 8-bit quantisation. Ground
        truth as stored.
  spm-bicubic  the same SPM test slices degraded as in training: the in-domain control, where the
        model is at its best and adaptation can only lose (variants B and E only).

For each slice, scale and variant (learning rate, extra degradation, ...), one adaptation runs to the
largest N, and the fused image is scored after each N in --steps (the adaptation uses a constant
rate, so the model after N steps of a long run is the model of an N-step run). N = 0 is the
packaged model; the baseline is "upsample, then fuse" (make_condition + fuse_condition).

adapt.md and adapt.json are rewritten after every run; adapt.json keeps every run, so an
interrupted study resumes where it stopped (delete it to start afresh). Last, `adapt` is timed on
one slice per scale (--timing steps) at --threads.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsdeploy.config import EngineConfig  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.data.synth import gaussian_blur  # noqa: E402
from tfsdeploy.fusion import fuse_condition  # noqa: E402
from tfsdeploy.imaging import normalise_volume, resize  # noqa: E402
from tfsdeploy.inputs import Triplet, as_triplet, make_condition  # noqa: E402
from tfsdeploy.metrics import psnr, ssim  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.adapt import AdaptConfig, adapt  # noqa: E402
from tfsdeploy.tools.hardware import device_info  # noqa: E402

SIZE = 256
WHEEL_GLOB = "/tmp/nl/nilearn-*.whl"
ICBM = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


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


# --------------------------------------------------------------------------- datasets


@dataclass
class Case:
    """One slice: the low-resolution triplet a user would hand to `fuse` and the ground truth."""

    name: str
    lr: Triplet
    gt01: torch.Tensor  # [3,SIZE,SIZE]


def read_wheel_volumes(wheel: Path) -> dict[str, np.ndarray]:
    """ICBM 2009a T1, GM and WM from the nilearn wheel as float32 [z, y (anterior up), x] in [0, 1]."""
    import nibabel as nib

    out = {}
    with zipfile.ZipFile(wheel) as z:
        for key in ("t1", "gm", "wm"):
            img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(z.read(ICBM.format(key)))))
            a = np.asarray(img.get_fdata(dtype=np.float32)) / 255.0
            out[key] = np.ascontiguousarray(np.transpose(a, (2, 1, 0))[:, ::-1, :])
    return out


def icbm_volumes(wheel: Path) -> dict[str, np.ndarray]:
    """T1, a T2-like image and SPECT- and PET-like images, each normalised like the SPM templates."""
    from scipy import ndimage

    v = read_wheel_volumes(wheel)
    gm, wm = v["gm"], v["wm"]
    # the intracranial space: tissue, holes filled, grown by 2 mm to take in the outer CSF
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.5, iterations=3))
    inside = ndimage.gaussian_filter(ndimage.binary_dilation(inside, iterations=2).astype(np.float32), 1.0)
    csf = np.clip(inside - gm - wm, 0, 1)
    scalp = v["t1"] * (1 - inside)
    t2 = 1.0 * csf + 0.55 * gm + 0.3 * wm + 0.5 * scalp
    field = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(gm.shape).astype(np.float32), 12)
    field /= np.abs(field).max()
    uptake = gm * (1 + 0.4 * field) + 0.3 * wm
    return {"t1": normalise_volume(v["t1"]), "t2": normalise_volume(t2),
            "spect": normalise_volume(ndimage.gaussian_filter(uptake, 5.0)),
            "pet": normalise_volume(ndimage.gaussian_filter(uptake, 2.5)), "gm": gm}


def icbm_cases(wheel: Path, scale: int, n: int, blur: bool = False, coronal: bool = False) -> list[Case]:
    """`n` axial slices spread over the brain (or, with `coronal`, coronal slices, top of the head up),
    alternately SPECT- and PET-like, bicubic down (or, with `blur`, degraded as `degrade_blur` does)."""
    from tfsdeploy.data.spm import slice_to_image

    vols = _ICBM.get(wheel)
    if vols is None:
        vols = _ICBM[wheel] = icbm_volumes(wheel)
    axes = (0, 2) if coronal else (1, 2)
    frac = (vols["gm"] > 0.2).mean(axis=axes)
    zs = np.nonzero(frac >= 0.02)[0]
    lo, hi = zs[0] + 0.2 * (zs[-1] - zs[0]), zs[0] + 0.85 * (zs[-1] - zs[0])
    cases = []
    for i, z in enumerate(np.linspace(lo, hi, n).round().astype(int)):
        func = "spect" if i % 2 == 0 else "pet"
        t1, t2, f = (slice_to_image(vols[k][::-1, z] if coronal else vols[k][z], SIZE) for k in ("t1", "t2", func))
        hr = _u8(as_triplet(t1, t2, f).stacked())  # sources as an 8-bit dataset would hold them
        gt = fuse_condition(hr[None])[0]
        lr = degrade_blur(hr[None], scale, i)[0] if blur else resize(hr[None], (SIZE // scale, SIZE // scale))[0]
        view = "cor" if coronal else "z"
        cases.append(Case(f"icbm-{func}_{view}{z:03d}", Triplet(lr[:1], lr[1:2], lr[2:]), gt))
    return cases


_ICBM: dict[Path, dict[str, np.ndarray]] = {}


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255 + 0.5).floor() / 255


def degrade_blur(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    """[B,C,H,W] in [0, 1] -> low resolution, degraded unlike training: Gaussian blur (sigma 0.7 x
    scale px), area down, Gaussian noise (sigma 0.01, seeded), 8-bit."""
    lr = F.avg_pool2d(gaussian_blur(hr, 0.7 * scale), scale)
    gen = torch.Generator().manual_seed(int(seed))
    return _u8(lr + 0.01 * torch.randn(lr.shape, generator=gen))


def test_split_cases(scale: int, n: int, as_trained: bool = False, synthetic: bool = False,
                     split: str = "test") -> list[Case]:
    """`n` slices spread over the default dataset's test split (or `split`), from the SPM templates
    (or, with `synthetic`, from the synthetic source), degraded unlike training (or, with
    `as_trained`, as training degrades: the in-domain control)."""
    from tfsdeploy.data import ensure_dataset, open_split

    samples = [s for s in open_split(ensure_dataset(None, log=lambda s: None), split, SIZE).load()
               if s.name.startswith("synth-") == synthetic]
    if not samples:
        sys.exit(f"the default dataset has no {'synthetic' if synthetic else 'SPM'} {split} slices: "
                 f"tfsdeploy data build --force")
    cases = []
    for i in np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(int):
        s = samples[int(i)]
        hr = s.hr.float()[None] / 255
        if as_trained:
            lr = resize(hr[:, :5], (SIZE // scale, SIZE // scale))[0]
        else:
            lr = degrade_blur(hr[:, :5], scale, int(i))[0]
        cases.append(Case(s.name if synthetic else f"spm-{s.name}", Triplet(lr[:1], lr[1:2], lr[2:5]), hr[0, 5:]))
    return cases


def load_cases(dataset: str, scale: int, n: int, wheel: Path | None) -> list[Case]:
    if dataset == "icbm":
        assert wheel is not None
        return icbm_cases(Path(wheel), scale, n)
    if dataset in ("spm", "spm-bicubic"):
        return test_split_cases(scale, n, as_trained=dataset == "spm-bicubic")
    raise SystemExit(f"unknown dataset {dataset!r}; choose from icbm, spm, spm-bicubic")


# --------------------------------------------------------------------------- measuring


def score(img: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    return {"psnr": float(psnr(img[None], gt[None])), "ssim": float(ssim(img[None], gt[None]))}


def run_case(pipe: FusionPipeline, case: Case, variant: Variant | None, steps: list[int], seed: int) -> dict:
    """Baseline and unadapted model (variant None), or one adaptation scored at each N in `steps`."""
    if variant is None:
        cond01, (top, bottom, left, right) = make_condition(case.lr, pipe.scale, SIZE)
        base = fuse_condition(cond01)[0, :, top:bottom, left:right]
        t0 = time.perf_counter()
        fused = pipe.fuse_triplet(case.lr, SIZE)
        return {"baseline": score(base, case.gt01), "model": score(fused, case.gt01),
                "fuse_seconds": time.perf_counter() - t0}
    scores: dict[str, dict[str, float]] = {}

    def on_snapshot(step: int, adapted: FusionPipeline) -> None:
        scores[str(step)] = score(adapted.fuse_triplet(case.lr, SIZE), case.gt01)

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

# What the numbers of the study's first full run said (2026-11-26; the tables above are recomputed
# on every run, this text is not).
FINDINGS = """\
**Recommendation: off by default. `--adapt 10` (lr 1e-5, batch 4, extra degradation ×2: the
AdaptConfig defaults) at ×4; not at ×8.**

- The plain recipe (degrade the LR input again by the scale, A) is unsafe. At ×4 it gains most when
  the real degradation is blurrier than bicubic (spm: +1.06 dB at N = 10, +1.35 at 25, 6/6), but on
  unseen anatomy degraded as in training (icbm) it drifts by N = 25 (−0.34 dB mean, −1.36 worst).
  At ×8 the internal input is 4 px and it only loses (−0.43 dB at N = 25, 0/6 on both data sets).
- A milder extra degradation (×2, B) is the robust setting at ×4. At N = 10: +0.38 dB (icbm, 6/6),
  +0.30 (spm, 5/6) and +0.29 (spm-bicubic, the in-domain control, 5/6), 16 of 18 slices better;
  SSIM +0.005 / +0.003 / −0.0003. More steps keep helping on icbm (+0.47 at N = 50) but drift on
  the in-domain control (−0.60 dB at N = 25, −1.60 at N = 50, worst slice −3.5), hence N = 10.
- Higher learning rates bring nothing: at ×4, 3e-5 (C) equals 1e-5 at N = 10 and 1e-4 (D) is
  lower (+0.32 / +0.16 dB); at ×8 both lose (C −0.46 / −0.14, D −1.25 / −0.87 dB at N = 10).
- ×8: nothing helps reliably. With ×2 (B) at N = 10: −0.12 (icbm), −0.01 (spm), +0.05 dB
  (in-domain). With ×4 (E, 8 px internal inputs) it helps the blurrier spm input (+0.35, 6/6) but
  costs 0.62 dB in-domain (0/6) and 0.08 on icbm; with ×8 (A, 4 px) it loses everywhere.
- Cost on this 2-core CPU: at ×4 0.6 (2 threads) to 1.0 s (1 thread) per step, so 6 to 10 s for
  N = 10, the first step's warm-up included; at ×8 about 0.3 s; one DDIM-2 fuse is 1.5 to 2.5 s. The machine was shared
  with other test runs during the study, so the per-run s / step column varies with the load
  (0.87 to 1.38 s at ×4 for identical work); the timing table was measured at a load near 1.
- Limits: 6 slices per data set and one seed; differences under about 0.1 dB are noise. ×2 was
  not measured."""



def main(argv: list[str] | None = None) -> None:
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
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = load_cache(out / "adapt.json")
    datasets = args.datasets.split(",")
    scales = [int(s) for s in args.scales.split(",")]
    steps = sorted(int(s) for s in args.steps.split(","))
    variants = [v for v in VARIANTS if v.name in args.variants.split(",")]
    wheel = Path(args.wheel) if args.wheel else next(iter(sorted(glob.glob(WHEEL_GLOB))), None)
    if "icbm" in datasets and (wheel is None or not Path(wheel).is_file()):
        sys.exit("icbm needs the nilearn wheel: pip download nilearn --no-deps -d /tmp/nl (or pass --wheel)")
    described = {"icbm": f"icbm: {args.images} axial slices synthesised from the ICBM 2009a 1 mm T1 / GM / WM in "
                         f"{Path(wheel).name if wheel else '?'} (T2-like from tissue maps, SPECT/PET-like from "
                         f"blurred GM), bicubic down by the scale",
                 "spm": f"spm: {args.images} slices of the SPM test split, Gaussian blur σ = 0.7·scale px + area "
                        f"down + noise σ 0.01 + 8-bit",
                 "spm-bicubic": f"spm-bicubic: the same {args.images} SPM test slices degraded as in training (bicubic "
                                f"down): the in-domain control, defaults B / E only"}
    t_start = time.perf_counter()
    records = list(cache.values())
    sampler = ""
    cases_of: dict[tuple[str, int], list[str]] = {}

    def refresh() -> None:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_info(args.threads), "sampler": sampler,
                "datasets": {d: described[d] for d in datasets}, "variants": [asdict(v) for v in variants],
                "steps": steps, "images": args.images, "seed": args.seed, "notes": FINDINGS,
                "command": "python benchmarks/adapt_study.py --threads 1; python benchmarks/adapt_study.py --threads 2"
                           " (the second only adds the 2-thread timing rows)",
                "last_invocation": " ".join(argv if argv is not None else sys.argv[1:])}
        write_report(out, summarise(records, cases_of, variants, steps, args.seed), records, meta)

    pipes: dict[int, FusionPipeline] = {}
    cases: dict[tuple[str, int], list[Case]] = {}
    for variant in [None, *variants]:  # variant by variant, so that a budget stop leaves whole variants
        for scale in scales:
            if variant is not None and scale not in variant.scales:
                continue
            if scale not in pipes:
                pipes[scale] = FusionPipeline.load(None, scale, engine=EngineConfig(engine="torch", device="cpu",
                                                                                     threads=args.threads))
            pipe = pipes[scale]
            sampler = f"{pipe.sample.sampler}-{pipe.steps} (the bundle's recommendation), seed 0"
            wanted = steps if variant is None else variant.steps(steps)
            for dataset in datasets:
                if (dataset, scale) not in cases:
                    cases[(dataset, scale)] = load_cases(dataset, scale, args.images, wheel)
                    cases_of[(dataset, scale)] = [c.name for c in cases[(dataset, scale)]]
                if variant is not None and dataset not in variant.datasets:
                    continue
                for case in cases[(dataset, scale)]:
                    key = run_key(dataset, case.name, scale, variant, args.seed)
                    have = cache.get(key)
                    if have is not None and (variant is None or all(str(n) in have["scores"] for n in wanted)):
                        continue
                    if args.budget_min and time.perf_counter() - t_start > 60 * args.budget_min:
                        print(f"budget of {args.budget_min} min spent; stopping (rerun to continue)")
                        refresh()
                        return
                    t0 = time.perf_counter()
                    res = run_case(pipe, case, variant, wanted, args.seed)
                    if have is not None and variant is not None:  # keep scores of N beyond this run's
                        res["scores"] = {**have["scores"], **res["scores"]}
                    rec = {"key": key, "dataset": dataset, "case": case.name, "scale": scale,
                           "variant": None if variant is None else asdict(variant), **res,
                           "wall_seconds": time.perf_counter() - t0, "threads": args.threads}
                    cache[key] = rec
                    records = list(cache.values())
                    what = "baseline + N=0" if variant is None else f"variant {variant.name}"
                    detail = (f"base {res['baseline']['psnr']:.2f} model {res['model']['psnr']:.2f}" if variant is None
                              else " ".join(f"N={n}:{s['psnr']:.2f}" for n, s in sorted(res['scores'].items(),
                                                                                        key=lambda kv: int(kv[0]))))
                    print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] x{scale} {dataset} {case.name} {what}: "
                          f"{detail} ({rec['wall_seconds']:.0f} s)", flush=True)
                    refresh()
    if args.timing:
        for scale in scales:
            key = f"timing|x{scale}|threads={args.threads}"
            if key in cache and not args.retime:
                continue
            pipe = pipes.get(scale) or FusionPipeline.load(None, scale, engine=EngineConfig(
                engine="torch", device="cpu", threads=args.threads))
            case = (cases.get((datasets[0], scale)) or load_cases(datasets[0], scale, args.images, wheel))[0]
            rec = {"key": key, "scale": scale, **time_adaptation(pipe, case, args.timing, args.threads)}
            cache[key] = rec
            records = list(cache.values())
            print(f"timing x{scale}, {args.threads} thread(s): {rec['seconds_per_step']:.2f} s/step, "
                  f"fuse {rec['fuse_seconds']:.2f} s (load {rec['load_before']:.1f})", flush=True)
    refresh()


if __name__ == "__main__":
    main()
