"""Parity between a compiled denoiser and torch fp32: one call, and a whole fused image."""

from __future__ import annotations

import math

import torch

from tfsdeploy.config import SampleConfig
from tfsdeploy.diffusion import Denoiser, Diffusion
from tfsdeploy.iospec import IOSpec
from tfsdeploy.metrics import psnr
from tfsdeploy.pipeline import fuse_tensor

# (max relative L2 error of one call, min PSNR in dB between fused images), per precision
LIMITS = {"fp32": (1e-4, 45.0), "fp16": (1e-2, 35.0)}


def relative_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    """||test - ref|| / ||ref||; 0 when both are identical (an untrained model outputs zeros)."""
    diff = float(torch.linalg.vector_norm((test.float() - ref.float()).flatten()))
    norm = float(torch.linalg.vector_norm(ref.float().flatten()))
    if diff == 0.0:
        return 0.0
    return diff / norm if norm > 0 else math.inf


def call_parity(ref: Denoiser, test: Denoiser, spec: IOSpec, seed: int = 0) -> float:
    """Relative L2 error of one call at the spec's optimal shape, over a spread of noise levels."""
    g = torch.Generator().manual_seed(seed)
    s = spec.shapes(max(spec.opt_batch, 1), spec.opt_size, spec.opt_size)
    x_t, cond = torch.randn(s["x_t"], generator=g), torch.rand(s["cond"], generator=g) * 2 - 1
    level = torch.linspace(0.2, 0.9, s["noise_level"][0]) if s["noise_level"][0] > 1 else torch.tensor([0.5])
    return relative_l2(test(x_t, cond, level).cpu(), ref(x_t, cond, level).cpu())


def fused_parity(ref: Denoiser, test: Denoiser, diffusion: Diffusion, cond01: torch.Tensor, steps: int,
                 seed: int = 0) -> float:
    """PSNR (dB, images in [0, 1]) between the fused images of two engines, same seed and DDIM steps."""
    sample = SampleConfig(sampler="ddim", steps=steps, seed=seed)
    a = fuse_tensor(ref, diffusion, cond01, sample).cpu()
    b = fuse_tensor(test, diffusion, cond01, sample).cpu()
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
