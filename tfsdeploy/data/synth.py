"""Synthetic patient-like slices: a source of training triplets with the texture, skull, noise and
lesions that the smooth SPM templates lack.

Each slice starts from anatomy, not from intensities: the 1.5 mm Neuromorphometrics label map
(137 brain structures) and the tissue probability map (TPM: grey, white, CSF, bone, soft tissue,
air) that ship in the same `spm-runtime` archive as the templates. For every slice and every
tri-modal combination a seeded random draw then makes:

- the geometry at full resolution: each structure's outline upsampled smoothly to the image grid
  and bent by a small random elastic warp, so edges are sharp at 256 px instead of 2 mm blocky;
- MR contrasts: T1-, T2- and PD-like tissue means with a jitter per structure and per image,
  skull (dark cortical bone around brighter marrow) and scalp;
- what scanners add: fine tissue texture, partial-volume blur, a smooth bias field and Rician noise;
  the ground truth fuses the sources before their noise is added: noise cannot be recovered from a
  low-resolution input, and a model taught to draw it only loses fidelity;
- lesions: up to two soft-edged blobs, dark on T1, bright on T2/PD, hypo- or hyper-perfused;
- the functional image: perfusion following grey matter with a smooth random field, blurred to a
  SPECT- (σ 4-6 px) or PET-like (σ 2-3.5 px) resolution, then colour-mapped like the templates.

The ground truth is made the same way as for every other source, the classical tri-modal fusion of
the high-resolution sources (tfsdeploy.fusion), of the noise-free sources.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tfsdeploy.data.spm import SourceTriplet
from tfsdeploy.imaging import apply_colormap, pad_to_square

SYNTH_MEMBERS = {"labels": "tpm/labels_Neuromorphometrics.nii", "tpm": "tpm/TPM.nii"}
# TPM classes, in the file's order
GM, WM, CSF, BONE, SOFT, AIR = range(6)

# Tissue means of each MR contrast, [grey, white, CSF, bone, soft tissue, air] (air stays 0).
CONTRASTS = {
    "t1": (0.50, 0.78, 0.14, 0.08, 0.85, 0.0),
    "t2": (0.62, 0.42, 1.00, 0.06, 0.45, 0.0),
    "pd": (0.78, 0.64, 0.90, 0.08, 0.70, 0.0),
}
MARROW = {"t1": 0.7, "t2": 0.35, "pd": 0.55}  # the skull's inner (diploe) layer, against its bone mean
FUNC_SIGMA = {"spect": (4.0, 6.0), "pet": (2.0, 3.5)}  # perfusion blur at 256 px, sampled uniformly


@dataclass(frozen=True)
class SynthAnatomy:
    """The volumes every synthetic slice is drawn from, on one 1.5 mm grid [z, y (anterior up), x]."""

    labels: np.ndarray  # uint8 structure labels, 0 outside the brain
    tpm: np.ndarray  # float32 [6, z, y, x] tissue probabilities
    tissue_of: dict[int, int]  # structure label -> its dominant TPM class (GM, WM or CSF)


def load_anatomy(read: Callable[[str], np.ndarray]) -> SynthAnatomy:
    """`read(member)` returns a canonical volume as [z, y, x] or [c, z, y, x] (spm.read_member)."""
    labels = read(SYNTH_MEMBERS["labels"]).round().astype(np.uint8)
    tpm = read(SYNTH_MEMBERS["tpm"]).astype(np.float32)
    tissue_of = {}
    for lab in np.unique(labels):
        if lab == 0:
            continue
        inside = labels == lab
        tissue_of[int(lab)] = int(np.argmax([tpm[c][inside].mean() for c in (GM, WM, CSF)]))
    return SynthAnatomy(labels, tpm, tissue_of)


def head_slices(anatomy: SynthAnatomy, min_fraction: float = 0.04) -> list[int]:
    """Axial slices where labelled brain covers at least `min_fraction` of the slice."""
    frac = (anatomy.labels > 0).mean(axis=(1, 2))
    return [int(z) for z in np.nonzero(frac >= min_fraction)[0]]


def slice_seed(seed: int, z: int, combo: str) -> int:
    return zlib.crc32(f"{seed}/{z}/{combo}".encode())


# --------------------------------------------------------------------------- random fields


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """Zero-mean, unit-peak Gaussian-filtered white noise [1,1,H,W]."""
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))[None, None]
    x = gaussian_blur(x, sigma)
    x = x - x.mean()
    return x / x.abs().max().clamp_min(1e-6)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] with reflected borders (σ in pixels; σ ≤ 0 is a no-op)."""
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma + 0.5))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def elastic_grid(rng: np.random.Generator, size: int, amplitude_px: float, sigma_px: float) -> torch.Tensor:
    """A sampling grid [1,H,W,2] for grid_sample: identity plus a smooth random displacement."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([xx, yy], -1)[None]
    disp = torch.cat([smooth_noise(rng, (size, size), sigma_px) for _ in range(2)], 1)  # [1,2,H,W]
    return grid + disp.permute(0, 2, 3, 1) * (2 * amplitude_px / size)


# --------------------------------------------------------------------------- one slice


def geometry(anatomy: SynthAnatomy, z: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[int]]:
    """The slice's regions at full resolution: an index map [size,size] into the returned region
    list. Regions are the brain structures, then the TPM's CSF, bone, soft tissue and air outside
    them. Outlines are upsampled from soft one-hot maps (not nearest-neighbour blocks) and warped."""
    lab = anatomy.labels[z].astype(np.int64)
    outside = np.argmax(anatomy.tpm[[CSF, BONE, SOFT, AIR], z], axis=0)
    seg = np.where(lab > 0, lab, 1000 + outside)  # 1000+k: the k-th outside class
    regions = [int(r) for r in np.unique(seg)]
    lut = np.zeros(seg.max() + 1, dtype=np.int64)
    lut[regions] = np.arange(len(regions))
    onehot = F.one_hot(torch.from_numpy(lut[seg]), len(regions)).permute(2, 0, 1).float()
    onehot, _ = pad_to_square(onehot)
    air = regions.index(1000 + 3) if 1000 + 3 in regions else None
    if air is not None:  # padding is air
        pad = onehot.sum(0) == 0
        onehot[air][pad] = 1.0
    up = F.interpolate(onehot[None], size=(size, size), mode="bilinear", align_corners=False)
    up = gaussian_blur(up, 0.6 * size / onehot.shape[-1])
    for amplitude, sigma in ((rng.uniform(1.0, 4.0), size / 10), (rng.uniform(0.5, 2.5), size / 40)):
        grid = elastic_grid(rng, size, amplitude_px=amplitude, sigma_px=sigma)  # coarse, then fine bends
        up = F.grid_sample(up, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return up[0].argmax(0), regions


def region_tissue(anatomy: SynthAnatomy, regions: list[int]) -> np.ndarray:
    """The TPM class of each region."""
    out_classes = (CSF, BONE, SOFT, AIR)
    return np.array([out_classes[r - 1000] if r >= 1000 else anatomy.tissue_of[r] for r in regions])


def mr_image(index: torch.Tensor, tissue: np.ndarray, contrast: str, rng: np.random.Generator,
             lesions: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One MR contrast [1,1,H,W] in [0, 1] from the region map: as acquired (with noise), and the
    same image without the noise, on the same intensity scale."""
    size = index.shape[-1]
    means = np.array(CONTRASTS[contrast], dtype=np.float32)[tissue]
    means = means * rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, size=means.shape).astype(np.float32)
    means[tissue == AIR] = 0.0
    img = torch.from_numpy(means)[index][None, None]
    bone = torch.from_numpy(tissue == BONE)[index][None, None].float()
    if bone.any():  # marrow: the middle of the skull is brighter than its cortical edges
        inner = (gaussian_blur(bone, size / 128) > 0.85).float()
        img = img + inner * (MARROW[contrast] - CONTRASTS[contrast][BONE]) * rng.uniform(0.6, 1.0)
    for mask, strength in lesions:
        gain = 1 - 0.4 * strength if contrast == "t1" else 1 + 0.6 * strength
        img = img * (1 + (gain - 1) * mask)
    head = (torch.from_numpy(tissue != AIR)[index][None, None]).float()
    texture = sum(smooth_noise(rng, (size, size), sigma) * rng.uniform(0.01, 0.04) for sigma in (0.7, 1.5, 3.0, 6.0))
    img = img * (1 + texture * head)
    img = gaussian_blur(img, rng.uniform(0.3, 1.5))  # partial volume
    img = img * torch.exp(smooth_noise(rng, (size, size), size / 4) * rng.uniform(0.0, 0.25))  # bias field
    sd = rng.uniform(0.003, 0.03)
    n1 = torch.from_numpy(rng.standard_normal((size, size)).astype(np.float32))
    n2 = torch.from_numpy(rng.standard_normal((size, size)).astype(np.float32))
    noisy = torch.sqrt((img + sd * n1) ** 2 + (sd * n2) ** 2)  # Rician magnitude noise
    return same_unit(noisy, img)


