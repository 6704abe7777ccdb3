"""Data sources, the dataset builder and the training batches.

Two sources share one on-disk layout, so everything downstream reads one thing:

    ROOT/{train,val,test}/{t1,t2,func,gt}/NAME.png      (a built dataset)
    ROOT/{t1,t2,func}[/gt]/NAME.png                      (a user's folder: one split)

* `build_spm_dataset` cuts registered axial slices from the SPM templates inside the installed
  `spm-runtime` package (read with zipfile + nibabel; the package is never imported), colour-maps
  the functional image, makes the ground truth with the classical tri-modal fusion, and writes
  PNGs split by contiguous z-blocks.
* `FolderSource` reads a folder, matching files across modalities by name, never by order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from tfsdeploy.artifacts import cache_dir
from tfsdeploy.config import COMBOS
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition, fuse_trimodal
from tfsdeploy.imaging import IMAGE_SUFFIXES, apply_colormap, atomic_dir, degrade, pad_to_square, read_image, resize, write_png
from tfsdeploy.pipeline import as_triplet

SPLITS = ("train", "val", "test")
MODALITY_DIRS = ("t1", "t2", "func")

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


def default_data_dir() -> Path:
    return cache_dir() / "spm-dataset"


# --------------------------------------------------------------------------- SPM source


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


def normalise_volume(v: np.ndarray) -> np.ndarray:
    """Robust [0, 1]: 0 maps to the 1st percentile, 1 to the 99.5th percentile of the foreground."""
    lo = float(np.percentile(v, 1.0))
    fg = v[v > lo]
    hi = float(np.percentile(fg, 99.5)) if fg.size else lo + 1.0
    return np.clip((v - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


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


# --------------------------------------------------------------------------- folder source


@dataclass
class Sample:
    name: str
    hr: torch.Tensor  # [8,H,W] uint8: t1, t2, func RGB, gt RGB
    gt_made: bool  # the ground truth was made here by the classical fusion


def _index(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in files:
                raise UserError(f"{folder}: two files are named {p.stem} ({files[p.stem].name}, {p.name})")
            files[p.stem] = p
    return files


class FolderSource:
    """A folder ROOT/{t1,t2,func}[/gt]/NAME.* matched by NAME. Missing gt is made classically."""

    def __init__(self, root: str | Path, size: int = 256):
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such dataset folder")
        missing = [d for d in MODALITY_DIRS if not (self.root / d).is_dir()]
        if missing:
            raise UserError(f"{self.root}: missing modality folder(s) {', '.join(missing)} "
                            f"(expected {'/'.join(MODALITY_DIRS)}[/gt]/NAME.png)")
        idx = {d: _index(self.root / d) for d in MODALITY_DIRS}
        self.gt_index = _index(self.root / "gt") if (self.root / "gt").is_dir() else {}
        names = set(idx["t1"])
        for d in MODALITY_DIRS[1:]:
            names &= set(idx[d])
        unmatched = sorted(set().union(*idx.values()) - names)
        if unmatched:
            raise UserError(f"{self.root}: {len(unmatched)} name(s) are not present in all of "
                            f"{', '.join(MODALITY_DIRS)} (e.g. {unmatched[0]})")
        if not names:
            raise UserError(f"{self.root}: no images found")
        self.names = sorted(names)
        self.index = idx
        self.gt_made = not all(n in self.gt_index for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def load(self) -> list[Sample]:
        out = []
        for n in self.names:
            trip = as_triplet(*(read_image(self.index[d][n]) for d in MODALITY_DIRS),
                              names=[str(self.index[d][n]) for d in MODALITY_DIRS])
            src = standardise(trip.stacked(), self.size)
            if n in self.gt_index:
                gt = read_image(self.gt_index[n])
                gt = gt.expand(3, -1, -1) if gt.shape[0] == 1 else gt
                if gt.shape[-2:] != trip.t1.shape[-2:]:
                    raise UserError(f"{self.gt_index[n]}: size differs from its sources")
                gt = standardise(gt, self.size)
                made = False
            else:
                gt = fuse_condition(src[None])[0]
                made = True
            hr = torch.cat([src, gt]).mul(255).round().to(torch.uint8)
            out.append(Sample(n, hr, made))
        return out


def standardise(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C,H,W] -> [C,size,size]: zero-pad to a centred square, bicubic to `size`."""
    sq, _ = pad_to_square(img)
    return resize(sq[None], (size, size))[0]


