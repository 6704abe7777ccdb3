"""Does fine-tuning the packaged x4 model on a user's own data (`tfsdeploy train --init default`) help
on held-out slices of that data, what does it cost on the SPM data the model was trained on, and how
long does it take on this CPU?

    python benchmarks/finetune_study.py                          # the whole study (resumes)
    python benchmarks/finetune_study.py --steps 50,100 --images 4 --work /tmp/ft-pilot --out /tmp/finetune   # a pilot

1. Writes a split dataset synthesised from the 1 mm ICBM 2009a volumes in the nilearn wheel (see
   benchmarks/cases.py: T1, a T2-like image from the tissue maps, SPECT- / PET-like images
   from blurred grey matter, alternately) to WORK/icbm/{train,test}/{t1,t2,func,gt}/NAME.png, with
   gt = the classical fusion of the 8-bit HR sources (as the project's data builder makes it).
   train: every 2nd axial slice of two z-ranges below and above the test range; test: every 2nd
   slice of a central z-range, at least --gap slices away from any training slice.
2. Fine-tunes through the CLI, `tfsdeploy train --init default --data WORK/icbm --scales 4 --out
   WORK/run --threads 1 --steps N`, for each N of --steps in turn (later N resume the run),
   copying each checkpoint aside; seconds per step from log.jsonl (img/s) and wall time. The split
   has no val/, so the fine-tune holds the last fifth of the training slices out to choose its blend
   (training.train.held_out); this study scores the checkpoints themselves (the fine-tune alone).
3. Scores, at x4 with DDIM-2 (the bundle's recommendation), on the ICBM test split and on the SPM
   test split (bicubic degradation, as in training): the baseline (bicubic up, classical fusion),
   the packaged model and each checkpoint; PSNR / SSIM against the ground truth.
4. Cross-checks the last checkpoint's ICBM score with `tfsdeploy evaluate`.
5. Writes OUT/finetune.md and OUT/finetune.json.

Every phase is cached under WORK, so an interrupted study resumes. One CPU thread throughout.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cases import (SIZE, Case, build_icbm, find_wheel, pick_samples, require_wheel,  # noqa: E402
                              score_baseline, sh)
from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.fileio import atomic_dir, atomic_path  # noqa: E402
from tfsdeploy.inputs import Triplet  # noqa: E402
from tfsdeploy.metrics import score_image  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.tools.hardware import device_info  # noqa: E402

SCALE = 4
DDIM_STEPS = 2


# --------------------------------------------------------------------------- 1. the dataset


# --------------------------------------------------------------------------- 2. fine-tuning


TFSDEPLOY = str(Path(sys.executable).with_name("tfsdeploy"))  # the CLI of the interpreter running this


def portable(text: str) -> str:
    """A command or its output as the report shows it: `tfsdeploy`, and paths inside the project
    relative to it, not to this machine's checkout."""
    return text.replace(TFSDEPLOY, "tfsdeploy").replace(f"{ROOT}/", "")


def fine_tune(work: Path, data: Path, steps: list[int], extra: list[str]) -> dict:
    """Train to each N in `steps`; each checkpoint is copied to WORK/ckpts/ckpt-N."""
    run, ckpts, log = work / "run", work / "ckpts", work / "commands.log"
    ckpts.mkdir(parents=True, exist_ok=True)
    state_file = work / "train.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"phases": {}, "issues": []}
    for n in steps:
        if str(n) in state["phases"] and (ckpts / f"ckpt-{n:07d}").is_dir():
            continue
        base = [TFSDEPLOY, "train", "--init", "default", "--data", str(data), "--scales", str(SCALE), "--out", str(run),
                "--threads", "1", "--steps", str(n), "--no-progress", *extra]
        cmd = base
        rc, text, wall = sh(cmd, log)
        if rc != 0 and "already holds a run" in text:
            # The documented "same command resumes" does not hold with --init: drop it to resume.
            if not any(i.get("kind") == "init-resume" for i in state["issues"]):
                state["issues"].append({"kind": "init-resume", "command": portable(" ".join(cmd)), "rc": rc,
                                        "output": portable(text.strip()[-600:])})
            cmd = [a for i, a in enumerate(base) if a != "--init" and (i == 0 or base[i - 1] != "--init")]
            rc, text, wall2 = sh(cmd, log)
            wall += wall2
        if rc != 0:
            raise SystemExit(f"training failed (rc {rc}):\n{' '.join(cmd)}\n{text[-2000:]}")
        src = run / f"ckpt-{n:07d}"
        if not src.is_dir():
            raise SystemExit(f"{src} missing after training to {n}:\n{text[-2000:]}")
        with atomic_dir(ckpts / src.name) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        state["phases"][str(n)] = {"command": portable(" ".join(cmd)), "wall_s": round(wall, 1),
                                  "output": portable(text.strip()[-800:])}
        state_file.write_text(json.dumps(state, indent=2))
        print(f"trained to {n} ({wall:.0f} s wall)", flush=True)
    # throughput from the run's log: steps per logged window from img/s and the batch size
    cfg = json.loads((ckpts / f"ckpt-{max(steps):07d}" / "config.json").read_text())
    batch = cfg["train"]["batch_size"]
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [(e["step"], e["img_per_s"]) for e in entries if "img_per_s" in e]
    sps = [batch / r for _, r in rates]
    state["batch_size"], state["crop"], state["lr"] = batch, cfg["data"]["crop"], cfg["train"]["lr"]
    state["ema_decay"], state["log_every"] = cfg["train"]["ema_decay"], cfg["train"]["log_every"]
    state["seconds_per_step_median"] = float(np.median(sps)) if sps else None
    state["seconds_per_step_windows"] = [(s, round(batch / r, 3)) for s, r in rates]
    state["losses"] = [(e["step"], round(e["loss"], 5)) for e in entries if "loss" in e]
    state["elapsed_s"] = {str(n): json.loads((ckpts / f"ckpt-{n:07d}" / "config.json").read_text()).get("elapsed_s")
                          for n in steps}
    state_file.write_text(json.dumps(state, indent=2))
    return state


