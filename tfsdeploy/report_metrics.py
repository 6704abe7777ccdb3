"""The metrics of the reports (`evaluate`), defined once.

Definitions (the project's, since the paper does not pin them down). Reference metrics compare a
fused RGB image P with the ground truth T, both float on the 0-255 scale, per image:
  MSE  = mean over pixels and channels of (P - T)^2
  RMSE = sqrt(MSE)
  MAE  = mean of |P - T|
  PSNR = 10 log10(255^2 / MSE)
  SSIM = Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, range 255,
         averaged over channels
  VIF  = pixel-domain multi-scale VIF (Sheikh & Bovik 2006), 4 scales, sigma_n^2 = 2, T as the
         reference, averaged over channels
  LPIPS = AlexNet "lin" v0.1 on inputs in [-1, 1] (see tfsdeploy.lpips), when weights are on disk
No-reference:
  AG   = mean over pixels of sqrt((Gx^2 + Gy^2) / 2) with forward differences, averaged over channels
Source-based fusion metrics, on the luma (BT.601 Y, 0-255) of the output and the sources:
  EN   = Shannon entropy (bits) of the 256-bin histogram
  SD   = standard deviation
  SF   = sqrt(RF^2 + CF^2), RF / CF the RMS of horizontal / vertical first differences
  Qabf = Xydeas & Petrovic edge preservation, generalised to N sources: the sum over sources of
         Q^{sF} * g_s divided by the sum of g_s (g_s the Sobel magnitude of source s)
"""

from __future__ import annotations

import numpy as np
import torch

from tfsdeploy.metrics import ssim

REFERENCE_METRICS = ("AG", "MSE", "VIF", "SSIM", "PSNR", "LPIPS", "MAE", "RMSE")  # Table 1 order
HIGHER_IS_BETTER = {"AG": True, "MSE": False, "VIF": True, "SSIM": True, "PSNR": True, "LPIPS": False,
                    "MAE": False, "RMSE": False, "EN": True, "SD": True, "SF": True, "Qabf": True}
SOURCE_METRICS = ("EN", "SD", "SF", "Qabf")


def _to255(img) -> np.ndarray:
    """[C,H,W] torch or numpy in [0, 1] -> float64 [C,H,W] on 0-255."""
    a = img.detach().cpu().double().numpy() if hasattr(img, "detach") else np.asarray(img, dtype=np.float64)
    return a * 255.0


def _luma(a255: np.ndarray) -> np.ndarray:
    if a255.shape[0] == 1:
        return a255[0]
    return 0.299 * a255[0] + 0.587 * a255[1] + 0.114 * a255[2]


def average_gradient(img) -> float:
    a = _to255(img)
    gx = a[:, :-1, 1:] - a[:, :-1, :-1]
    gy = a[:, 1:, :-1] - a[:, :-1, :-1]
    return float(np.sqrt((gx * gx + gy * gy) / 2).mean())


def _gauss2d(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    from scipy.signal import correlate2d

    return correlate2d(x, w, mode="valid")


def vif_pixel(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0) -> float:
    """Pixel-domain VIF of one channel (2-D arrays on 0-255), reference first."""
    eps = 1e-10
    num = den = 0.0
    ref, dist = ref.astype(np.float64), dist.astype(np.float64)
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        w = _gauss2d(n, n / 5.0)
        if scale > 1:
            ref = _filter_valid(ref, w)[::2, ::2]
            dist = _filter_valid(dist, w)[::2, ::2]
        mu1, mu2 = _filter_valid(ref, w), _filter_valid(dist, w)
        s1 = np.maximum(_filter_valid(ref * ref, w) - mu1 * mu1, 0)
        s2 = np.maximum(_filter_valid(dist * dist, w) - mu2 * mu2, 0)
        s12 = _filter_valid(ref * dist, w) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g[low1], sv[low1], s1[low1] = 0, s2[low1], 0
        low2 = s2 < eps
        g[low2], sv[low2] = 0, 0
        neg = g < 0
        sv[neg], g[neg] = s2[neg], 0
        sv = np.maximum(sv, eps)
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    return float(num / den) if den > 0 else 1.0


def vif(pred, target) -> float:
    p, t = _to255(pred), _to255(target)
    return float(np.mean([vif_pixel(t[c], p[c]) for c in range(t.shape[0])]))


def reference_metrics(pred, target, lpips_fn=None) -> dict[str, float]:
    """Table-1 metrics of one fused image [3,H,W] in [0, 1] against its ground truth."""
    p, t = _to255(pred), _to255(target)
    mse_v = float(np.mean((p - t) ** 2))
    out = {
        "AG": average_gradient(pred),
        "MSE": mse_v,
        "VIF": vif(pred, target),
        "SSIM": float(ssim(torch.from_numpy(p)[None], torch.from_numpy(t)[None], data_range=255.0)[0]),
        "PSNR": float(10 * np.log10(255.0**2 / mse_v)) if mse_v > 0 else float("inf"),
        "LPIPS": float(lpips_fn(pred, target)) if lpips_fn is not None else float("nan"),
        "MAE": float(np.mean(np.abs(p - t))),
        "RMSE": float(np.sqrt(mse_v)),
    }
    return out


def entropy(img) -> float:
    y = np.clip(np.round(_luma(_to255(img))), 0, 255).astype(np.int64)
    hist = np.bincount(y.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def std_dev(img) -> float:
    return float(_luma(_to255(img)).std())


def spatial_frequency(img) -> float:
    y = _luma(_to255(img))
    rf = np.sqrt(np.mean((y[:, 1:] - y[:, :-1]) ** 2))
    cf = np.sqrt(np.mean((y[1:, :] - y[:-1, :]) ** 2))
    return float(np.sqrt(rf * rf + cf * cf))


def _sobel(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import convolve

    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    sx = convolve(y, kx, mode="nearest")
    sy = convolve(y, kx.T, mode="nearest")
    g = np.sqrt(sx * sx + sy * sy)
    alpha = np.arctan(sy / np.where(np.abs(sx) < 1e-12, 1e-12, sx))
    return g, alpha


def qabf(fused, sources) -> float:
    """Edge-preservation Q^{AB/F} of the fused image's luma against N source images."""
    gf, af = _sobel(_luma(_to255(fused)))
    num = den = 0.0
    for src in sources:
        gs, as_ = _sobel(_luma(_to255(src)))
        with np.errstate(divide="ignore", invalid="ignore"):
            G = np.where(gs > gf, gf / gs, np.where(gs == gf, 1.0, gs / gf))
        G = np.nan_to_num(G, nan=0.0)
        A = 1 - np.abs(as_ - af) / (np.pi / 2)
        qg = 0.9994 / (1 + np.exp(-15 * (G - 0.5)))
        qa = 0.9879 / (1 + np.exp(-22 * (A - 0.8)))
        num += float((qg * qa * gs).sum())
        den += float(gs.sum())
    return num / den if den > 0 else 0.0


def source_metrics(fused, sources) -> dict[str, float]:
    return {"EN": entropy(fused), "SD": std_dev(fused), "SF": spatial_frequency(fused), "Qabf": qabf(fused, sources)}
