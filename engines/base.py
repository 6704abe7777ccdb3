"""The Denoiser interface every engine implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    name: str

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """x_t [B,3,H,W], cond [B,5,H,W], noise_level [B] -> prediction [B,3,H,W] (float32)."""
        ...
