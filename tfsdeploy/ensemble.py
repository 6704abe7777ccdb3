"""Geometric self-ensemble: fuse the 8 flips and quarter turns of a condition and average them.

Bicubic upsampling, back-projection and the classical fusion all commute with flips and quarter
turns of a square image, so transforming the upsampled condition is the same as transforming the
low-resolution inputs. Each view is fused, mapped back, and the 8 images are averaged in [0, 1]
before any 8-bit rounding. It costs 8 network calls per step instead of 1 (`fuse --ensemble`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tfsdeploy.errors import UserError

VIEWS = 8


def dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 flips and quarter turns of [..., H, W] (k = 0: as is; 4..7: the same
    turns, then flipped left-right), or with `inverse` the transform that undoes it."""
    if inverse:
        x = x.flip(-1) if k >= 4 else x
        return torch.rot90(x, -(k % 4), dims=(-2, -1))
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def fuse_views(fuse: Callable[[torch.Tensor, list[int] | None], torch.Tensor], cond01: torch.Tensor,
               seeds: Sequence[int] | None, per_call: int) -> torch.Tensor:
    """The mean over the 8 views of `fuse(view, seeds)`, each mapped back: condition [B,5,S,S] ->
    [B,3,S,S]. Views go to `fuse` together, as many whole views per call as `per_call` slices allow,
    each slice with its own seed in every view."""
    b, _, h, w = cond01.shape
    if h != w:
        raise UserError(f"the geometric ensemble needs a square condition, got {h}x{w}")
    group = max(1, per_call // b)
    total = None
    for first in range(0, VIEWS, group):
        ks = range(first, min(VIEWS, first + group))
        batch = torch.cat([dihedral(cond01, k) for k in ks])
        out = fuse(batch, None if seeds is None else [s for _ in ks for s in seeds])
        for k, part in zip(ks, out.float().split(b)):
            back = dihedral(part, k, inverse=True)
            total = back if total is None else total + back
    return total / VIEWS
