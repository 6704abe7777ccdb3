"""Parity between a compiled denoiser and torch fp32: one call, and a whole fused image."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from tfsdeploy.config import SampleConfig
from tfsdeploy.diffusion import Denoiser, Diffusion
from tfsdeploy.imaging import apply_colormap
from tfsdeploy.inputs import Triplet, make_condition
from tfsdeploy.iospec import IOSpec
from tfsdeploy.metrics import psnr

# (max relative L2 error of one call, min PSNR in dB between fused images), per precision
LIMITS = {"fp32": (1e-4, 45.0), "fp16": (1e-2, 35.0)}
PARITY_SCALE = 4


def phantom_triplet(size: int) -> Triplet:
    """A smooth synthetic head slice (skull ring, two hemispheres, ventricles, a perfusion blob),
    deterministic: the parity image when no real slice is handed in."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r = np.sqrt(xx**2 + (yy * 1.15) ** 2)
    brain = (r < 0.38).astype(np.float64)
    ventricles = np.exp(-((np.abs(xx) - 0.06) ** 2 / 0.002 + yy**2 / 0.01))
    t1 = 0.9 * ((r > 0.40) & (r < 0.44)) + brain * (0.55 + 0.2 * np.cos(18 * xx) * np.sin(14 * yy)) - 0.4 * ventricles
    t2 = 0.3 * ((r > 0.40) & (r < 0.44)) + brain * (0.35 + 0.15 * np.sin(16 * r)) + 0.5 * ventricles
    func = brain * (0.3 + 0.6 * np.exp(-((xx + 0.12) ** 2 + (yy - 0.08) ** 2) / 0.01))
    as01 = [torch.from_numpy(np.clip(a, 0, 1)).float()[None] for a in (t1, t2, func)]
    return Triplet(as01[0], as01[1], apply_colormap(as01[2]))


def parity_condition(spec: IOSpec, image: Triplet | None = None) -> torch.Tensor:
    """The x4 condition [1,5,S,S] of the parity check at the spec's optimal size S."""
    return make_condition(image or phantom_triplet(spec.opt_size), PARITY_SCALE, spec.opt_size)[0]


def relative_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    """||test - ref|| / ||ref||; 0 when both are identical (an untrained model outputs zeros)."""
    diff = float(torch.linalg.vector_norm((test.float() - ref.float()).flatten()))
    norm = float(torch.linalg.vector_norm(ref.float().flatten()))
    if diff == 0.0:
        return 0.0
    return diff / norm if norm > 0 else math.inf


def call_parity(ref: Denoiser, test: Denoiser, spec: IOSpec, seed: int = 0) -> float:
    """The worst relative L2 error of single calls at the spec's optimal size, on two inputs: one at
    batch 1 and one at the largest batch up to 4 that the spec takes (a batched kernel may differ
    from the single one), over a spread of noise levels. Not finite when either output is not."""
    worst = 0.0
    for i, batch in enumerate((1, min(spec.max_batch, 4))):
        g = torch.Generator().manual_seed(seed + i)
        s = spec.shapes(max(batch, spec.min_batch), spec.opt_size, spec.opt_size)
        x_t, cond = torch.randn(s["x_t"], generator=g), torch.rand(s["cond"], generator=g) * 2 - 1
        level = torch.linspace(0.2, 0.9, s["noise_level"][0]) if s["noise_level"][0] > 1 else torch.tensor([0.5])
        args = [t.to(test.device) for t in (x_t, cond, level)]
        err = relative_l2(test(*args).cpu(), ref(x_t, cond, level).cpu())
        worst = err if not math.isfinite(err) else max(worst, err)
        if not math.isfinite(worst):
            break
    return worst


def fused_parity(ref: Denoiser, test: Denoiser, diffusion: Diffusion, cond01: torch.Tensor, steps: int,
                 seed: int = 0) -> float:
    """PSNR (dB, images in [0, 1]) between the fused images of two engines, same seed and DDIM steps."""
    sample = SampleConfig(sampler="ddim", steps=steps, seed=seed)
    a = diffusion.fuse(ref, cond01, sample).cpu()
    b = diffusion.fuse(test, cond01, sample).cpu()
    value = float(psnr(b, a).mean())
    return min(value, 200.0)  # identical images give +inf; cap so the report stays valid JSON


def check_limits(precision: str, rel_err: float, fused_psnr: float) -> list[str]:
    max_err, min_psnr = LIMITS[precision]
    problems = []
    if not rel_err <= max_err:
        problems.append(f"relative L2 error {rel_err:.3g} > {max_err:g}")
    if not fused_psnr >= min_psnr:
        problems.append(f"fused-image PSNR {fused_psnr:.2f} dB < {min_psnr:g} dB")
    return problems


def parity_report(precision: str, reference: Denoiser, engine: Denoiser, diffusion: Diffusion, spec: IOSpec,
                  cond01: torch.Tensor, steps: int) -> tuple[dict[str, Any], list[str]]:
    """Both checks of a compiled engine against torch fp32, as the sidecar records them, and the
    limits it misses (empty when it passes)."""
    t0 = time.perf_counter()
    rel = call_parity(reference, engine, spec)
    fused = fused_parity(reference, engine, diffusion, cond01, steps)
    report = {"relative_l2": rel, "fused_psnr_db": fused, "ddim_steps": steps, "scale": PARITY_SCALE,
              "size": int(cond01.shape[-1]), "engine": engine.describe(),
              "limits": dict(zip(("max_relative_l2", "min_fused_psnr_db"), LIMITS[precision])),
              "parity_s": round(time.perf_counter() - t0, 1)}
    return report, check_limits(precision, rel, fused)
