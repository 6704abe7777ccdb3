"""Training and evaluation batches: degrade, fuse the baseline and crop, batched on the device
that holds the samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from tfsdeploy.data.folder import Sample
from tfsdeploy.data.synth import gaussian_blur
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import quantise_uint8
from tfsdeploy.inputs import degrade_as_seen, upsample


@dataclass
class Batch:
    cond01: torch.Tensor  # [B,5,h,w] upsampled low-resolution sources in [0, 1]
    base01: torch.Tensor  # [B,3,h,w] upsample-then-fuse baseline
    gt01: torch.Tensor  # [B,3,h,w]
    scales: list[int]


def stack_samples(samples: list[Sample], device: torch.device | str | None = None) -> torch.Tensor:
    """All samples as one uint8 tensor [N,8,H,W] (on `device`), the form `make_batch` draws from."""
    return torch.stack([s.hr for s in samples]).to(device)


# Context kept around a crop: the bicubic down-and-up degradation at x8 reaches 32 px and the
# classical tri-modal fusion's chained box filters (two two-image fusions in a row) 24 px, so a crop
# degraded inside a window of DEGRADE_MARGIN px and fused inside one of FUSE_MARGIN px comes out as
# if the whole image had been processed. Windows start on GRID, so their low-resolution pixels are
# the whole image's at every scale.
DEGRADE_MARGIN = 64
FUSE_MARGIN = 32
GRID = 8


def make_batch(samples: list[Sample] | torch.Tensor, indices: Iterable[int], scales: list[int], crop: int,
               rng: np.random.Generator,
               augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
               backproject: float = 0.0, degradation: str = "bicubic") -> Batch:
    """Degrade, fuse the baseline and crop, batched on the device that holds the samples (a list of
    samples, or their `stack_samples` tensor). All randomness comes from `rng`, so a batch is a pure
    function of its seed: training resumes exactly where it stopped. With `backproject`, the
    upsampled inputs are back-projected at that strength (`inputs.degrade_as_seen`) before the
    baseline is fused from them, as a member with that strength is fed. `degradation` "varied"
    makes the low-resolution inputs with `degrade_varied` instead of the paper's bicubic down.

    A crop is degraded and fused inside windows around it rather than over the whole image: the same
    pixels at a fraction of the cost."""
    idx = [int(i) for i in indices]
    if torch.is_tensor(samples):
        hr = samples[torch.tensor(idx, device=samples.device)]
    else:
        hr = stack_samples([samples[i] for i in idx])
    hr = hr.float() / 255.0
    if augment is not None:
        hr = augment(hr, rng)
    n, size = hr.shape[0], hr.shape[-1]
    used = [int(rng.choice(scales)) for _ in range(n)]
    cropping = bool(crop) and crop < size
    corners = [tuple(int(v) for v in rng.integers(0, size - crop + 1, size=2)) if cropping else (0, 0)
               for _ in range(n)]
    if cropping and size % GRID == 0 and hr.shape[-2] == size:
        # each round of back-projection reaches as far again as the degradation itself
        hr, corners = _windows(hr, corners, crop, DEGRADE_MARGIN * (1 + math.ceil(backproject)), GRID)
    src, gt = hr[:, :5], hr[:, 5:]
    cond01 = torch.empty_like(src)
    for s in sorted(set(used)):
        pick = torch.tensor([u == s for u in used], device=hr.device)
        cond01[pick] = (degrade_varied(src[pick], s, backproject, rng) if degradation == "varied"
                        else degrade_as_seen(src[pick], s, backproject))
    if cropping:
        fused_at, inner = _windows(cond01, corners, crop, FUSE_MARGIN, 1)
        base01 = _cut(fuse_condition(fused_at), inner, crop)
        cond01, gt = _cut(cond01, corners, crop), _cut(gt, corners, crop)
    else:
        base01 = fuse_condition(cond01)
    return Batch(cond01, base01, gt, used)


# `degrade_varied`: the share of inputs made the paper's way, and the ranges the others are drawn from
VARIED_PLAIN = 0.5
VARIED_BLUR = (0.0, 0.6)  # Gaussian blur sigma before shrinking, in multiples of the scale (high-resolution px)
VARIED_NOISE = (0.0, 0.02)  # Gaussian noise sigma on the low-resolution inputs, in [0, 1] units
VARIED_KERNELS = ("bicubic", "bilinear")  # how the blurred image is shrunk (antialiased)


def degrade_varied(hr: torch.Tensor, scale: int, backproject: float, rng: np.random.Generator) -> torch.Tensor:
    """High-resolution sources [B,C,n,n] in [0, 1] -> conditions degraded more variously than the
    paper's bicubic down, for a model that must not mistake blur or noise for detail. Each input, on
    its own draw from `rng`: with probability VARIED_PLAIN the paper's degradation; otherwise a
    Gaussian blur (sigma drawn from VARIED_BLUR times the scale), shrunk by `scale` with a kernel
    drawn from VARIED_KERNELS, Gaussian noise (sigma drawn from VARIED_NOISE, every channel its
    own) and 8-bit rounding, as a scan exported to PNG has. Then upsampled as a member at
    back-projection strength `backproject` is fed (`inputs.upsample`)."""
    n, size = hr.shape[0], hr.shape[-1]
    if size % scale:
        raise ValueError(f"image side {size} is not divisible by scale {scale}")
    draws = [(rng.random() < VARIED_PLAIN, rng.uniform(*VARIED_BLUR) * scale,
              VARIED_KERNELS[int(rng.integers(len(VARIED_KERNELS)))], rng.uniform(*VARIED_NOISE),
              int(rng.integers(2**62))) for _ in range(n)]
    out = torch.empty_like(hr)
    for i, (plain, sigma, kernel, noise, seed) in enumerate(draws):
        one = hr[i:i + 1]
        if plain:
            out[i:i + 1] = degrade_as_seen(one, scale, backproject)
            continue
        lr = F.interpolate(gaussian_blur(one, sigma), size=(size // scale,) * 2, mode=kernel,
                           align_corners=False, antialias=True)
        gen = torch.Generator().manual_seed(seed)
        lr = lr + noise * torch.randn(lr.shape, generator=gen).to(lr)
        lr = quantise_uint8(lr).to(hr.dtype) / 255
        out[i:i + 1] = upsample(lr, size, backproject)
    return out


def _windows(x: torch.Tensor, corners: list[tuple[int, int]], crop: int, margin: int, grid: int
             ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Square windows [B,C,side,side] that hold each crop (top-left at `corners`) with at least
    `margin` px on every side, starting on `grid`, and shifted inside the image at its borders
    (where the image's own border handling then applies, as it does for the whole image). Returns
    the windows and the crops' corners inside them."""
    size = x.shape[-1]
    side = min(-(-(crop + 2 * margin + grid - 1) // grid) * grid, size)
    starts = [tuple(min(max((c - margin) // grid * grid, 0), size - side) for c in yx) for yx in corners]
    windows = torch.stack([x[i, :, y:y + side, x0:x0 + side] for i, (y, x0) in enumerate(starts)])
    return windows, [(y - sy, x0 - sx) for (y, x0), (sy, sx) in zip(corners, starts)]


def _cut(x: torch.Tensor, corners: list[tuple[int, int]], crop: int) -> torch.Tensor:
    return torch.stack([x[i, :, y:y + crop, x0:x0 + crop] for i, (y, x0) in enumerate(corners)])
