"""Does a model carry over to data it was not trained on? Each model is scored against the
upsample-then-fuse baseline on up to seven test sets, per scale, with DDIM-2 (or --steps), as it is
or with its predicted residual shrunk (--alphas) and with a geometric self-ensemble (--ensemble).

    pip download nilearn --no-deps -d /tmp/nl            # once: the ICBM volumes (read, never installed)
    python benchmarks/transfer_study.py --model packaged=default \\
        --model mixed=x4:runs/ft-x4/ckpt_001000.safetensors,x8:runs/ft-x8/ckpt_001000.safetensors

A model is a bundle or run (any `--model` that `fuse` takes), or `x4:PATH,x8:PATH` naming one per
scale. Test sets:

  spm-test   the SPM test split, degraded as in training (bicubic down): the packaged model's bar
             (+1.5 dB at x4, +3 dB at x8);
  spm-val    the SPM validation split, bicubic down: for choosing settings (never spm-test);
  spm-blur   the same SPM test slices degraded otherwise: Gaussian blur σ = 0.7·scale px, area down,
             noise σ 0.01, 8-bit;
  icbm       axial slices synthesised from the 1 mm ICBM 2009a T1 / GM / WM that ship inside the
             nilearn wheel, bicubic down: another anatomy, another source;
  icbm-blur  the same ICBM slices degraded as spm-blur is;
  icbm-cor   coronal ICBM slices, bicubic down: the same source cut another way;
  synth      the test split of `data build`'s synthetic source (skull, texture, noise, lesions).

(benchmarks/cases.py makes them.)

Variants: every model runs with every DDIM step count in --steps and every alpha in --alphas. Alpha
multiplies the network's output, which is the same as scaling its last convolution (weight and
bias; nothing follows it): the network predicts the clean residual over the baseline, so alpha
scales the predicted residual. 1 is the model as it is, 0 the baseline (`python -m training.shrink`
stores such a member in a bundle). With
--ensemble each variant also runs as the mean of the fused images of the 8 flips and quarter turns
of the condition (each mapped back): 8 network passes per step instead of 1. Each model's inputs
are upsampled with its own back-projection strength (a bundle member's `backproject`), or with each
strength in --backproject (tfsdeploy.inputs.upsample); the baseline is always plain bicubic.

Writes transfer.md and transfer.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cases import (ICBM_SETS, SIZE, WHEEL_GLOB, find_wheel, load_cases, require_wheel,  # noqa: E402
                              score_baseline)
from benchmarks.cases import SETS as DATASETS  # noqa: E402
from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.ensemble import fuse_views  # noqa: E402
from tfsdeploy.inputs import make_condition  # noqa: E402
from tfsdeploy.metrics import score_image  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.hardware import device_info  # noqa: E402


class ScaledDenoiser:
    """A pipeline's network with its output multiplied by `alpha`: the same as scaling its last
    convolution (what training.shrink stores). It keeps the last call's raw output, so variants that
    hand it the same input (every alpha's first DDIM step, from the same seed) run the network once."""

    def __init__(self, inner) -> None:
        self.inner, self.alpha, self._last = inner, 1.0, None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is None or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(last[:3], (x_t, cond, level))):
            last = self._last = (x_t.clone(), cond.clone(), level.clone(), self.inner(x_t, cond, level))
        return last[3] * self.alpha


def parse_model(spec: str) -> tuple[str, dict[int, str] | str]:
    label, _, path = spec.partition("=")
    if not path:
        sys.exit(f"--model {spec!r}: give LABEL=PATH or LABEL=x4:PATH,x8:PATH")
    if ":" in path and path.split(":", 1)[0].startswith("x"):
        return label, {int(k[1:]): v for k, v in (p.split(":", 1) for p in path.split(","))}
    return label, path


