"""A small synthetic BIDS dataset cut from the SPM templates: a cohort for tests and benchmarks.

Each participant is a block of axial slices of the registered templates (T1, T2 or PD, PET), the
block moved along z from one participant to the next so that no two hold the same anatomy. The MR
volumes lie on the templates' 2 mm grid cropped to the block; the PET lies on a 2 mm grid of its
own (a larger box with another origin), so a cohort has to resample it as scanners make it.

The layout covers the cases a real dataset holds (`write_synthetic_bids` says which participant
has which):

    ROOT/dataset_description.json  ROOT/participants.tsv
    ROOT/sub-01/anat/sub-01_T1w.nii.gz  sub-01_T2w.nii.gz     ROOT/sub-01/pet/sub-01_pet.nii.gz (+ .json)
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from tfsdeploy.data.spm import SPM_MEMBERS, SPM_PREFIX, spm_archive

# What each participant of the synthetic cohort is (by its 1-based index; the rest are plain T1/T2/PET).
SPECIAL = {2: "pd", 3: "no-t2", 4: "two-t1-runs", 5: "pet-4d", 6: "session"}
# The 4-D PET's frames: start and duration in seconds (BIDS FrameTimesStart / FrameDuration).
FRAME_STARTS = [0.0, 60.0, 180.0]
FRAME_DURATIONS = [60.0, 120.0, 300.0]


def write_synthetic_bids(root: str | Path, participants: int = 6, slices: int = 4,
                         side: tuple[int, int] = (40, 48)) -> Path:
    """Write a BIDS dataset of `participants` (at least 6 for every case in SPECIAL) at `root`.

    Each MR volume is side[0] x side[1] voxels in-plane (x, y) and `slices` axial slices of 2 mm. The
    special participants: 02 has a PD instead of a T2, 03 no T2 at all, 04 two T1 runs, 05 a 4-D
    PET of three frames (FRAME_STARTS, FRAME_DURATIONS; the later frames brighter), 06 its scans in
    session `ses-1`. Returns `root`."""
    import nibabel as nib

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "dataset_description.json",
                {"Name": "tfsdeploy synthetic cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    with zipfile.ZipFile(spm_archive()) as z:
        templates = {k: nib.Nifti1Image.from_bytes(z.read(SPM_PREFIX + SPM_MEMBERS[k]))
                     for k in ("t1", "t2", "pd", "pet")}
    nx, ny = side
    rows = ["participant_id"]
    for k in range(1, participants + 1):
        label, case = f"{k:02d}", SPECIAL.get(k, "")
        rows.append(f"sub-{label}")
        folder = root / f"sub-{label}" / ("ses-1" if case == "session" else "")
        stem = f"sub-{label}" + ("_ses-1" if case == "session" else "")
        x0, y0, z0 = (91 - nx) // 2, (109 - ny) // 2 + 4, 30 + 3 * k  # the block moves along z
        mr = (slice(x0, x0 + nx), slice(y0, y0 + ny), slice(z0, z0 + slices))
        pet_box = (slice(x0 - 3, x0 + nx + 2), slice(y0 - 2, y0 + ny + 3), slice(z0 - 2, z0 + slices + 1))
        anat = folder / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        runs = ["_run-1", "_run-2"] if case == "two-t1-runs" else [""]
        for i, run in enumerate(runs):
            _save_crop(templates["t1"], mr, anat / f"{stem}{run}_T1w.nii.gz", gain=1.0 + 0.1 * i)
        if case != "no-t2":
            mr2, suffix = ("pd", "PDw") if case == "pd" else ("t2", "T2w")
            _save_crop(templates[mr2], mr, anat / f"{stem}_{suffix}.nii.gz")
        pet = folder / "pet"
        pet.mkdir(parents=True, exist_ok=True)
        frames = len(FRAME_STARTS) if case == "pet-4d" else 1
        _save_crop(templates["pet"], pet_box, pet / f"{stem}_pet.nii.gz", frames=frames)
        sidecar = {"Units": "Bq/mL", "TracerName": "FDG", "ModeOfAdministration": "bolus"}
        if frames > 1:
            sidecar.update(FrameTimesStart=FRAME_STARTS, FrameDuration=FRAME_DURATIONS)
        else:
            sidecar.update(FrameTimesStart=[0.0], FrameDuration=[600.0])
        _write_json(pet / f"{stem}_pet.json", sidecar)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def _save_crop(template, box: tuple[slice, slice, slice], path: Path, gain: float = 1.0, frames: int = 1) -> None:
    """Save template[box] with its own affine (the template's, moved to the box's corner), float32;
    with `frames`, a 4-D series whose frame f is the crop scaled by (1 + f)."""
    import nibabel as nib

    data = np.asarray(template.get_fdata(dtype=np.float32))[box] * gain
    if frames > 1:
        data = np.stack([data * (1 + f) for f in range(frames)], axis=-1)
    corner = np.array([box[0].start, box[1].start, box[2].start, 1.0])
    affine = template.affine.copy()
    affine[:, 3] = template.affine @ corner
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


__all__ = ["write_synthetic_bids", "SPECIAL", "FRAME_STARTS", "FRAME_DURATIONS"]
