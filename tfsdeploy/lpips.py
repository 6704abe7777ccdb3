"""LPIPS (Zhang et al. 2018), AlexNet "lin" v0.1, computed only from weights already on disk.

Two files are needed and neither is downloaded:
  * the AlexNet backbone in torchvision's layout (`alexnet-owt-7be5be79.pth`; default: the torch hub
    cache, `$TORCH_HOME/hub/checkpoints/`), or the same tensors as .safetensors;
  * the LPIPS v0.1 linear heads (`alex.pth`; default: the one inside an installed `lpips` package).
Both are read with `torch.load(weights_only=True)` or safetensors, so loading runs no code.
When either is missing, `load_lpips` says which and why, and the metric is reported unavailable.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tfsdeploy.errors import UserError

BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
# (conv index in torchvision's alexnet.features, out channels, kernel, stride, padding)
_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
          (10, 256, 256, 3, 1, 1))
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, _, o, _, _, _ in _CONVS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        feats = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool before conv2 and conv3, as in AlexNet
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            feats.append(x)
        return feats

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b [B,3,H,W] in [-1, 1] -> distance [B]."""
        total = torch.zeros(a.shape[0], device=a.device)
        for fa, fb, lin in zip(self.features(a), self.features(b), self.lins):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def default_backbone() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
    return Path(home) / "hub" / "checkpoints" / BACKBONE_FILE


def default_lin() -> Path | None:
    import importlib.metadata as md

    try:
        return Path(str(md.distribution("lpips").locate_file("lpips/weights/v0.1/alex.pth")))
    except md.PackageNotFoundError:
        return None


def load_lpips(backbone: str | Path | None = None, lin: str | Path | None = None
               ) -> tuple[Callable[[torch.Tensor, torch.Tensor], float] | None, str]:
    """(metric on [3,H,W] images in [0, 1], "") or (None, the reason it is unavailable). When the
    caller names either weights file, LPIPS was asked for: a reason it cannot run is a UserError."""
    bb = Path(backbone) if backbone else default_backbone()
    ln = Path(lin) if lin else default_lin()
    net, reason = None, ""
    if not bb.is_file():
        reason = f"AlexNet backbone weights not found at {bb} (pass --lpips-backbone)"
    elif ln is None or not ln.is_file():
        reason = f"LPIPS v0.1 alex linear weights not found{f' at {ln}' if lin else ''} (install the lpips " \
                 f"package or pass --lpips-lin)"
    else:
        try:
            sd_bb, sd_ln = _read(bb), _read(ln)
            net = LPIPS()
            with torch.no_grad():
                for (idx, *_), conv in zip(_CONVS, net.convs):
                    conv.weight.copy_(sd_bb[f"features.{idx}.weight"])
                    conv.bias.copy_(sd_bb[f"features.{idx}.bias"])
                for i, lin_conv in enumerate(net.lins):
                    lin_conv.weight.copy_(sd_ln[f"lin{i}.model.1.weight"])
        except (KeyError, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            net, reason = None, f"LPIPS weights unreadable or of the wrong layout ({type(e).__name__}: {e})"
    if net is None:
        if backbone or lin:
            raise UserError(reason)
        return None, reason
    net.eval()

    def metric(pred: torch.Tensor, target: torch.Tensor) -> float:
        return float(net(pred.float()[None] * 2 - 1, target.float()[None] * 2 - 1)[0])

    return metric, ""