# --------------------------------------------------------------------------- 3. scoring


def held_out_cases(kind: str, data: Path, n: int) -> list[Case]:
    """`n` test slices of the ICBM dataset at `data` (kind "icbm") or of the default dataset's SPM
    slices, as their 256 px sources: the input rule degrades them by the scale as training does."""
    picked = pick_samples("test", n, root=data if kind == "icbm" else None)
    cases = []
    for _, s in picked:
        hr = s.hr.float() / 255  # [8,SIZE,SIZE]: t1, t2, func RGB, gt RGB
        cases.append(Case(s.name, Triplet(hr[:1], hr[1:2], hr[2:5]), hr[5:8]))
    return cases


def score_model(model: str | None, cases: list[Case]) -> dict[str, dict[str, float]]:
    """Per-slice PSNR / SSIM at x4 of the model (None: the baseline, bicubic up + classical fusion)."""
    if model is None:
        return {c.name: score_baseline(c, SCALE) for c in cases}
    pipe = FusionPipeline.load(model, SCALE, SampleConfig(sampler="ddim", steps=DDIM_STEPS, seed=0),
                               engine=EngineConfig(engine="torch", device="cpu", threads=1))
    return {c.name: score_image(pipe.fuse_triplet(c.lr, SIZE), c.gt01) for c in cases}


def cli_cross_check(work: Path, data: Path, ckpt: Path) -> dict:
    """`tfsdeploy evaluate` on the ICBM test split: the baseline and the checkpoint, from its table."""
    out = work / "eval-cli"
    cmd = [TFSDEPLOY, "evaluate", "--model", str(ckpt), "--data", str(data), "--split", "test", "--scales", str(SCALE),
           "--methods", "classical", "--steps", str(DDIM_STEPS), "--threads", "1", "--no-progress",
           "--out", str(out)]
    rc, text, wall = sh(cmd, work / "commands.log")
    res = {"command": portable(" ".join(cmd)), "rc": rc, "wall_s": round(wall, 1)}
    table = out / f"table1_x{SCALE}.csv"
    if rc == 0 and table.is_file():
        res["rows"] = {(r.get("method") or r.get("Method")): {"psnr": float(r["PSNR"]), "ssim": float(r["SSIM"])}
                       for r in csv.DictReader(io.StringIO(table.read_text())) if (r.get("method") or r.get("Method")) != "best"}
    else:
        res["output"] = portable(text.strip()[-800:])
    return res


# --------------------------------------------------------------------------- 5. the report


def summarise(scores: dict, steps: list[int], train: dict) -> list[dict]:
    rows = []
    models = [("baseline", 0), ("packaged", 0)] + [(f"ckpt-{n:07d}", n) for n in steps]
    sps = train.get("seconds_per_step_median")
    for label, n in models:
        row = {"model": {"baseline": "bicubic + classical", "packaged": "packaged x4 (default)"}.get(label, "fine-tuned"),
               "steps": n}
        for ds in ("icbm", "spm"):
            base, mine, pack = scores[ds]["baseline"], scores[ds].get(label), scores[ds]["packaged"]
            if mine is None:
                continue
            names = list(base)
            p = np.array([mine[k]["psnr"] for k in names])
            s = np.array([mine[k]["ssim"] for k in names])
            bp = np.array([base[k]["psnr"] for k in names])
            bs = np.array([base[k]["ssim"] for k in names])
            pp = np.array([pack[k]["psnr"] for k in names])
            row[ds] = {"images": len(names), "psnr": p.mean(), "ssim": s.mean(), "gain_db": (p - bp).mean(),
                       "gain_db_min": (p - bp).min(), "gain_db_max": (p - bp).max(), "d_ssim": (s - bs).mean(),
                       "vs_packaged_db": (p - pp).mean(), "beats_packaged": int((p > pp).sum())}
        if n:
            el = train["elapsed_s"].get(str(n))
            row["train_minutes"] = None if el is None else el / 60
            row["wall_minutes"] = sum(train["phases"][str(m)]["wall_s"] for m in steps if m <= n) / 60
            row["seconds_per_step"] = sps
        rows.append(row)
    return [json.loads(json.dumps(r, default=float)) for r in rows]


