"""What the model is fed: three registered images -> the condition it sees.

The input rule (documented in the README):
  * the three inputs must have the same height and width;
  * a non-square input is zero-padded to a centred square;
  * each input is then brought to size/scale (bicubic, antialiased when shrinking: this is a
    no-op for a true low-resolution input of that size, and the paper's degradation for an input
    that is already high-resolution), and bicubic-upsampled by `scale` to `size`, optionally
    followed by rounds of back-projection (`upsample`), as the model's member recommends, on each
    slice only as far as its inputs look free of noise when the member has a noise gate
    (`noise_ratio`);
  * the output is size x size, with the padding cropped off again, so it keeps the input's
    aspect ratio.
So the scale always divides the output size; `size` defaults to the model's training size (256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tfsdeploy.config import SCALES
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import apply_colormap, degrade, pad_to_square, read_image, resize, to_grey


@dataclass
class Triplet:
    """Sources in [0, 1]: t1 [1,H,W], t2 [1,H,W] (or PD), func [3,H,W] (colour-mapped if it was grey)."""

    t1: torch.Tensor
    t2: torch.Tensor
    func: torch.Tensor

    def stacked(self) -> torch.Tensor:
        return torch.cat([self.t1, self.t2, self.func], dim=0)


def as_triplet(t1: torch.Tensor, t2: torch.Tensor, func: torch.Tensor, names=("T1", "T2", "functional")) -> Triplet:
    """Grey MR images and an RGB functional image; a grey functional image gets the colour map."""
    sizes = {n: tuple(x.shape[-2:]) for n, x in zip(names, (t1, t2, func))}
    if len(set(sizes.values())) != 1:
        desc = ", ".join(f"{n} {h}x{w}" for n, (h, w) in sizes.items())
        raise UserError(f"inputs have different sizes ({desc}); register and resample them to one grid first")
    func_rgb = apply_colormap(func) if func.shape[0] == 1 else func
    return Triplet(to_grey(t1), to_grey(t2), func_rgb)


def read_triplet(t1: str | Path, t2: str | Path, func: str | Path) -> Triplet:
    return as_triplet(read_image(t1), read_image(t2), read_image(func),
                      names=(str(t1), str(t2), str(func)))


def write_triplet(trip: Triplet, folder: str | Path, side: int) -> list[Path]:
    """Write a triplet as t1.png, t2.png and func.png of `side` pixels (bicubic, antialiased): the
    low-resolution inputs a user would hand to `fuse`. Returns the three paths."""
    from tfsdeploy.imaging import write_png

    paths = []
    for name, img in (("t1", trip.t1), ("t2", trip.t2), ("func", trip.func)):
        paths.append(write_png(Path(folder) / f"{name}.png", resize(img[None], (side, side))[0]))
    return paths


def check_fusable(mc, where) -> None:
    """Refuse a model config that does not take 5 condition channels (T1, T2, functional RGB) and give 3."""
    if mc.cond_channels != 5 or mc.out_channels != 3:
        raise UserError(f"{where}: model takes {mc.cond_channels} condition channels and gives "
                        f"{mc.out_channels}; fusing needs 5 (T1, T2, functional RGB) and 3")


def check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise UserError(f"unsupported scale {scale}; choose one of {', '.join(map(str, SCALES))}")


def check_scale_size(scale: int, size: int, multiple: int) -> None:
    check_scale(scale)
    if size % scale:
        raise UserError(f"output size {size} is not divisible by scale {scale}")
    if size % multiple:
        raise UserError(f"output size {size} must be a multiple of {multiple} for this model")


def low_resolution(trip: Triplet, scale: int, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """The sources as the input rule has them before upsampling: padded to a centred square and
    brought to size/scale, [1,5,size/scale,size/scale] in [0, 1]; with the pads and the square's side."""
    square, pads = pad_to_square(trip.stacked())
    return resize(square[None], (size // scale, size // scale)), pads, square.shape[-1]


# The finest band of an image (Immerkaer's 3x3 kernel, whose response is the checkerboard pattern) and
# the same kernel one octave lower (dilated by 2): for white noise both respond alike, while an image
# shrunk from a sharper one has little left at the finest band.
_BAND = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def noise_ratio(lr: torch.Tensor) -> torch.Tensor:
    """Low-resolution sources [B,C,h,w] (T1 and T2 first) -> [B]: the mean absolute response of the
    finest band over that of the band one octave lower, on the two MR inputs. About 1 for white
    noise; 0.14-0.34 for the project's bicubic shrinking of templates, ICBM and synthetic slices at
    x2, 0.45-0.79 for the same slices blurred, shrunk, noisy and 8-bit (MODEL_CARD.md). An input
    too small for the band (under 5 px) or without structure counts as clean (0)."""
    if min(lr.shape[-2:]) < 5:
        return torch.zeros(lr.shape[0], device=lr.device)
    mr = lr[:, :2].float().flatten(0, 1)[:, None]
    k = _BAND.to(mr.device)[None, None]

    def band(dilation: int) -> torch.Tensor:  # [B]: the mean absolute response over T1 and T2
        return F.conv2d(mr, k, dilation=dilation).abs().mean(dim=(1, 2, 3)).view(lr.shape[0], -1).mean(dim=1)

    fine, coarse = band(1), band(2)
    return torch.where(coarse > 1e-6, fine / coarse.clamp(min=1e-6), torch.zeros_like(fine))


def gated_strength(lr: torch.Tensor, backproject: float, gate: tuple[float, float] | None) -> torch.Tensor | float:
    """The back-projection strength each slice of `lr` [B,C,h,w] gets: `backproject` where its
    `noise_ratio` is at most gate[0], none from gate[1] on, linearly in between ([B,1,1,1]); the
    strength itself without a gate."""
    if gate is None or not backproject:
        return backproject
    lo, hi = gate
    share = ((hi - noise_ratio(lr)) / (hi - lo)).clamp(0, 1)
    return (backproject * share).view(-1, 1, 1, 1).to(lr)


def upsample(lr: torch.Tensor, size: int, backproject: float = 0.0,
             gate: tuple[float, float] | None = None) -> torch.Tensor:
    """Low-resolution sources [B,C,h,w] in [0, 1] -> [B,C,size,size]: bicubic, then iterative
    back-projection of strength `backproject` (0: none). A round shrinks the estimate as the inputs
    were shrunk (bicubic, antialiased) and adds a step times the bicubic upsampling of what that
    misses of the inputs, so the estimate moves towards one that shrinks back to the given pixels.
    Strength s runs ceil(s) rounds of step s / ceil(s): 0.5 is one half step, 2 two full rounds.
    With a noise `gate` (lo, hi), each slice runs the same rounds with its step scaled down as its
    inputs look noisy (`gated_strength`): back-projection sharpens noise as much as detail."""
    if not math.isfinite(backproject) or backproject < 0:
        raise UserError(f"back-projection strength must be >= 0, got {backproject}")
    x = resize(lr, (size, size))
    rounds = math.ceil(backproject)
    strength = gated_strength(lr, backproject, gate)
    h, w = lr.shape[-2:]
    for _ in range(rounds):
        miss = lr - resize(x, (h, w))  # resize clamps to [0, 1]; the miss is signed, so interpolate it directly
        x = (x + strength / rounds * F.interpolate(miss, size=(size, size), mode="bicubic",
                                                   align_corners=False)).clamp(0, 1)
    return x


def degrade_as_seen(hr: torch.Tensor, scale: int, backproject: float = 0.0) -> torch.Tensor:
    """High-resolution sources [B,C,n,n] -> the condition a model fed at back-projection strength
    `backproject` sees: bicubic down by `scale` (antialiased), then `upsample`. Strength 0 is the
    paper's degradation (`imaging.degrade`), as training has always made it."""
    if not backproject:
        return degrade(hr, scale)
    h, w = hr.shape[-2:]
    if h != w or h % scale:
        raise UserError(f"back-projected training inputs need a square image divisible by {scale}, got {h}x{w}")
    return upsample(resize(hr, (h // scale, w // scale)), h, backproject)


def make_condition(trip: Triplet, scale: int, size: int, backproject: float = 0.0,
                   gate: tuple[float, float] | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Triplet -> condition [1,5,size,size] in [0, 1] and the crop box (top, bottom, left, right) of
    the real image inside the padded square, in output pixels. `backproject`, `gate`: see `upsample`."""
    box = output_box(*trip.t1.shape[-2:], size)  # first: refuses a shape with no output before any work
    lr, _, _ = low_resolution(trip, scale, size)
    return upsample(lr, size, backproject, gate), box


def output_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where an h x w input lies in the size x size output: (top, bottom, left, right), the centred
    square's padding cropped off. Refuses an input so elongated that a side would vanish."""
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    f = size / side
    box = (round(top * f), size - round((side - h - top) * f), round(left * f), size - round((side - w - left) * f))
    if box[1] - box[0] < 1 or box[3] - box[2] < 1:
        raise UserError(f"a {h}x{w} input keeps its aspect ratio, so at {size}x{size} its short side would be "
                        f"under one pixel; crop or pad it nearer to square, or raise --size")
    return box


def fuse_baseline(trip: Triplet, scale: int, size: int, method: str = "classical") -> torch.Tensor:
    """The "upsample, then fuse" baseline under the same input rule: [3,h,w] in [0, 1]."""
    from tfsdeploy.fusion import METHODS

    if method not in METHODS:
        raise UserError(f"method must be diffusion or one of {', '.join(METHODS)}, got {method!r}")
    check_scale_size(scale, size, 1)
    cond01, (top, bottom, left, right) = make_condition(trip, scale, size)
    return fuse_condition(cond01, method)[0][:, top:bottom, left:right]
