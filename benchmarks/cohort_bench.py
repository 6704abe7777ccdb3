"""What a cohort costs beside its slices, and what two Ray workers gain over one process, on one machine.

    python benchmarks/cohort_bench.py                       # ~6 minutes on a 2-core CPU
    python benchmarks/cohort_bench.py --participants 8 --slices 6 --size 256 --no-ray

The data: a synthetic BIDS cohort cut from the SPM templates (tfsdeploy.data.cohort), only its plain
participants (a T1, a T2 and a 3-D PET on a 2 mm grid of its own each), --slices axial slices each.

Timed end to end, as a user runs them (one process each, model load included), the packaged model:
  cohort      `tfsdeploy cohort BIDS OUT participant`: every participant found by pybids, its PET
              resampled onto its T1, fused, written with sidecar and montage, then the report;
  one fuse    `tfsdeploy fuse` of the same slices as one volume: the participants' T1s, T2s and PETs
              (each PET resampled onto its T1 first) stacked along z;
  ratio       cohort slices/s / one fuse slices/s (target: at least 0.9);
  Ray         `cohort --ray` on a local Ray cluster (`ray start --head`, 127.0.0.1) with 2 workers of
              --threads 1 each, against the local cohort (one process, every core): the ratio as it is.

Writes benchmarks/reports/cohort/cohort.{md,json} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from tfsdeploy.data.cohort import SPECIAL, write_synthetic_bids  # noqa: E402


def plain_labels(n: int) -> list[str]:
    """The labels of the first n participants that have none of the special cases."""
    out, k = [], 1
    while len(out) < n:
        if k not in SPECIAL:
            out.append(f"{k:02d}")
        k += 1
    return out


def one_volume(bids: Path, labels: list[str], folder: Path) -> list[Path]:
    """The participants' T1, T2 and PET (resampled onto its T1) stacked along z into three volumes."""
    from nibabel.processing import resample_from_to

    stacks: dict[str, list[np.ndarray]] = {"t1": [], "t2": [], "pet": []}
    affine = None
    for label in labels:
        t1 = nib.load(bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")
        t2 = nib.load(bids / f"sub-{label}" / "anat" / f"sub-{label}_T2w.nii.gz")
        pet = resample_from_to(nib.load(bids / f"sub-{label}" / "pet" / f"sub-{label}_pet.nii.gz"), t1, order=1)
        affine = t1.affine if affine is None else affine
        for key, img in (("t1", t1), ("t2", t2), ("pet", pet)):
            stacks[key].append(img.get_fdata(dtype=np.float32))
    paths = []
    for key, parts in stacks.items():
        paths.append(folder / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(np.concatenate(parts, axis=2), affine), paths[-1])
    return paths


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--slices", type=int, default=3, help="axial slices per participant")
    ap.add_argument("--size", type=int, default=128, help="output side (0 = the model's 256)")
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                    help="also time 2 Ray workers against one local process")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "cohort")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cli = [sys.executable, "-m", "tfsdeploy"]
    common = ["--scale", "4", "--size", str(args.size), "--engine", "torch", "--no-progress"]
    labels = plain_labels(args.participants)
    n_slices = len(labels) * args.slices
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        tmp = Path(tmp)
        bids = write_synthetic_bids(tmp / "bids", participants=int(labels[-1]), slices=args.slices)
        vols = one_volume(bids, labels, tmp)
        select = ["--participant-label", *labels]
        rows["cohort"] = timed(cli + ["cohort", str(bids), str(tmp / "out"), "participant", *select, *common], env)
        rows["one fuse"] = timed(cli + ["fuse", *map(str, vols), "--out", str(tmp / "one.nii.gz"), *common], env)
        if args.ray:
            ray_bin = str(Path(sys.executable).with_name("ray"))
            port = free_port()
            start = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                     "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                     "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
            subprocess.run(start, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
            try:
                rows["ray, 2 workers"] = timed(cli + ["cohort", str(bids), str(tmp / "ray"), "participant", *select,
                                                      *common, "--ray", f"127.0.0.1:{port}", "--workers", "2",
                                                      "--threads", "1"], env)
            finally:
                subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
            shutil.rmtree(tmp / "ray", ignore_errors=True)

    rate = {k: n_slices / v for k, v in rows.items()}
    result = {"participants": len(labels), "slices_per_participant": args.slices, "slices": n_slices,
              "size": args.size, "seconds": rows, "slices_per_s": rate,
              "cohort_vs_one_fuse": rate["cohort"] / rate["one fuse"],
              "ray2_vs_local": rate["ray, 2 workers"] / rate["cohort"] if "ray, 2 workers" in rate else None,
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    lines = [f"# Cohort throughput ({result['date']}, {os.cpu_count()} CPU cores, packaged model, x4, "
             f"output {args.size or 256} px)", "",
             f"{len(labels)} participants x {args.slices} slices = {n_slices} slices, each command one process "
             "(model load included).", "",
             "| run | seconds | slices/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {rate[k]:.3f} |" for k, v in rows.items()]
    lines += ["", f"cohort / one fuse: **{result['cohort_vs_one_fuse']:.2f}** (target >= 0.9)"]
    if result["ray2_vs_local"] is not None:
        lines += [f"2 Ray workers / one local process: **{result['ray2_vs_local']:.2f}**"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cohort.md").write_text("\n".join(lines) + "\n")
    (args.out / "cohort.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