def write_report(out: Path, rows: list[dict], meta: dict) -> None:
    def cell(r, ds):
        d = r.get(ds)
        if d is None:
            return "– | – | –"
        return (f"{d['psnr']:.2f} | {d['gain_db']:+.2f} ({d['gain_db_min']:+.2f} / {d['gain_db_max']:+.2f}) | "
                f"{d['ssim']:.4f} ({d['d_ssim']:+.4f})")

    tr = meta["train"]
    dev = meta["device"]
    ds = meta["dataset"]
    lines = [
        "# Fine-tuning the packaged x4 model on new-domain data (`tfsdeploy train --init default`)", "",
        f"- {meta['date']}, {dev['cpu']} ({dev['logical_cpus']} logical cores), **1 torch thread**, torch "
        f"{dev['torch']}, tfsdeploy {dev['tfsdeploy']}",
        f"- data: {ds['source']}; {ds['counts']['train']} training slices (z {', '.join(map(str, ds['slices']['train']))}), "
        f"{ds['counts']['test']} test slices (z {', '.join(map(str, ds['slices']['test']))}), at least "
        f"{ds['min_gap_slices']} mm from any training slice; SPECT-like / PET-like alternately; gt = "
        f"{ds['ground_truth']}",
        f"- fine-tune: from the packaged x4 member, with what it inherits: batch {tr['batch_size']}, crop "
        f"{tr['crop']}, lr {tr['lr']:g}, EMA {tr['ema_decay']} (warm-up), augmentation on; scored with the "
        f"EMA weights",
        f"- scoring: ×{SCALE}, bicubic degradation (as in training), DDIM-{DDIM_STEPS} seed 0 (the bundle's "
        f"recommendation), 256×256; **gain** = PSNR minus the baseline's (bicubic up + classical fusion), "
        f"mean (min / max over slices); SSIM (Δ vs baseline); **vs packaged** = mean PSNR change against the "
        f"packaged model, and on how many slices the fine-tuned model is better",
        f"- SPM: {meta['spm_images']} slices of the SPM test split (the packaged model's own domain)", "",
        "| model | steps | ICBM PSNR dB | ICBM gain dB | ICBM SSIM (Δ) | ICBM vs packaged dB | SPM PSNR dB | "
        "SPM gain dB | SPM SSIM (Δ) | SPM vs packaged dB | s / step | train min (wall min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = []
        for d in ("icbm", "spm"):
            x = r.get(d)
            vs.append("" if x is None or r["model"] != "fine-tuned" else
                      f"{x['vs_packaged_db']:+.2f} ({x['beats_packaged']}/{x['images']})")
        t = ""
        if r["steps"]:
            t = f"{r['train_minutes']:.1f} ({r['wall_minutes']:.1f})"
        sps = f"{r['seconds_per_step']:.2f}" if r.get("seconds_per_step") else ""
        lines.append(f"| {r['model']} | {r['steps'] or ''} | {cell(r, 'icbm').split(' | ')[0]} | "
                     f"{cell(r, 'icbm').split(' | ')[1]} | {cell(r, 'icbm').split(' | ')[2]} | {vs[0]} | "
                     f"{cell(r, 'spm').split(' | ')[0]} | {cell(r, 'spm').split(' | ')[1]} | "
                     f"{cell(r, 'spm').split(' | ')[2]} | {vs[1]} | {sps} | {t} |")
    lines += ["", f"Seconds per step: median over log.jsonl windows of batch / img/s "
                  f"({tr['log_every']} steps each; training only, no start-up); windows: "
                  + ", ".join(f"{s}: {v:.2f}" for s, v in tr["seconds_per_step_windows"]) + ".",
              "Train min = the checkpoint's elapsed_s (optimisation steps only); wall min = the CLI commands "
              "to that step count, start-up and data loading included.", ""]
    cc = meta.get("cli_check")
    if cc:
        if "rows" in cc:
            lines += ["Cross-check with the CLI (`tfsdeploy evaluate`, ICBM test split, all slices): " + "; ".join(
                f"{k}: {v['psnr']:.2f} dB / SSIM {v['ssim']:.4f}" for k, v in cc["rows"].items()) + ".", ""]
        else:
            lines += [f"Cross-check with `tfsdeploy evaluate` failed (rc {cc['rc']}): `{cc['output'][-300:]}`", ""]
    if tr.get("issues"):
        lines += ["## Problems met", ""]
        for i in tr["issues"]:
            lines += [f"- `{i['command']}` (rc {i['rc']}):", "", "```", i["output"], "```", ""]
    if meta.get("notes"):
        lines += ["## Findings", "", meta["notes"], ""]
    lines += ["## Rerun", "", f"`{meta['command']}`", "",
              "(needs the nilearn wheel: `pip download nilearn --no-deps -d /tmp/nl`; every phase is cached "
              "under --work, so delete it for a fresh run)", ""]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "finetune.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "finetune.json") as tmp:
        tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=float))


