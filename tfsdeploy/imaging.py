"""Image I/O, colour and resampling: the one place images enter and leave the library.

Conventions: images inside the library are float32 torch tensors in [0, 1], shaped [C,H,W]
or [B,C,H,W]; grey images have C = 1, colour images C = 3 (RGB). The network sees [-1, 1].
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path, first_existing, probe_writable

# The functional colour map: a fixed look-up table, linear between these control points.
# It runs black -> blue -> cyan -> green -> yellow -> red -> white, like the rainbow maps used
# for SPECT/PET display, and starts at black so that the background stays black.
FUNC_CMAP_POINTS = (
    (0.00, (0.00, 0.00, 0.00)),
    (0.15, (0.00, 0.00, 0.60)),
    (0.30, (0.00, 0.45, 1.00)),
    (0.45, (0.00, 0.90, 0.60)),
    (0.60, (0.55, 1.00, 0.00)),
    (0.75, (1.00, 0.70, 0.00)),
    (0.90, (1.00, 0.10, 0.00)),
    (1.00, (1.00, 1.00, 1.00)),
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def colormap_lut(n: int = 256) -> torch.Tensor:
    """The functional colour map as an [n, 3] table."""
    xs = np.array([p for p, _ in FUNC_CMAP_POINTS])
    cols = np.array([c for _, c in FUNC_CMAP_POINTS])
    grid = np.linspace(0.0, 1.0, n)
    lut = np.stack([np.interp(grid, xs, cols[:, k]) for k in range(3)], axis=1)
    return torch.from_numpy(lut.astype(np.float32))


def apply_colormap(grey: torch.Tensor) -> torch.Tensor:
    """Grey [..., 1, H, W] in [0, 1] -> RGB [..., 3, H, W], by linear interpolation in the table."""
    lut = colormap_lut().to(grey.device)
    pos = grey.clamp(0, 1).squeeze(-3) * (lut.shape[0] - 1)
    lo = pos.floor().long().clamp(max=lut.shape[0] - 2)
    frac = (pos - lo.float()).unsqueeze(-1)
    rgb = lut[lo] * (1 - frac) + lut[lo + 1] * frac
    return rgb.movedim(-1, -3).contiguous()


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """Full-range BT.601 (JPEG) YCbCr of [..., 3, H, W] in [0, 1]."""
    r, g, b = rgb.unbind(-3)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.5 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([y, cb, cr], dim=-3)


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    y, cb, cr = ycc.unbind(-3)
    r = y + 1.402 * (cr - 0.5)
    g = y - 0.344136 * (cb - 0.5) - 0.714136 * (cr - 0.5)
    b = y + 1.772 * (cb - 0.5)
    return torch.stack([r, g, b], dim=-3)


def to_grey(img: torch.Tensor) -> torch.Tensor:
    """[..., C, H, W] -> [..., 1, H, W]; colour images become their luma."""
    if img.shape[-3] == 1:
        return img
    return rgb_to_ycbcr(img)[..., :1, :, :]


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of [B,C,H,W] in [0,1], antialiased when shrinking (as MATLAB's imresize)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    shrink = size[0] < img.shape[-2] or size[1] < img.shape[-1]
    out = F.interpolate(img, size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(0, 1)


def degrade(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The paper's degradation: bicubic down by `scale`, then bicubic back up to the original size."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise UserError(f"image size {h}x{w} is not divisible by scale {scale}")
    return resize(resize(hr, (h // scale, w // scale)), (h, w))


def pad_to_square(img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad [..., H, W] to a centred square. Returns the image and (top, bottom, left, right)."""
    h, w = img.shape[-2:]
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    pads = (top, n - h - top, left, n - w - left)
    if n == h == w:
        return img, pads
    return F.pad(img, (pads[2], pads[3], pads[0], pads[1])), pads


