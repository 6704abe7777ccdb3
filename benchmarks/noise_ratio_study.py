"""How far apart are clean and noisy inputs by the noise ratio the back-projection gate reads
(tfsdeploy.inputs.noise_ratio)? Per scale and proxy set (benchmarks/cases.py), the smallest and
largest ratio over the slices, and the same for white noise and for white noise shrunk bicubically:

    python benchmarks/noise_ratio_study.py --images 12 --out benchmarks/reports/noise-ratio

Writes OUT/noise-ratio.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cases import SETS, SIZE, find_wheel, load_cases, require_wheel  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.imaging import resize  # noqa: E402
from tfsdeploy.inputs import noise_ratio  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--scales", default="2,4,8")
    ap.add_argument("--datasets", default="spm-val,spm-blur,icbm,icbm-blur,icbm-cor,synth")
    ap.add_argument("--wheel", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "noise-ratio"))
    args = ap.parse_args(argv)
    wheel = require_wheel(find_wheel(args.wheel))
    torch.set_num_threads(1)
    rows = []
    g = torch.Generator().manual_seed(0)
    for scale in (int(s) for s in args.scales.split(",")):
        side = SIZE // scale
        white = torch.rand(args.images, 5, side, side, generator=g)
        shrunk = resize(torch.rand(args.images, 5, SIZE, SIZE, generator=g), (side, side))
        sets = {"white noise": white, "white noise shrunk bicubically": shrunk}
        for name in args.datasets.split(","):
            if name not in SETS:
                raise SystemExit(f"unknown set {name!r}")
            sets[name] = torch.stack([c.lr.stacked() for c in load_cases(name, scale, args.images, wheel)])
        for name, lr in sets.items():
            r = noise_ratio(lr)
            rows.append({"scale": scale, "set": name, "slices": len(r), "min": float(r.min()), "max": float(r.max()),
                         "mean": float(r.mean())})
            print(f"x{scale} {name:32s} {float(r.min()):.3f} - {float(r.max()):.3f}", flush=True)
    lines = ["# Noise ratio of the low-resolution inputs, per proxy set\n",
             f"`python benchmarks/noise_ratio_study.py --images {args.images} --scales {args.scales} --datasets "
             f"{args.datasets}`: `tfsdeploy.inputs.noise_ratio` of each slice's low-resolution T1 and T2.\n",
             "| scale | set | slices | smallest | mean | largest |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| x{r['scale']} | {r['set']} | {r['slices']} | {r['min']:.3f} | {r['mean']:.3f} | {r['max']:.3f} |"
              for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "noise-ratio.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    with atomic_path(out / "noise-ratio.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
