"""The PyTorch engine: an eval-mode TFSDiffUNet behind the Denoiser interface."""

from __future__ import annotations

import torch

from tfsdeploy.model import TFSDiffUNet


class TorchDenoiser:
    name = "torch"

    def __init__(self, model: TFSDiffUNet, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.compiled = compile
        self._run = torch.compile(self.model) if compile else self.model  # compiles on the first call

    def describe(self) -> str:
        kind = "compiled" if self.compiled else "eager"
        return f"torch {kind} {str(self.dtype).replace('torch.', '')} ({self.device.type})"

    @torch.inference_mode()
    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        out = self._run(x_t.to(self.device, self.dtype), cond.to(self.device, self.dtype),
                         noise_level.to(self.device, torch.float32))
        return out.float()
