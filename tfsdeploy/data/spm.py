"""The SPM templates as a data source: registered T1 / T2 / PD / SPECT / PET volumes read from the
installed `spm-runtime` package (with zipfile + nibabel; the package is never imported), cut into
axial slices, split by contiguous z-blocks and written as a dataset in the one on-disk layout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from tfsdeploy.config import COMBOS
from tfsdeploy.data.folder import MODALITY_DIRS, SPLITS, standardise
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_dir, check_folder_target
from tfsdeploy.fusion import fuse_trimodal
from tfsdeploy.imaging import apply_colormap, normalise_volume, write_png
from tfsdeploy.inputs import Triplet
from tfsdeploy.paths import cache_dir

SPM_DIST = "spm-runtime"
SPM_ARCHIVE = "spm_runtime/_spm/_spm.ctf"
SPM_PREFIX = "fsroot/_spm/cleaned/spm/"
SPM_MEMBERS = {
    "t1": "canonical/avg152T1.nii",
    "t2": "canonical/avg152T2.nii",
    "pd": "canonical/avg152PD.nii",
    "spect": "toolbox/OldNorm/SPECT.nii",
    "pet": "toolbox/OldNorm/PET.nii",
    "grey": "toolbox/OldSeg/grey.nii",  # only to find the slices that hold brain
}

# Contiguous z-blocks of BLOCK slices are assigned to splits in this repeating pattern
# (T = train, V = val, E = test). The first slice of a block whose split differs from the
# previous block's is dropped, so no two splits hold neighbouring, nearly identical slices.
BLOCK = 7
BLOCK_PATTERN = "TTETV"
_SPLIT_OF = {"T": "train", "V": "val", "E": "test"}


def spm_archive() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(SPM_DIST)
    except md.PackageNotFoundError:
        raise UserError(f"the '{SPM_DIST}' package is not installed: pip install {SPM_DIST}") from None
    path = Path(str(dist.locate_file(SPM_ARCHIVE)))
    if not path.is_file():
        raise UserError(f"{SPM_DIST} is installed but {SPM_ARCHIVE} is missing from it")
    return path


def load_spm_volumes() -> dict[str, np.ndarray]:
    """The SPM templates as float32 arrays [Z, 109, 91]: axial slices, anterior up, in RAS order."""
    import zipfile

    import nibabel as nib

    vols = {}
    with zipfile.ZipFile(spm_archive()) as z:
        for key, member in SPM_MEMBERS.items():
            img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(z.read(SPM_PREFIX + member)))
            a = np.asarray(img.get_fdata(dtype=np.float32))  # [x, y, z]
            vols[key] = np.ascontiguousarray(np.transpose(a, (2, 1, 0))[:, ::-1, :])  # [z, y (ant. up), x]
    shapes = {k: v.shape for k, v in vols.items()}
    if len(set(shapes.values())) != 1:
        raise UserError(f"SPM templates are not on one grid: {shapes}")
    return vols


def brain_slices(grey: np.ndarray, min_fraction: float = 0.02) -> list[int]:
    """Axial slices where grey matter (probability > 0.2) covers at least `min_fraction` of the slice."""
    frac = (grey > 0.2).mean(axis=(1, 2))
    return [int(z) for z in np.nonzero(frac >= min_fraction)[0]]


def split_by_blocks(zs: list[int], block: int = BLOCK, pattern: str = BLOCK_PATTERN) -> dict[str, list[int]]:
    """Assign contiguous z-blocks to splits, with one guard slice at each change of split."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    prev = None
    for b in range(0, len(zs), block):
        split = _SPLIT_OF[pattern[(b // block) % len(pattern)]]
        members = zs[b:b + block]
        if prev is not None and split != prev:
            members = members[1:]
        out[split].extend(members)
        prev = split
    return out


def slice_to_image(sl: np.ndarray, size: int) -> torch.Tensor:
    """2-D slice -> [1,size,size]: zero-pad to a centred square, bicubic to `size`."""
    return standardise(torch.from_numpy(np.ascontiguousarray(sl))[None], size)


def build_spm_dataset(out: str | Path, size: int = 256, combos: Iterable[str] = COMBOS, force: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the SPM tri-modal dataset to `out` and return its summary (also written as summary.json).

    The whole dataset is written under a temporary name and renamed at the end, so an
    interrupted build never leaves a half dataset that looks complete.
    """
    out = Path(out)
    check_folder_target(out)
    combos = list(combos)
    bad = [c for c in combos if c not in COMBOS]
    if bad:
        raise UserError(f"unknown combination(s) {bad}; choose from {', '.join(COMBOS)}")
    if (out / "summary.json").is_file() and not force:
        return json.loads((out / "summary.json").read_text())
    if out.exists() and any(out.iterdir()) and not (out / "summary.json").is_file() and not force:
        raise UserError(f"{out} exists and is not a dataset built by tfsdeploy; pick another --out or use --force")

    vols = load_spm_volumes()
    zs = brain_slices(vols["grey"])
    splits = split_by_blocks(zs)
    norm = {k: normalise_volume(vols[k]) for k in ("t1", "t2", "pd", "spect", "pet")}

    with atomic_dir(out) as tmp:
        counts: dict[str, int] = {}
        total = sum(len(v) for v in splits.values()) * len(combos)
        done = 0
        for split, zlist in splits.items():
            for d in (*MODALITY_DIRS, "gt"):
                (tmp / split / d).mkdir(parents=True)
            for z in zlist:
                t1 = slice_to_image(norm["t1"][z], size)
                for combo in combos:
                    _, mr2_key, func_key = combo.split("-")
                    mr2 = slice_to_image(norm[mr2_key][z], size)
                    func = apply_colormap(slice_to_image(norm[func_key][z], size))
                    gt = fuse_trimodal(t1[None], mr2[None], func[None])[0]
                    name = f"{combo}_z{z:03d}.png"
                    for d, img in zip((*MODALITY_DIRS, "gt"), (t1, mr2, func, gt)):
                        write_png(tmp / split / d / name, img)
                    counts[split] = counts.get(split, 0) + 1
                    done += 1
                    if progress:
                        progress(done, total)
        summary = {
            "source": f"{SPM_DIST} SPM templates (avg152 T1/T2/PD, OldNorm SPECT/PET), 2 mm MNI grid",
            "size": size, "combos": combos, "slices": {s: v for s, v in splits.items()},
            "counts": counts, "block": BLOCK, "block_pattern": BLOCK_PATTERN,
            "ground_truth": "classical tri-modal fusion of the high-resolution sources (tfsdeploy.fusion)",
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def default_data_dir() -> Path:
    return cache_dir() / "spm-dataset"


def ensure_dataset(root: str | Path | None = None, log: Callable[[str], None] = print,
                   timeout_s: float = 600.0) -> Path:
    """The dataset to read: `root` as given, or the built SPM dataset, built on first use. Under
    torchrun only rank 0 builds it; the other ranks wait for its summary."""
    if root is not None:
        return Path(root)
    root = default_data_dir()
    summary = root / "summary.json"
    if not summary.is_file() and int(os.environ.get("RANK", "0")) == 0:
        log(f"building the SPM dataset in {root} (first use)")
        build_spm_dataset(root)
    t0 = time.time()
    while not summary.is_file():
        if time.time() - t0 > timeout_s:
            raise UserError(f"timed out waiting for {summary}")
        time.sleep(0.5)
    return root


def reference_triplet(size: int = 256, combo: str = "t1-t2-spect"):
    """One held-out (test split) SPM triplet at `size`, cut directly from the templates: a real
    image for parity checks and demos that needs no built dataset."""
    if combo not in COMBOS:
        raise UserError(f"unknown combination {combo!r}; choose from {', '.join(COMBOS)}")
    vols = load_spm_volumes()
    test = split_by_blocks(brain_slices(vols["grey"]))["test"]
    z = test[len(test) // 2]
    _, mr2, func = combo.split("-")
    t1 = slice_to_image(normalise_volume(vols["t1"])[z], size)
    t2 = slice_to_image(normalise_volume(vols[mr2])[z], size)
    f = apply_colormap(slice_to_image(normalise_volume(vols[func])[z], size))
    return Triplet(t1, t2, f)
