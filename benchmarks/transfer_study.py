"""Does a model carry over to data it was not trained on? Each model is scored against the
upsample-then-fuse baseline on four test sets, per scale, with the default sampler (DDIM-2).

    pip download nilearn --no-deps -d /tmp/nl            # once: the ICBM volumes (read, never installed)
    python benchmarks/transfer_study.py --model packaged=default \\
        --model mixed=x4:runs/ft-x4/ckpt_001000.safetensors,x8:runs/ft-x8/ckpt_001000.safetensors

A model is a bundle or run (any `--model` that `fuse` takes), or `x4:PATH,x8:PATH` naming one per
scale. Test sets:

  spm-test   the SPM test split, degraded as in training (bicubic down): the issue-6 bar
             (+1.5 dB at x4, +3 dB at x8 for the packaged model);
  spm-blur   the same SPM test slices degraded otherwise: Gaussian blur σ = 0.7·scale px, area down,
             noise σ 0.01, 8-bit (benchmarks/adapt_study.py);
  icbm       axial slices synthesised from the 1 mm ICBM 2009a T1 / GM / WM that ship inside the
             nilearn wheel (benchmarks/adapt_study.py), bicubic down: another anatomy, another source;
  synth      the test split of `data build`'s synthetic source (skull, texture, noise, lesions).

Writes transfer.md and transfer.json under --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adapt_study import WHEEL_GLOB, Case, icbm_cases, score, test_split_cases  # noqa: E402

from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.fusion import fuse_condition  # noqa: E402
from tfsdeploy.inputs import make_condition  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.hardware import device_info  # noqa: E402

SIZE = 256
DATASETS = ("spm-test", "spm-blur", "icbm", "synth")


def load_cases(dataset: str, scale: int, n: int, wheel: Path | None) -> list[Case]:
    if dataset == "spm-test":
        return test_split_cases(scale, n, as_trained=True)
    if dataset == "spm-blur":
        return test_split_cases(scale, n)
    if dataset == "icbm":
        return icbm_cases(wheel, scale, n)
    return test_split_cases(scale, n, as_trained=True, synthetic=True)


def parse_model(spec: str) -> tuple[str, dict[int, str] | str]:
    label, _, path = spec.partition("=")
    if not path:
        sys.exit(f"--model {spec!r}: give LABEL=PATH or LABEL=x4:PATH,x8:PATH")
    if ":" in path and path.split(":", 1)[0].startswith("x"):
        return label, {int(k[1:]): v for k, v in (p.split(":", 1) for p in path.split(","))}
    return label, path


def main(argv: list[str] | None = None) -> None:
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
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    models = [parse_model(m) for m in args.model]
    datasets = [d for d in args.datasets.split(",") if d]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        sys.exit(f"unknown test set(s) {bad}; choose from {', '.join(DATASETS)}")
    scales = [int(s) for s in args.scales.split(",")]
    wheel = Path(args.wheel or next(iter(sorted(glob.glob(WHEEL_GLOB))), ""))
    wheel = wheel if str(wheel) else None
    if "icbm" in datasets and (wheel is None or not wheel.is_file()):
        sys.exit("icbm needs the nilearn wheel: pip download nilearn --no-deps -d /tmp/nl (or pass --wheel)")
    sample = SampleConfig(sampler="ddim", steps=2, seed=0)
    engine = EngineConfig(engine="torch", device="cpu", threads=args.threads)
    t_start = time.perf_counter()
    rows = []
    for scale in scales:
        pipes = {}
        for label, model in models:
            path = model.get(scale) if isinstance(model, dict) else model
            if path is not None:
                pipes[label] = FusionPipeline.load(path, scale, sample, engine=engine)
        for dataset in datasets:
            n = args.spm_test_images if dataset == "spm-test" else args.images
            cases = load_cases(dataset, scale, n, wheel)
            per = {"baseline": []} | {label: [] for label in pipes}
            for case in cases:
                cond01, (t, b, l, r) = make_condition(case.lr, scale, SIZE)
                per["baseline"].append(score(fuse_condition(cond01)[0, :, t:b, l:r], case.gt01))
                for label, pipe in pipes.items():
                    per[label].append(score(pipe.fuse_triplet(case.lr, SIZE), case.gt01))
            base_psnr = np.array([s["psnr"] for s in per["baseline"]])
            row = {"scale": scale, "dataset": dataset, "images": len(cases), "cases": [c.name for c in cases]}
            for label, scores in per.items():
                p = np.array([s["psnr"] for s in scores])
                row[label] = {"psnr": float(p.mean()), "ssim": float(np.mean([s["ssim"] for s in scores])),
                              "gain": float((p - base_psnr).mean()), "wins": int((p > base_psnr).sum()),
                              "per_slice_psnr": p.round(3).tolist()}
            rows.append(row)
            print(f"x{scale} {dataset:8s} " + "  ".join(
                f"{k} {row[k]['psnr']:.2f}/{row[k]['ssim']:.4f} ({row[k]['gain']:+.2f})" for k in per), flush=True)
    meta = {"models": {label: (m if isinstance(m, str) else {f"x{k}": v for k, v in m.items()})
                       for label, m in models},
            "sampler": "DDIM-2, seed 0, torch fp32 on the CPU", "size": SIZE, "device": device_info(args.threads),
            "minutes": round((time.perf_counter() - t_start) / 60, 1), "command": " ".join(sys.argv)}
    write_report(Path(args.out), rows, [label for label, _ in models], meta)


def describe(device: dict) -> str:
    return f"{device.get('device', '?')}, torch {device.get('torch', '?')}, {device.get('threads', '?')} threads"


def rewrite(out: Path) -> None:
    """transfer.md again from transfer.json (after editing the JSON's meta, say)."""
    data = json.loads((out / "transfer.json").read_text())
    write_report(out, data["rows"], list(data["meta"]["models"]), data["meta"])


def write_report(out: Path, rows: list[dict], labels: list[str], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "transfer.json") as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    head = "| scale | test set | slices | baseline PSNR / SSIM | " + " | ".join(
        f"{label}: PSNR / SSIM (gain, wins)" for label in labels) + " |"
    lines = ["# Transfer: gains over upsample-then-fuse on data the models were or were not trained on", "",
             f"{meta['sampler']}, {meta['size']}x{meta['size']}; {describe(meta['device'])}; {meta['minutes']} min.",
             "", f"`{meta['command']}`", "",
             "Models: " + "; ".join(f"**{k}** = `{v}`" for k, v in meta["models"].items()), "",
             head, "|" + "---|" * (4 + len(labels))]
    for r in rows:
        b = r["baseline"]
        cells = [f"{r[label]['psnr']:.2f} / {r[label]['ssim']:.4f} ({r[label]['gain']:+.2f} dB, "
                 f"{r[label]['wins']}/{r['images']})" if label in r else "–" for label in labels]
        lines.append(f"| x{r['scale']} | {r['dataset']} | {r['images']} | {b['psnr']:.2f} / {b['ssim']:.4f} | "
                     + " | ".join(cells) + " |")
    with atomic_path(out / "transfer.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
