"""Classical tri-modal fusion: makes the training targets and serves as the "upsample, then fuse" baseline.

The structure follows the paper's ground-truth method:
  1. fuse the two MR images in grey;
  2. fuse that with the luma (Y of YCbCr) of the functional colour image;
  3. put the functional image's chroma (Cb, Cr) back.

Each two-image fusion is a two-scale rule: a box filter splits each image into a base layer
and a detail layer. Detail is chosen by activity (the local mean of |detail|: the sharper
source wins, with a softened decision map so that no seams appear); the base is blended by
local energy (the local mean of base^2), so that the brighter structure of each source
survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tfsdeploy.imaging import rgb_to_ycbcr, ycbcr_to_rgb


@dataclass(frozen=True)
class FusionConfig:
    base_radius: int = 7  # box filter radius that defines the base layer (pixels at 256x256)
    activity_radius: int = 3  # window for detail activity and base energy
    decision_radius: int = 2  # smoothing of the detail decision map
    eps: float = 1e-6


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window with reflected borders, [B,C,H,W]."""
    if radius <= 0:
        return x
    k = 2 * radius + 1
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    mode = "reflect" if pad == radius else "replicate"
    xp = F.pad(x, (radius, radius, radius, radius), mode=mode)
    # separable: rows then columns
    xp = F.avg_pool2d(xp, kernel_size=(1, k), stride=1)
    return F.avg_pool2d(xp, kernel_size=(k, 1), stride=1)


def fuse_two(a: torch.Tensor, b: torch.Tensor, cfg: FusionConfig = FusionConfig()) -> torch.Tensor:
    """Two-scale fusion of two grey images [B,1,H,W] in [0, 1]."""
    base_a, base_b = box_filter(a, cfg.base_radius), box_filter(b, cfg.base_radius)
    det_a, det_b = a - base_a, b - base_b

    act_a = box_filter(det_a.abs(), cfg.activity_radius)
    act_b = box_filter(det_b.abs(), cfg.activity_radius)
    choose_a = box_filter((act_a >= act_b).to(a.dtype), cfg.decision_radius)
    detail = choose_a * det_a + (1 - choose_a) * det_b

    en_a = box_filter(base_a * base_a, cfg.activity_radius)
    en_b = box_filter(base_b * base_b, cfg.activity_radius)
    w_a = (en_a + cfg.eps) / (en_a + en_b + 2 * cfg.eps)
    base = w_a * base_a + (1 - w_a) * base_b
    return (base + detail).clamp(0, 1)


def fuse_trimodal(mr1: torch.Tensor, mr2: torch.Tensor, func_rgb: torch.Tensor,
                  cfg: FusionConfig = FusionConfig()) -> torch.Tensor:
    """mr1 [B,1,H,W], mr2 [B,1,H,W], func_rgb [B,3,H,W], all in [0, 1] -> fused RGB [B,3,H,W]."""
    grey = fuse_two(mr1, mr2, cfg)
    ycc = rgb_to_ycbcr(func_rgb)
    y = fuse_two(grey, ycc[:, :1], cfg)
    return ycbcr_to_rgb(torch.cat([y, ycc[:, 1:]], dim=1)).clamp(0, 1)


def fuse_condition(cond01: torch.Tensor) -> torch.Tensor:
    """Fuse a stacked condition [B,5,H,W] in [0, 1] (T1, T2, functional RGB)."""
    return fuse_trimodal(cond01[:, 0:1], cond01[:, 1:2], cond01[:, 2:5])
