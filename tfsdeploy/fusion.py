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


def fuse_two_laplacian(a: torch.Tensor, b: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """Laplacian-pyramid fusion (Burt & Adelson): largest-magnitude detail per level, mean of the top."""
    def down(x):
        return F.avg_pool2d(box_filter(x, 1), 2, ceil_mode=True)

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    ga, gb = [a], [b]
    for _ in range(levels):
        if min(ga[-1].shape[-2:]) < 4:
            break
        ga.append(down(ga[-1]))
        gb.append(down(gb[-1]))
    out = (ga[-1] + gb[-1]) / 2
    for i in range(len(ga) - 2, -1, -1):
        la, lb = ga[i] - up(ga[i + 1], ga[i]), gb[i] - up(gb[i + 1], gb[i])
        out = up(out, ga[i]) + torch.where(la.abs() >= lb.abs(), la, lb)
    return out.clamp(0, 1)


def guided_filter(p: torch.Tensor, guide: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter (grey guide), [B,1,H,W]."""
    mean_i, mean_p = box_filter(guide, radius), box_filter(p, radius)
    cov = box_filter(guide * p, radius) - mean_i * mean_p
    var = box_filter(guide * guide, radius) - mean_i * mean_i
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    return box_filter(a, radius) * guide + box_filter(b, radius)


def fuse_two_guided(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Guided-filtering fusion (Li, Kang and Hu 2013): Laplacian saliency picks a weight map, refined
    by guided filters, coarse for the base layers and fine for the detail layers."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3).to(a)
    base_a, base_b = box_filter(a, 15), box_filter(b, 15)
    sal_a = box_filter(F.conv2d(F.pad(a, (1, 1, 1, 1), mode="replicate"), lap).abs(), 5)
    sal_b = box_filter(F.conv2d(F.pad(b, (1, 1, 1, 1), mode="replicate"), lap).abs(), 5)
    pa = (sal_a >= sal_b).to(a.dtype)
    wb_a, wb_b = guided_filter(pa, a, 45, 0.3), guided_filter(1 - pa, b, 45, 0.3)
    wd_a, wd_b = guided_filter(pa, a, 7, 1e-6), guided_filter(1 - pa, b, 7, 1e-6)
    wb_a, wb_b, wd_a, wd_b = (w.clamp(min=0) for w in (wb_a, wb_b, wd_a, wd_b))
    base = (wb_a * base_a + wb_b * base_b) / (wb_a + wb_b + 1e-8)
    detail = (wd_a * (a - base_a) + wd_b * (b - base_b)) / (wd_a + wd_b + 1e-8)
    return (base + detail).clamp(0, 1)


# The two-image rules the tri-modal structure can use; "classical" makes the ground truth.
METHODS = {"classical": fuse_two, "laplacian": fuse_two_laplacian, "guided": fuse_two_guided}


def fuse_trimodal(mr1: torch.Tensor, mr2: torch.Tensor, func_rgb: torch.Tensor,
                  cfg: FusionConfig = FusionConfig(), method: str = "classical") -> torch.Tensor:
    """mr1 [B,1,H,W], mr2 [B,1,H,W], func_rgb [B,3,H,W], all in [0, 1] -> fused RGB [B,3,H,W]."""
    rule = METHODS[method]
    two = (lambda x, y: rule(x, y, cfg)) if method == "classical" else rule
    grey = two(mr1, mr2)
    ycc = rgb_to_ycbcr(func_rgb)
    y = two(grey, ycc[:, :1])
    return ycbcr_to_rgb(torch.cat([y, ycc[:, 1:]], dim=1)).clamp(0, 1)


def fuse_condition(cond01: torch.Tensor, method: str = "classical") -> torch.Tensor:
    """Fuse a stacked condition [B,5,H,W] in [0, 1] (T1, T2, functional RGB)."""
    return fuse_trimodal(cond01[:, 0:1], cond01[:, 1:2], cond01[:, 2:5], method=method)