@dataclass
class Plan:
    """What to run: the models (label, path or {scale: path}), the sets, scales and variants."""

    models: list[tuple[str, dict[int, str] | str]]
    datasets: list[str]
    scales: list[int]
    wheel: Path | None
    steps: list[int]
    alphas: list[float]
    ensembles: tuple[bool, ...]
    args: argparse.Namespace
    backprojects: list[float | None] = field(default_factory=lambda: [None])  # None: the model's own

    def variant(self, label: str, n_steps: int, alpha: float, ens: bool, bp: float | None = None) -> str:
        name = label + (f" s{n_steps}" if len(self.steps) > 1 else "")
        name += f" b{bp:g}" if len(self.backprojects) > 1 and bp is not None else ""
        return name + (f" a{alpha:g}" if len(self.alphas) > 1 else "") + (" e8" if ens else "")


def plan(argv: list[str] | None = None) -> Plan:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="LABEL=MODEL or LABEL=x4:PATH,x8:PATH")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "transfer"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--scales", default="4,8")
    ap.add_argument("--images", type=int, default=12, help="slices per test set (spm-test: up to 48)")
    ap.add_argument("--spm-test-images", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wheel", default="", help=f"the nilearn wheel (default: {WHEEL_GLOB})")
    ap.add_argument("--steps", default="2", help="DDIM step counts, e.g. 1,2 (0: the bundle's recommendation)")
    ap.add_argument("--alphas", default="1", help="residual scales, e.g. 0,0.5,1 (1: the model as it is)")
    ap.add_argument("--ensemble", action="store_true", help="also the 8-fold geometric self-ensemble")
    ap.add_argument("--backproject", default="", help="back-projection strengths of the inputs, e.g. 0,0.75,1 "
                    "(default: each model's own recommendation)")
    args = ap.parse_args(argv)

    models = [parse_model(m) for m in args.model]
    datasets = [d for d in args.datasets.split(",") if d]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        sys.exit(f"unknown test set(s) {bad}; choose from {', '.join(DATASETS)}")
    wheel = find_wheel(args.wheel)
    if set(ICBM_SETS) & set(datasets):
        require_wheel(wheel)
    return Plan(models, datasets, [int(s) for s in args.scales.split(",")], wheel,
                [int(s) for s in args.steps.split(",")], [float(a) for a in args.alphas.split(",")],
                (False, True) if args.ensemble else (False,), args,
                [float(b) for b in args.backproject.split(",") if b.strip()] or [None])


def run(p: Plan) -> tuple[list[dict], list[str]]:
    """Every variant of every model on every set and scale: one row per scale and set, with the
    baseline's and each variant's mean PSNR / SSIM, gain and per-slice PSNR."""
    args = p.args
    engine = EngineConfig(engine="torch", device="cpu", threads=args.threads)
    rows, labels = [], []
    for scale in p.scales:
        pipes = {}
        for label, model in p.models:
            path = model.get(scale) if isinstance(model, dict) else model
            if path is None:
                continue
            for n_steps in p.steps:
                pipe = FusionPipeline.load(path, scale, SampleConfig(sampler="ddim", steps=n_steps, seed=0),
                                           engine=engine)
                pipe.denoiser = ScaledDenoiser(pipe.denoiser)
                for bp in p.backprojects:
                    for ens in p.ensembles:
                        for alpha in p.alphas:
                            # the model's own strength with its noise gate, or a strength as given
                            pipes[p.variant(label, n_steps, alpha, ens, bp)] = (
                                pipe, alpha, ens, (pipe.backproject, pipe.backproject_gate) if bp is None else (bp, None))
        labels += [v for v in pipes if v not in labels]
        for dataset in p.datasets:
            n = args.spm_test_images if dataset == "spm-test" else args.images
            cases = load_cases(dataset, scale, n, p.wheel)
            per = {"baseline": []} | {label: [] for label in pipes}
            for case in cases:
                per["baseline"].append(score_baseline(case, scale))
                conds = {}  # one condition per back-projection strength and noise gate
                for label, (pipe, alpha, ens, bp) in pipes.items():
                    if bp not in conds:
                        conds[bp] = make_condition(case.lr, scale, SIZE, *bp)
                    cond01, (t, b, l, r) = conds[bp]
                    pipe.denoiser.alpha = alpha
                    fused = fuse_views(lambda batch, _seeds: pipe(batch), cond01, None, 8) if ens else pipe(cond01)
                    out = fused.float().cpu()
                    per[label].append(score_image(out[0, :, t:b, l:r], case.gt01))
            base_psnr = np.array([s["psnr"] for s in per["baseline"]])
            row = {"scale": scale, "dataset": dataset, "images": len(cases), "cases": [c.name for c in cases]}
            for label, scores in per.items():
                psnrs = np.array([s["psnr"] for s in scores])
                row[label] = {"psnr": float(psnrs.mean()), "ssim": float(np.mean([s["ssim"] for s in scores])),
                              "gain": float((psnrs - base_psnr).mean()), "wins": int((psnrs > base_psnr).sum()),
                              "per_slice_psnr": psnrs.round(3).tolist()}
            rows.append(row)
            print(f"x{scale} {dataset:8s} " + "  ".join(
                f"{k} {row[k]['psnr']:.2f}/{row[k]['ssim']:.4f} ({row[k]['gain']:+.2f})" for k in per), flush=True)
    return rows, labels


def main(argv: list[str] | None = None) -> None:
    p = plan(argv)
    torch.set_num_threads(p.args.threads)
    t_start = time.perf_counter()
    rows, labels = run(p)
    meta = {"models": {label: (m if isinstance(m, str) else {f"x{k}": v for k, v in m.items()})
                       for label, m in p.models},
            "sampler": (f"DDIM-{p.args.steps}" if p.args.steps != "0" else "DDIM with each member's recommended steps")
            + ", seed 0, torch fp32 on the CPU", "size": SIZE, "device": device_info(p.args.threads),
            "minutes": round((time.perf_counter() - t_start) / 60, 1), "command": " ".join(sys.argv)}
    write_report(Path(p.args.out), rows, labels, meta)


def describe(device: dict) -> str:
    return f"{device.get('device', '?')}, torch {device.get('torch', '?')}, {device.get('threads', '?')} threads"


def rewrite(out: Path) -> None:
    """transfer.md again from transfer.json (after editing the JSON's meta, say)."""
    data = json.loads((out / "transfer.json").read_text())
    write_report(out, data["rows"], data["meta"].get("labels") or list(data["meta"]["models"]), data["meta"])


def write_report(out: Path, rows: list[dict], labels: list[str], meta: dict) -> None:
    """One table per scale: a line per model variant, a column per test set, each cell the mean gain
    in PSNR over the baseline (slices better / slices) and the model's SSIM."""
    meta = {**meta, "labels": labels}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "transfer.json") as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Transfer: gains over upsample-then-fuse on data the models were or were not trained on", "",
             f"{meta['sampler']}, {meta['size']}x{meta['size']}; {describe(meta['device'])}; {meta['minutes']} min.",
             "", f"`{meta['command']}`", "",
             "Models: " + "; ".join(f"**{k}** = `{v}`" for k, v in meta["models"].items()), "",
             "Each cell: mean PSNR gain over the baseline (slices better / slices), then the mean SSIM.", ""]
    for scale in sorted({r["scale"] for r in rows}):
        here = [r for r in rows if r["scale"] == scale]
        lines += [f"## x{scale}", "", "| | " + " | ".join(f"{r['dataset']} ({r['images']})" for r in here) + " |",
                  "|---|" + "---:|" * len(here),
                  "| baseline PSNR / SSIM | " + " | ".join(
                      f"{r['baseline']['psnr']:.2f} / {r['baseline']['ssim']:.4f}" for r in here) + " |"]
        for label in labels:
            if not any(label in r for r in here):
                continue
            cells = [f"{r[label]['gain']:+.2f} ({r[label]['wins']}/{r['images']}) {r[label]['ssim']:.4f}"
                     if label in r else "–" for r in here]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    with atomic_path(out / "transfer.md") as tmp:
        Path(tmp).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