# --------------------------------------------------------------------------- main


@dataclass
class Plan:
    """What the study runs, from the command line."""

    args: argparse.Namespace
    work: Path
    out: Path
    steps: list[int]
    wheel: Path


def plan(argv: list[str] | None = None) -> Plan:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/ft")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "finetune"))
    ap.add_argument("--steps", default="100,250,500", help="checkpoints scored (the run goes to the largest)")
    ap.add_argument("--images", type=int, default=8, help="test slices per dataset")
    ap.add_argument("--gap", type=int, default=12, help="slices between the test range and training slices")
    ap.add_argument("--span", type=int, default=44, help="slices of training range on each side of the test range")
    ap.add_argument("--train-args", default="", help="extra `tfsdeploy train` options, e.g. '--lr 5e-5'")
    ap.add_argument("--wheel", default="")
    ap.add_argument("--notes", default="", help="a file whose text becomes the report's Findings section")
    args = ap.parse_args(argv)
    return Plan(args, Path(args.work), Path(args.out), sorted(int(s) for s in args.steps.split(",")),
                require_wheel(find_wheel(args.wheel)))


def run(p: Plan) -> dict:
    """Phases 1 to 4, each cached under the work folder: the dataset's summary, the training record,
    the scores per test set and model, and the CLI cross-check."""
    args, work, steps = p.args, p.work, p.steps
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    data = work / "icbm"
    summary = build_icbm(data, p.wheel, args.images, args.gap, args.span)
    print(f"[{(time.perf_counter() - t0) / 60:4.1f} min] dataset {data}: {summary['counts']}", flush=True)

    train = fine_tune(work, data, steps, args.train_args.split())
    print(f"[{(time.perf_counter() - t0) / 60:4.1f} min] fine-tuned; {train['seconds_per_step_median']:.2f} s/step",
          flush=True)

    score_file = work / "scores.json"
    scores = json.loads(score_file.read_text()) if score_file.is_file() else {}
    models: dict[str, str | None] = {"baseline": None, "packaged": "default"}
    models.update({f"ckpt-{n:07d}": str(work / "ckpts" / f"ckpt-{n:07d}") for n in steps})
    for ds in ("icbm", "spm"):
        cases = held_out_cases(ds, data, args.images)
        for label, model in models.items():
            if label in scores.get(ds, {}):
                continue
            scores.setdefault(ds, {})[label] = score_model(model, cases)
            score_file.write_text(json.dumps(scores, indent=1))
            m = np.mean([v["psnr"] for v in scores[ds][label].values()])
            print(f"[{(time.perf_counter() - t0) / 60:4.1f} min] {ds} {label}: {m:.2f} dB", flush=True)

    check_file = work / "cli_check.json"
    if not check_file.is_file():
        check_file.write_text(json.dumps(cli_cross_check(work, data, work / "ckpts" / f"ckpt-{max(steps):07d}"),
                                         indent=2))
    return {"summary": summary, "train": train, "scores": scores, "cli_check": json.loads(check_file.read_text())}


def report(p: Plan, done: dict, argv: list[str] | None) -> None:
    args, train = p.args, done["train"]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_info(1), "dataset": done["summary"],
            "train": {k: v for k, v in train.items() if k != "losses"}, "losses": train["losses"],
            "spm_images": args.images, "scale": SCALE, "ddim_steps": DDIM_STEPS, "cli_check": done["cli_check"],
            "scores": done["scores"], "notes": Path(args.notes).read_text().strip() if args.notes else "",
            "command": "python benchmarks/finetune_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    write_report(p.out, summarise(done["scores"], p.steps, train), meta)
    print(f"wrote {p.out / 'finetune.md'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = plan(argv)
    torch.set_num_threads(1)
    report(p, run(p), argv)


if __name__ == "__main__":
    main()
