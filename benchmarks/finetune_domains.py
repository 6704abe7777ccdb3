"""Does fine-tuning a bundle member on a domain it has not seen ever leave it worse than the member
it started from, on other slices of that domain? The README's recipe, through the CLI, per domain
and scale:

    python benchmarks/finetune_domains.py --model default --domains icbm,icbm-cor --scales 2,4,8 \\
        --steps 100 --work /tmp/ftd --out benchmarks/reports/finetune-domains

Domains (benchmarks/finetune_study.py builds them from the ICBM 2009a volumes in the nilearn wheel):
`icbm`, axial slices, and `icbm-cor`, coronal ones; `--test` test slices in the middle of the brain,
every 2nd, and training slices at least `--gap` slices away on both sides. Per domain and scale:

    tfsdeploy train --init MODEL --data WORK/DOMAIN --scales S --out WORK/DOMAIN-xS/run --threads 1 --steps N
    tfsdeploy bundle WORK/DOMAIN-xS/bundle --xS WORK/DOMAIN-xS/run
    tfsdeploy evaluate -m MODEL -m WORK/DOMAIN-xS/bundle --data WORK/DOMAIN --split test --scales S \\
        --methods classical --threads 1 --out WORK/DOMAIN-xS/eval

The fine-tune holds a fifth of its training slices out and chooses its blend with the start there
(the split has no val/); the test slices are never seen. The table gives the baseline, the start and
the fine-tuned bundle on the test slices, how many slices the fine-tune loses on, and the blend it
chose. Every phase is cached under WORK, so an interrupted study resumes. One CPU thread throughout.
Writes OUT/finetune-domains.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cases import build_icbm, find_wheel, require_wheel, sh  # noqa: E402
from tfsdeploy.checkpoint import read_meta  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402

DOMAINS = {"icbm": False, "icbm-cor": True}  # name -> coronal


def cli(*args: str, log: Path) -> float:
    """Run `tfsdeploy ARGS` on one thread, its output appended to `log`; its wall time in seconds."""
    rc, _, wall = sh([sys.executable, "-m", "tfsdeploy", *args], log)
    if rc:
        raise SystemExit(f"tfsdeploy {args[0]} failed (exit {rc}); see {log}")
    return wall


def one(model: str, domain: Path, scale: int, steps: int, work: Path, extra: list[str]) -> dict:
    """Fine-tune, bundle and evaluate one (domain, scale); cached in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "output.txt"
    result = work / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    run, bundle, ev = work / "run", work / "bundle", work / "eval"
    wall = {}
    if not (run / "latest").is_file() or read_meta(run)[1]["step"] < steps:
        wall["train_wall_s"] = cli("train", "--init", model, "--data", str(domain), "--scales", str(scale), "--out",
                              str(run), "--threads", "1", "--steps", str(steps), "--no-progress", *extra, log=log)
    if not (bundle / "bundle.json").is_file():
        cli("bundle", str(bundle), f"--x{scale}", str(run), log=log)
    if not (ev / "values.json").is_file():
        wall["evaluate_s"] = cli("evaluate", "-m", model, "-m", str(bundle), "--data", str(domain), "--split",
                                 "test", "--scales", str(scale), "--methods", "classical", "--threads", "1",
                                 "--out", str(ev), log=log)
    values = json.loads((ev / "values.json").read_text())
    start_label, tuned_label = Path(model).name, bundle.name
    table = values["summary"]["tables"][f"x{scale}"]["reference"]
    per = values["per_image"][f"x{scale}"]
    names = sorted(per[tuned_label])
    worse = [n for n in names if per[tuned_label][n]["PSNR"] < per[start_label][n]["PSNR"]]
    chosen = read_meta(run)[1].get("blend_choice") or {}  # A = 1 leaves no blend in bundle.json
    out = {"scale": scale, "steps": steps, "slices": len(names),
           "baseline": {k: table["bicubic + classical"][k] for k in ("PSNR", "SSIM")},
           "start": {k: table[start_label][k] for k in ("PSNR", "SSIM")},
           "tuned": {k: table[tuned_label][k] for k in ("PSNR", "SSIM")},
           "slices_worse": worse, "blend": chosen.get("alpha"),
           "train_s": float(read_meta(run)[1].get("elapsed_s", float("nan"))), **wall}
    with atomic_path(result) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    return out


def report(rows: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"# Fine-tuning `{args.model}` on domains it has not seen\n",
             f"`python benchmarks/finetune_domains.py --model {args.model} --domains {args.domains} --scales "
             f"{args.scales} --steps {args.steps} --test {args.test}`; one CPU thread. PSNR dB / SSIM on "
             "each domain's test slices (never trained on, never held out).\n",
             "| domain, scale | slices | baseline | start | fine-tuned (blend A) | fine-tuned - start | "
             "slices worse | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        b, s, t = r["baseline"], r["start"], r["tuned"]
        lines.append(f"| {key} | {r['slices']} | {b['PSNR']:.2f} / {b['SSIM']:.4f} | {s['PSNR']:.2f} / "
                     f"{s['SSIM']:.4f} | {t['PSNR']:.2f} / {t['SSIM']:.4f} (A {r['blend']}) | "
                     f"{t['PSNR'] - s['PSNR']:+.2f} dB / {t['SSIM'] - s['SSIM']:+.4f} | {len(r['slices_worse'])} | "
                     f"{r.get('train_s', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--domains", default="icbm,icbm-cor")
    ap.add_argument("--scales", default="2,4,8")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--test", type=int, default=6, help="test slices per domain")
    ap.add_argument("--gap", type=int, default=12)
    ap.add_argument("--span", type=int, default=44)
    ap.add_argument("--work", default="/tmp/ftd")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "finetune-domains"))
    ap.add_argument("--wheel", default="")
    ap.add_argument("--train-args", default="", help="extra `tfsdeploy train` options")
    args = ap.parse_args(argv)
    wheel = require_wheel(find_wheel(args.wheel))
    work, out = Path(args.work), Path(args.out)
    rows = {}
    for name in args.domains.split(","):
        if name not in DOMAINS:
            raise SystemExit(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)}")
        data = work / name
        build_icbm(data, wheel, args.test, args.gap, args.span, coronal=DOMAINS[name])
        for s in (int(v) for v in args.scales.split(",")):
            rows[f"{name} x{s}"] = one(args.model, data, s, args.steps, work / f"{name}-x{s}", args.train_args.split())
            print(f"{name} x{s}: {json.dumps(rows[f'{name} x{s}'])}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "finetune-domains.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    with atomic_path(out / "finetune-domains.md") as tmp:
        tmp.write_text(report(rows, args))
    print(report(rows, args))


if __name__ == "__main__":
    main()
