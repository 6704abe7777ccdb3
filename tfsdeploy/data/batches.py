"""Training and evaluation batches: degrade, fuse the baseline and crop, batched on the device
that holds the samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from tfsdeploy.data.folder import Sample
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import degrade


@dataclass
class Batch:
    cond01: torch.Tensor  # [B,5,h,w] upsampled low-resolution sources in [0, 1]
    base01: torch.Tensor  # [B,3,h,w] upsample-then-fuse baseline
    gt01: torch.Tensor  # [B,3,h,w]
    scales: list[int]


def stack_samples(samples: list[Sample], device: torch.device | str | None = None) -> torch.Tensor:
    """All samples as one uint8 tensor [N,8,H,W] (on `device`), the form `make_batch` draws from."""
    return torch.stack([s.hr for s in samples]).to(device)


def make_batch(samples: list[Sample] | torch.Tensor, indices: Iterable[int], scales: list[int], crop: int,
               rng: np.random.Generator,
               augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None) -> Batch:
    """Degrade, fuse the baseline and crop, batched on the device that holds the samples (a list of
    samples, or their `stack_samples` tensor). All randomness comes from `rng`, so a batch is a pure
    function of its seed: training resumes exactly where it stopped."""
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


