"""Reference metrics shared by training (PSF loss), validation and evaluation.

SSIM is Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed
per channel over the 'valid' region (no padding) and averaged. It is differentiable, so the
PSF loss uses the same function as the reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM of [B,C,H,W] tensors, averaged over channels -> [B]."""
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
    b, c, h, w = pred.shape
    if min(h, w) < win_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {win_size}x{win_size} SSIM window")
    pred, target = pred.float(), target.float()
    g = _gaussian_window(win_size, sigma, pred.device, pred.dtype)
    kx = g.view(1, 1, 1, win_size).expand(c, 1, 1, win_size)
    ky = g.view(1, 1, win_size, 1).expand(c, 1, win_size, 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = filt(pred), filt(target)
    sxx = filt(pred * pred) - mu_x * mu_x
    syy = filt(target * target) - mu_y * mu_y
    sxy = filt(pred * target) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error -> [B]."""
    return ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB -> [B]. Identical images give +inf."""
    return 10.0 * torch.log10(data_range**2 / mse(pred, target))


def score_image(img: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM of one image [C,H,W] in [0, 1] against a reference of the same shape."""
    return {"psnr": float(psnr(img[None], ref[None])), "ssim": float(ssim(img[None], ref[None]))}