def normalise_volume(v: np.ndarray) -> np.ndarray:
    """Robust [0, 1]: 0 maps to the 1st percentile, 1 to the 99.5th percentile of the foreground."""
    lo = float(np.percentile(v, 1.0))
    fg = v[v > lo]
    hi = float(np.percentile(fg, 99.5)) if fg.size else lo + 1.0
    return np.clip((v - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- file I/O


def read_image(path: str | Path) -> torch.Tensor:
    """Read PNG, JPEG or TIFF (8- or 16-bit integer, or float; grey or colour) as float [C,H,W] in
    [0, 1], by the intensity rule of `_scale_to_unit`.

    Grey files give C = 1, colour files C = 3; alpha is dropped.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(path)
        else:
            arr = _read_pil(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
        raise UserError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # drop alpha
        arr = arr[:, :, : arr.shape[2] - 1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or min(arr.shape[:2]) < 1:
        raise UserError(f"{path}: unsupported image layout {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _scale_to_unit(arr: np.ndarray, path: Path) -> np.ndarray:
    """Pixel values -> [0, 1] by the input rule (README, "Input intensities"):

    - 8-bit: divided by 255;
    - other non-negative integers up to 65535 (16-bit PNG and TIFF): divided by the largest value of
      their bit depth, taken as the smallest of 8..16 bits that holds the image's maximum, so 12-bit
      data stored in 16 bits fills [0, 1] instead of coming out dim;
    - floats within [0, 1]: as they are;
    - anything else (floats outside [0, 1], negative or wider integers, such as CT numbers or
      counts): the robust rule for volumes, 1st percentile -> 0 and 99.5th percentile of the
      foreground -> 1.
    """
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            bits = min(16, max(8, hi.bit_length()))
            return arr.astype(np.float32) / float(2**bits - 1)
        return normalise_volume(arr.astype(np.float64))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise UserError(f"{path}: image holds NaN or infinite values")
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.astype(np.float32)
        return normalise_volume(arr.astype(np.float64))
    raise UserError(f"{path}: unsupported pixel type {arr.dtype}")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # A large image is read all the same (Pillow refuses only absurd ones, in one line below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format in ("TIFF", "GIF"):  # an MPO (stereo JPEG) shows its first picture
                raise UserError(_pages_message(path, frames))
            im.load()
            # As a viewer shows it: the EXIF orientation turns the pixels upright.
            im = ImageOps.exif_transpose(im)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "PA":
                im = im.convert("RGBA")
            elif im.mode in ("CMYK", "LAB", "HSV") or im.mode.startswith("YCbCr"):
                im = im.convert("RGB")
            arr = np.array(im)
    return _scale_to_unit(arr, path)


def _pages_message(path: Path, pages: int) -> str:
    return (f"{path}: holds {pages} pages; a multi-page file is a stack of slices, not one image: save "
            f"one slice per file in a folder and give the folder")


# TIFF Orientation tag (274) -> how to turn the stored rows and columns upright: (transpose, flip rows,
# flip columns), applied in that order.
_TIFF_ORIENTATION = {1: (False, False, False), 2: (False, False, True), 3: (False, True, True),
                     4: (False, True, False), 5: (True, False, False), 6: (True, False, True),
                     7: (True, True, True), 8: (True, True, False)}


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if len(tif.pages) > 1:
            raise UserError(_pages_message(path, len(tif.pages)))
        page = tif.pages[0]
        if int(page.photometric) not in (1, 2):
            # Palette, CMYK, white-is-zero...: stored values are not what a viewer shows; Pillow
            # converts them as a viewer does.
            return _read_pil(path)
        arr = page.asarray()
        tag = page.tags.get(274)
        orientation = int(tag.value) if tag is not None else 1
        planar = int(getattr(page, "planarconfig", 1)) == 2
    if arr.ndim == 3 and (planar or (arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4))):
        arr = np.moveaxis(arr, 0, -1)  # planar (channels-first) TIFF
    if arr.ndim not in (2, 3):
        raise UserError(f"{path}: unsupported image layout {arr.shape}")
    transpose, flip_rows, flip_cols = _TIFF_ORIENTATION.get(orientation, (False, False, False))
    if transpose:
        arr = np.swapaxes(arr, 0, 1)
    if flip_rows:
        arr = arr[::-1]
    if flip_cols:
        arr = arr[:, ::-1]
    return _scale_to_unit(np.ascontiguousarray(arr), path)


def check_writable(path: str | Path) -> None:
    """Fail before any long work if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name for the output")
    if not parent.is_dir():
        ancestor = first_existing(parent)
        if ancestor is not None and not ancestor.is_dir():
            raise UserError(f"{path}: {ancestor} is a file, not a directory")
        raise UserError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: directory {parent} is not writable")
    probe_writable(parent, path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: the output is written as PNG; use a .png name")


def quantise_uint8(img: torch.Tensor) -> torch.Tensor:
    """Any shape in [0, 1] -> uint8 on 0-255 (clamped, rounded half up), on the same device: what
    an 8-bit file holds. Every 8-bit output (PNG, fused scan, montage) goes through this one rule."""
    return (img.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)


def write_png(path: str | Path, img: torch.Tensor) -> Path:
    """Write [C,H,W] in [0, 1] as an 8-bit PNG, atomically: a reader never sees a partial file."""
    from PIL import Image

    path = Path(path)
    arr = quantise_uint8(img).cpu()
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path