def open_split(root: str | Path, split: str, size: int = 256) -> FolderSource:
    """ROOT/split if the dataset is split, otherwise ROOT itself (a user's folder is one split)."""
    root = Path(root)
    if (root / split).is_dir():
        return FolderSource(root / split, size)
    if any((root / d).is_dir() for d in MODALITY_DIRS):
        return FolderSource(root, size)  # says which modality folder is missing, if any
    raise UserError(f"{root}: neither a split dataset (with {split}/) nor a {'/'.join(MODALITY_DIRS)} folder")


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    cond01: torch.Tensor  # [B,5,h,w] upsampled low-resolution sources in [0, 1]
    base01: torch.Tensor  # [B,3,h,w] upsample-then-fuse baseline
    gt01: torch.Tensor  # [B,3,h,w]
    scales: list[int]


def augment(hr: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Joint augmentation of sources and targets [B,8,H,W]: flip, small rotation and zoom, and one
    brightness gain for all channels of a sample. The classical fusion is equivariant to a common
    gain, so the target stays consistent with the sources; jittering the inputs alone would teach the
    model to "correct" brightness errors that real inputs do not have."""
    flips, thetas, gains = [], [], []
    for _ in range(hr.shape[0]):
        flips.append(rng.random() < 0.5)
        angle = np.deg2rad(rng.uniform(-10, 10))
        zoom = rng.uniform(0.92, 1.08)
        shift = rng.uniform(-0.04, 0.04, size=2)
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        thetas.append([[cos, -sin, shift[0]], [sin, cos, shift[1]]])
        gains.append(rng.uniform(0.9, 1.1))
    flip = torch.tensor(flips, device=hr.device).view(-1, 1, 1, 1)
    hr = torch.where(flip, hr.flip(-1), hr)
    theta = torch.tensor(thetas, dtype=torch.float32, device=hr.device)
    grid = F.affine_grid(theta, list(hr.shape), align_corners=False)
    hr = F.grid_sample(hr, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (hr * torch.tensor(gains, dtype=torch.float32, device=hr.device).view(-1, 1, 1, 1)).clamp(0, 1)


def stack_samples(samples: list[Sample], device: torch.device | str | None = None) -> torch.Tensor:
    """All samples as one uint8 tensor [N,8,H,W] (on `device`), the form `make_batch` draws from."""
    return torch.stack([s.hr for s in samples]).to(device)


def make_batch(samples: list[Sample] | torch.Tensor, indices: Iterable[int], scales: list[int], crop: int,
               train: bool, rng: np.random.Generator) -> Batch:
    """Degrade, fuse the baseline and crop, batched on the device that holds the samples (a list of
    samples, or their `stack_samples` tensor). All randomness comes from `rng`, so a batch is a pure
    function of its seed: training resumes exactly where it stopped."""
    idx = [int(i) for i in indices]
    if torch.is_tensor(samples):
        hr = samples[torch.tensor(idx, device=samples.device)]
    else:
        hr = stack_samples([samples[i] for i in idx])
    hr = hr.float() / 255.0
    if train:
        hr = augment(hr, rng)
    n, size = hr.shape[0], hr.shape[-1]
    used = [int(rng.choice(scales)) for _ in range(n)]
    corners = [tuple(int(v) for v in rng.integers(0, size - crop + 1, size=2)) if crop and crop < size else (0, 0)
               for _ in range(n)]
    src, gt = hr[:, :5], hr[:, 5:]
    cond01 = torch.empty_like(src)
    for s in sorted(set(used)):
        pick = torch.tensor([u == s for u in used], device=hr.device)
        cond01[pick] = degrade(src[pick], s)
    base01 = fuse_condition(cond01)
    if crop and crop < size:
        cond01, base01, gt = (torch.stack([t[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(corners)])
                              for t in (cond01, base01, gt))
    return Batch(cond01, base01, gt, used)


def reference_triplet(size: int = 256, combo: str = "t1-t2-spect"):
    """One held-out (test split) SPM triplet at `size`, cut directly from the templates: a real
    image for parity checks and demos that needs no built dataset."""
    from tfsdeploy.pipeline import Triplet

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
