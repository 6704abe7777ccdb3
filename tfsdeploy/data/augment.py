"""Training-time augmentation of source-and-target stacks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
