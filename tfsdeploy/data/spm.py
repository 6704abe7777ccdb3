"""The SPM templates as a data source: registered T1 / T2 / PD / SPECT / PET volumes read from the
installed `spm-runtime` package (with zipfile + nibabel; the package is never imported), cut into
axial slices and split by contiguous z-blocks (`tfsdeploy.data.build` writes them).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tfsdeploy.config import COMBOS
from tfsdeploy.data.folder import SPLITS, standardise
from tfsdeploy.errors import UserError
from tfsdeploy.imaging import apply_colormap, normalise_volume
from tfsdeploy.inputs import Triplet

SourceTriplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # t1 [1,S,S], second MR [1,S,S], func RGB [3,S,S]

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


def read_member(member: str, archive: zipfile.ZipFile | None = None) -> np.ndarray:
    """One NIfTI member of the SPM archive as float32, in the builder's orientation: [z, y (anterior
    up), x] in RAS order, or [c, z, y, x] for a 4-D member."""
    import nibabel as nib

    if archive is None:
        with zipfile.ZipFile(spm_archive()) as z:
            return read_member(member, z)
    img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(archive.read(SPM_PREFIX + member)))
    a = np.asarray(img.get_fdata(dtype=np.float32))  # [x, y, z(, c)]
    a = np.moveaxis(a, [2, 1, 0], [-3, -2, -1]) if a.ndim == 4 else np.transpose(a, (2, 1, 0))
    return np.ascontiguousarray(a[..., ::-1, :])


def load_spm_volumes() -> dict[str, np.ndarray]:
    """The SPM templates as float32 arrays [Z, 109, 91]: axial slices, anterior up, in RAS order."""
    with zipfile.ZipFile(spm_archive()) as z:
        vols = {key: read_member(member, z) for key, member in SPM_MEMBERS.items()}
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


def spm_plan(combos: list[str], size: int) -> tuple[dict[str, Iterator[tuple[str, SourceTriplet, SourceTriplet]]], dict]:
    """The SPM source for the dataset builder: per split, an iterator of (name, sources, the sources
    the ground truth fuses), each a (t1, mr2, func RGB) triple, and what the summary says of it."""
    vols = load_spm_volumes()
    splits = split_by_blocks(brain_slices(vols["grey"]))
    norm = {k: normalise_volume(vols[k]) for k in ("t1", "t2", "pd", "spect", "pet")}

    def cut(zlist: list[int]) -> Iterator[tuple[str, SourceTriplet, SourceTriplet]]:
        for z in zlist:
            t1 = slice_to_image(norm["t1"][z], size)
            for combo in combos:
                _, mr2_key, func_key = combo.split("-")
                mr2 = slice_to_image(norm[mr2_key][z], size)
                src = (t1, mr2, apply_colormap(slice_to_image(norm[func_key][z], size)))
                yield f"{combo}_z{z:03d}", src, src  # the ground truth fuses these very sources

    return {split: cut(zlist) for split, zlist in splits.items()}, {
        "source": f"{SPM_DIST} SPM templates (avg152 T1/T2/PD, OldNorm SPECT/PET), 2 mm MNI grid",
        "slices": splits, "block": BLOCK, "block_pattern": BLOCK_PATTERN,
        "count": {s: len(z) * len(combos) for s, z in splits.items()}}


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
