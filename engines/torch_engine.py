"""The PyTorch engine: an eval-mode TFSDiffUNet behind the Denoiser interface."""

from __future__ import annotations

import torch

from tfsdeploy.model import TFSDiffUNet


class TorchDenoiser:
    name = "torch"

    def __init__(self, model: TFSDiffUNet, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()

    @torch.inference_mode()
    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        out = self.model(x_t.to(self.device, self.dtype), cond.to(self.device, self.dtype),
                         noise_level.to(self.device, torch.float32))
        return out.float()