def func_image(index: torch.Tensor, tissue: np.ndarray, kind: str, rng: np.random.Generator,
               lesions: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A perfusion-like functional image [1,1,H,W] in [0, 1] (grey; colour-mapped by the caller), with
    and without its noise."""
    size = index.shape[-1]
    weight = np.select([tissue == GM, tissue == WM, tissue == CSF], [1.0, 0.3, 0.05], 0.0).astype(np.float32)
    weight = weight * rng.uniform(0.8, 1.2, size=weight.shape).astype(np.float32)
    up = torch.from_numpy(weight)[index][None, None]
    up = up * (1 + smooth_noise(rng, (size, size), size / 12) * rng.uniform(0.2, 0.5))
    for mask, strength in lesions:
        up = up * (1 + mask * (strength if rng.random() < 0.3 else -0.7 * strength))
    up = gaussian_blur(up.clamp_min(0), rng.uniform(*FUNC_SIGMA[kind]))
    up = up.clamp_min(0)
    noisy = up + 0.01 * rng.uniform(0, 1) * torch.from_numpy(rng.standard_normal((size, size)).astype(np.float32))
    return same_unit(noisy.clamp_min(0), up)


def lesion_masks(index: torch.Tensor, tissue: np.ndarray, rng: np.random.Generator) -> list[tuple[torch.Tensor, float]]:
    """Up to two soft-edged elliptical lesions inside the brain, with a strength in (0.4, 1)."""
    size = index.shape[-1]
    brain = torch.from_numpy(np.isin(tissue, (GM, WM)))[index]
    where = torch.nonzero(brain)
    out = []
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        if len(where) == 0:
            break
        cy, cx = where[int(rng.integers(len(where)))].tolist()
        ry, rx = rng.uniform(0.015, 0.07, size=2) * size
        ang = rng.uniform(0, np.pi)
        yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        mask = ((u / rx) ** 2 + (v / ry) ** 2 <= 1).float() * brain.float()
        out.append((gaussian_blur(mask[None, None], rng.uniform(0.8, 2.5)), float(rng.uniform(0.4, 1.0))))
    return out


def same_unit(img: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`img` and `others` scaled alike to [0, 1], with the 99.5th percentile of `img`'s non-zero pixels
    at 1 (as the volumes are normalised)."""
    fg = img[img > 1e-3]
    hi = torch.quantile(fg[:: max(1, fg.numel() // 100_000)], 0.995) if fg.numel() else img.max()
    return tuple((x / hi.clamp_min(1e-6)).clamp(0, 1) for x in (img, *others))


def synth_triplet(anatomy: SynthAnatomy, z: int, combo: str, size: int, seed: int
                  ) -> tuple[SourceTriplet, SourceTriplet]:
    """The sources as acquired, (t1 [1,S,S], second MR [1,S,S], functional RGB [3,S,S]) in [0, 1], and
    the same three without their noise (what the ground truth fuses: noise is not detail to restore)
    for one slice and combination; a pure function of its arguments."""
    rng = np.random.default_rng(slice_seed(seed, z, combo))
    _, mr2, func = combo.split("-")
    index, regions = geometry(anatomy, z, size, rng)
    tissue = region_tissue(anatomy, regions)
    lesions = lesion_masks(index, tissue, rng)
    t1 = mr_image(index, tissue, "t1", rng, lesions)
    m2 = mr_image(index, tissue, mr2, rng, lesions)
    f = [apply_colormap(x[0]) for x in func_image(index, tissue, func, rng, lesions)]
    return (t1[0][0], m2[0][0], f[0]), (t1[1][0], m2[1][0], f[1])


def synth_plan(combos: list[str], size: int, seed: int = 0
               ) -> tuple[dict[str, Iterator[tuple[str, SourceTriplet, SourceTriplet]]], dict]:
    """The synthetic source for the dataset builder, split by contiguous z-blocks like the SPM source."""
    from tfsdeploy.data.spm import BLOCK, BLOCK_PATTERN, read_member, split_by_blocks

    anatomy = load_anatomy(read_member)
    splits = split_by_blocks(head_slices(anatomy))

    def make(zs: list[int]):
        for z in zs:
            for combo in combos:
                yield f"synth-{combo}_z{z:03d}", *synth_triplet(anatomy, z, combo, size, seed)

    return {split: make(zs) for split, zs in splits.items()}, {
        "source": "synthetic slices from the SPM Neuromorphometrics labels and tissue probability map, "
                  "1.5 mm MNI grid (tfsdeploy.data.synth)",
        "seed": seed, "slices": splits, "block": BLOCK, "block_pattern": BLOCK_PATTERN,
        "count": {s: len(z) * len(combos) for s, z in splits.items()}}
