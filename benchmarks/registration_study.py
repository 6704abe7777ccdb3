"""How close does `fuse --register` come to a known rigid motion? Measured on the SPM templates.

    python benchmarks/registration_study.py                 # 34 registrations, ~3 minutes on a 2-core CPU
    python benchmarks/registration_study.py --only spect    # the cases whose name holds "spect"

The volumes come from the SPM templates (tfsdeploy.data.spm), which are registered to each other:
  t1     the template's 2 mm 91x109x91 grid, the fixed volume;
  t2     the same grid;
  spect, pet   resampled (scipy, trilinear) onto a 4 mm 64^3 grid of their own, as a scanner gives them.
Each moving volume is moved by a known rigid motion M by its header alone (its affine becomes M @ affine,
no resampling), so the truth is exact: the registration, which maps a fixed point to the moving
volume's point, should be M itself. The motions run from the identity to 15 degrees and 25 mm, about
the centre of the T1's brain box. Then come `--grid func` cases: the SPECT is the reference grid
and the T1 and T2 are moved, as open_scan registers them (tfsdeploy.volumes.register_volumes),
and last, for comparison, the same motions with the T1 fitted to the SPECT directly, as `--grid func`
once did.

For each case: the rotation error (the angle of M^-1 @ R, R the registration's matrix), the translation
error (how far the brain box's centre lands from where it should) and the mean displacement over the
brain (|M^-1 R p - p| over the voxels where the grey-matter template exceeds 0.2), and the same
displacement had the volume been left where its header puts it. The report goes to
benchmarks/reports/registration/ (registration.md, registration.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
from nibabel.processing import resample_from_to  # noqa: E402

from tests.test_dicom_grids import rigid  # noqa: E402  (one rigid-motion helper, the tests')
from tfsdeploy.data.spm import SPM_MEMBERS, SPM_PREFIX, spm_archive  # noqa: E402
from tfsdeploy.errors import UserError  # noqa: E402
from tfsdeploy.fileio import atomic_path  # noqa: E402
from tfsdeploy.volumes import (RegisterConfig, brain_box, register_rigid, register_volumes,  # noqa: E402
                               world_extent_of_box)

OUT = ROOT / "benchmarks" / "reports" / "registration"
# (rotation about R, A, S in degrees; shift R, A, S in mm)
MOTIONS = [
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((2.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (5.0, 0.0, 0.0)),
    ((4.0, -3.0, 6.0), (5.0, -4.0, 3.0)),
    ((-8.0, 5.0, 0.0), (0.0, 10.0, -6.0)),
    ((0.0, 10.0, -10.0), (-12.0, 0.0, 8.0)),
    ((15.0, 0.0, 0.0), (0.0, -15.0, 10.0)),
    ((-10.0, -10.0, 12.0), (15.0, 15.0, -10.0)),
]
GRID_FUNC_MOTIONS = MOTIONS[3:]


def load() -> dict[str, nib.Nifti1Image]:
    with zipfile.ZipFile(spm_archive()) as z:
        spm = {}
        for k in ("t1", "t2", "spect", "pet", "grey"):
            img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(z.read(SPM_PREFIX + SPM_MEMBERS[k])))
            spm[k] = nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine)
    center = np.array([0.0, -18.0, 18.0])  # about the middle of the MNI head
    grid4 = np.diag([4.0, 4.0, 4.0, 1.0])
    grid4[:3, 3] = center - 4.0 * 63 / 2
    for k in ("spect", "pet"):
        out = resample_from_to(spm[k], ((64,) * 3, grid4), order=1)
        spm[k] = nib.Nifti1Image(out.get_fdata(dtype=np.float32), grid4)
    return spm


def moved(img, motion: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(img.dataobj), motion @ img.affine)


def errors(truth: np.ndarray, found: np.ndarray, center: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """Rotation (deg) and translation (mm at `center`) error of `found` against `truth`, and the mean
    displacement (mm) over the points `brain` [3, N]."""
    residual = np.linalg.inv(truth) @ found
    angle = math.degrees(math.acos(np.clip((np.trace(residual[:3, :3]) - 1) / 2, -1, 1)))
    shift = float(np.linalg.norm(residual[:3, :3] @ center + residual[:3, 3] - center))
    moved_brain = residual[:3, :3] @ brain + residual[:3, 3:4]
    return {"rotation_deg": angle, "translation_mm": shift,
            "mean_mm": float(np.linalg.norm(moved_brain - brain, axis=0).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only the cases whose name holds this text")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    spm = load()
    box = world_extent_of_box(spm["t1"], brain_box(spm["t1"]))
    center = box.mean(axis=1)
    grey = spm["grey"]
    ijk = np.argwhere(np.asarray(grey.dataobj) > 0.2).T
    brain = grey.affine[:3, :3] @ ijk + grey.affine[:3, 3:4]

    cases = []  # (name, images, reference, moved key, motion)
    for key in ("t2", "spect", "pet"):
        for rot, shift in MOTIONS:
            m = rigid(rot, shift, center)
            cases.append((f"{key} to t1, rot {rot} shift {shift}", {"t1": spm["t1"], key: moved(spm[key], m)},
                          "t1", key, m))
    for rot, shift in GRID_FUNC_MOTIONS:  # --grid func: the T1 and T2 moved, the SPECT the reference grid
        m = rigid(rot, shift, center)
        images = {"t1": moved(spm["t1"], m), "t2": moved(spm["t2"], m), "func": spm["spect"]}
        cases.append((f"t1 to spect (--grid func), rot {rot} shift {shift}", images, "func", "t1", m))
    for rot, shift in GRID_FUNC_MOTIONS:  # for comparison: the T1 fitted to the SPECT directly (no longer done)
        m = rigid(rot, shift, center)
        cases.append((f"t1 fitted to spect directly, rot {rot} shift {shift}",
                      {"func": spm["spect"], "t1": moved(spm["t1"], m)}, "func", "t1", m))
    cases = [c for c in cases if args.only in c[0]]

    config = RegisterConfig()
    rows = []
    for name, images, reference, key, motion in cases:
        t0 = time.perf_counter()
        try:
            if "directly" in name:
                reg = register_rigid(images["func"], images["t1"], config)
                regs, lines = {"t1": reg}, [reg.describe_metric()]
            else:
                regs, lines = register_volumes(images, reference, config=config)
        except UserError as e:
            rows.append({"case": name, "refused": str(e)})
            print(f"{name}: refused: {e}", flush=True)
            continue
        found = regs[key].matrix()
        row = {"case": name, "seconds": time.perf_counter() - t0, "kept_headers": not regs[key].moved,
               **errors(motion, found, center, brain),
               "before_mm": errors(motion, np.eye(4), center, brain)["mean_mm"], "lines": lines}
        rows.append(row)
        print(f"{name}: rotation {row['rotation_deg']:.2f} deg, translation {row['translation_mm']:.2f} mm, "
              f"mean {row['mean_mm']:.2f} mm (before {row['before_mm']:.2f} mm), {row['seconds']:.1f} s", flush=True)
    write_report(args.out, rows, config)


def write_report(out: Path, rows: list[dict], config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if "refused" not in r]
    lines = ["# Rigid registration on known motions", "",
             f"{len(rows)} registrations (benchmarks/registration_study.py), RegisterConfig defaults; "
             f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}.", ""]
    groups = {"t2 to t1": "T2 to T1", "spect to t1": "SPECT (4 mm) to T1", "pet to t1": "PET (4 mm) to T1",
              "(--grid func)": "T1 to SPECT (`--grid func`, through the SPECT's fit to the T1)",
              "directly": "T1 fitted to SPECT directly (before: for comparison only)"}
    lines += ["| moving to fixed | cases | rotation error median / worst (deg) | translation error median / worst (mm) "
              "| mean brain displacement median / worst (mm) | header placement alone, median / worst (mm) |",
              "|---|---|---|---|---|---|"]
    for key, title in groups.items():
        sel = [r for r in done if key in r["case"]]
        if not sel:
            continue

        def mw(field: str) -> str:
            v = np.array([r[field] for r in sel])
            return f"{np.median(v):.2f} / {v.max():.2f}"

        lines.append(f"| {title} | {len(sel)} | {mw('rotation_deg')} | {mw('translation_mm')} | {mw('mean_mm')} | "
                     f"{mw('before_mm')} |")
    refused = [r for r in rows if "refused" in r]
    sel = [r for r in done if "directly" not in r["case"]]
    worst = {f: max(r[f] for r in sel) for f in ("rotation_deg", "translation_mm", "mean_mm")} if sel else {}
    if worst:
        lines += ["", f"All {len(sel)} cases as `fuse --register` runs them: worst rotation error "
                  f"{worst['rotation_deg']:.2f} deg, worst translation error {worst['translation_mm']:.2f} mm, worst "
                  f"mean brain displacement {worst['mean_mm']:.2f} mm."]
    lines += ["", f"Refused: {len(refused)}." if refused else "None refused.", "", "## Every case", "",
              "| case | rotation error (deg) | translation error (mm) | mean brain displacement (mm) | before (mm) | s |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['case']} | refused: {r['refused']} | | | | |")
        else:
            kept = " (kept the headers)" if r["kept_headers"] else ""
            lines.append(f"| {r['case']}{kept} | {r['rotation_deg']:.2f} | {r['translation_mm']:.2f} | "
                         f"{r['mean_mm']:.2f} | {r['before_mm']:.2f} | {r['seconds']:.1f} |")
    with atomic_path(out / "registration.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "registration.json") as tmp:
        tmp.write_text(json.dumps({"config": repr(config), "rows": rows}, indent=1))
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    main()
