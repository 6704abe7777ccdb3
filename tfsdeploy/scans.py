"""Whole-scan I/O: three registered NIfTI volumes, or three folders of 2-D slices, fused slice by slice.

A scan is read as axial slices in the orientation the dataset builder uses (`load_spm_volumes`): the
volume is brought to the closest canonical (RAS) orientation and stored as [z, y, x] with z ascending,
anterior at the top of each slice and x growing towards the subject's right along a row. Volumes are
normalised to [0, 1] per volume by the same rule the dataset builder uses. Folders are matched by file
name, never by order.

The fused output goes back where it came from: an RGB NIfTI volume on the input's grid (in-plane voxel
size scaled to the fused slice size) for NIfTI input, one PNG per slice for folder input.
"""

from __future__ import annotations

import gzip
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.imaging import IMAGE_SUFFIXES, normalise_volume, read_image, write_png

SCAN_SUFFIXES = (".nii", ".nii.gz")
MODALITIES = ("t1", "t2", "func")
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
# Registered volumes written by one tool agree exactly; tolerate only rounding in stored affines.
AFFINE_TOL_MM = 1e-3


def scan_kind(path: str | Path) -> str | None:
    """"nifti" for a .nii/.nii.gz name, "folder" for a directory, None otherwise (a single 2-D image)."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if path.name.lower().endswith(SCAN_SUFFIXES):
        return "nifti"
    return None


@dataclass(frozen=True)
class ScanSlice:
    """One slice of a scan, float32 in [0, 1].

    t1, t2: [1,H,W] ([3,H,W] if a folder holds colour files). func: [1,H,W] grey, or [3,H,W] if the
    folder's functional image is colour; the functional colour map is applied by the caller.
    """

    name: str
    t1: torch.Tensor
    t2: torch.Tensor
    func: torch.Tensor


class Scan(ABC):
    """Three registered inputs of one case, read one slice at a time. Made by `open_scan`.

    kind: "nifti" or "folder". names: slice names in order (axial z ascending for volumes, sorted
    file stems for folders). shape: (H, W) of every slice.
    """

    kind: str
    names: list[str]
    shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.names)

    @abstractmethod
    def slice(self, i: int) -> ScanSlice:
        """The i-th slice (negative i counts from the end)."""

    @abstractmethod
    def write_output(self, out: str | Path, fused: np.ndarray) -> list[Path]:
        """Write the fused slices, uint8 [N,3,h,w] with N = len(self), in the input's format.

        Returns the paths written.
        """

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"slice {i} out of range for a scan of {len(self)} slices")
        return i % len(self)

    def _check_fused(self, fused: np.ndarray) -> None:
        _check_rgb_stack(fused)
        if fused.shape[0] != len(self):
            raise ValueError(f"fused holds {fused.shape[0]} slices but the scan has {len(self)}")


def open_scan(t1: str | Path, t2: str | Path, func: str | Path) -> Scan:
    """Open three registered NIfTI volumes, or three folders of slices matched by file name."""
    paths = dict(zip(MODALITIES, (Path(t1), Path(t2), Path(func)), strict=True))
    kinds = {m: scan_kind(p) for m, p in paths.items()}
    for m, p in paths.items():
        if kinds[m] is None and not p.exists():
            raise UserError(f"{p}: no such file or folder")
        if kinds[m] is None:
            raise UserError(f"{p}: not a NIfTI volume ({', '.join(SCAN_SUFFIXES)}) or a folder of slices")
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{m} is {'a NIfTI volume' if k == 'nifti' else 'a folder'}" for m, k in kinds.items())
        raise UserError(f"give three NIfTI volumes or three folders, not a mix ({listed})")
    return _VolumeScan.open(paths) if kinds["t1"] == "nifti" else _FolderScan.open(paths)


# --------------------------------------------------------------------------- NIfTI volumes


class _VolumeScan(Scan):
    kind = "nifti"

    def __init__(self, volumes: dict[str, np.ndarray], affine: np.ndarray, header, image_class: type):
        self._volumes = volumes  # modality -> float32 [Z, H, W], the project's slice orientation
        self._affine = affine  # canonical (RAS) voxel-to-world of the inputs
        self._header = header
        self._image_class = image_class
        z, h, w = volumes["t1"].shape
        width = max(3, len(str(z - 1)))
        self.names = [f"z{k:0{width}d}" for k in range(z)]
        self.shape = (h, w)

    @classmethod
    def open(cls, paths: dict[str, Path]) -> _VolumeScan:
        images = {m: _load_canonical(p) for m, p in paths.items()}
        _check_one_grid(paths, images)
        ref = images["t1"]
        affine, header, image_class = ref.affine.copy(), ref.header.copy(), type(ref)
        # Pop each image once read so that only one raw volume is held beside the float32 ones.
        volumes = {m: _axial_slices(paths[m], images.pop(m)) for m in MODALITIES}
        return cls(volumes, affine, header, image_class)

    def slice(self, i: int) -> ScanSlice:
        i = self._index(i)
        # Copies, so that a caller editing a slice in place cannot change the held volume.
        t1, t2, func = (torch.from_numpy(self._volumes[m][i].copy())[None] for m in MODALITIES)
        return ScanSlice(self.names[i], t1, t2, func)

    def write_output(self, out: str | Path, fused: np.ndarray) -> list[Path]:
        out = Path(out)
        name = out.name.lower()
        if not name.endswith(SCAN_SUFFIXES):
            raise UserError(f"{out}: NIfTI input gives a NIfTI output; use a .nii or .nii.gz name")
        if out.is_dir():
            raise UserError(f"{out}: is a directory; give a file name for the output")
        self._check_fused(fused)
        h_out, w_out = fused.shape[2:]
        img = self._image_class(_to_rgb24_xyz(fused), self._output_affine(h_out, w_out), self._output_header())
        # nibabel picks the format from the file name, and atomic_path's temporary name ends in ".tmp":
        # serialise to a stream instead, compressing it here for .nii.gz.
        with atomic_path(out) as tmp:
            try:
                with open(tmp, "wb") as raw:
                    if name.endswith(".gz"):
                        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as stream:
                            img.to_stream(stream)
                    else:
                        img.to_stream(raw)
            except OSError as e:
                raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
        return [out]

    def _output_affine(self, h_out: int, w_out: int) -> np.ndarray:
        """The input's canonical affine, with in-plane voxels resized so the output spans the same extent.

        The fused slice covers the input slice's field of view with w_out x h_out voxels instead of
        W x H, so one output voxel is s = W/w_out (along x) or H/h_out (along y) input voxels wide. Output
        voxel i' has its centre at input voxel coordinate (i' + 0.5) * s - 0.5: the outer edges of the
        first and last voxels (input coordinates -0.5 and W - 0.5) stay where they were.
        """
        h_in, w_in = self.shape
        sx, sy = w_in / w_out, h_in / h_out
        out_to_in = np.array([
            [sx, 0.0, 0.0, (sx - 1.0) / 2.0],
            [0.0, sy, 0.0, (sy - 1.0) / 2.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ])
        return self._affine @ out_to_in

    def _output_header(self):
        hdr = self._header.copy()
        hdr.set_data_dtype(RGB24)
        hdr.set_slope_inter(None, None)  # RGB bytes are stored as they are
        hdr.set_intent("none")
        hdr["cal_min"] = hdr["cal_max"] = 0
        hdr["descrip"] = b"fused T1/T2/functional, RGB"
        return hdr


def _load_canonical(path: Path):
    """The NIfTI image at `path` in closest canonical (RAS) orientation; its voxel data still unread if possible."""
    import nibabel as nib

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from None
    shape = img.shape
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise UserError(f"{path}: expected a 3-D volume, got shape {_fmt_shape(shape)}")
    try:
        return nib.as_closest_canonical(img)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot reorient the volume ({type(e).__name__}: {e})") from None


def _check_one_grid(paths: dict[str, Path], images: dict) -> None:
    labels = _labels(paths)
    shapes = {m: img.shape[:3] for m, img in images.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{labels[m]} {_fmt_shape(s)}" for m, s in shapes.items())
        raise UserError(f"volumes have different shapes ({listed}); resample them onto one grid first")
    ref = images["t1"].affine
    for m in ("t2", "func"):
        if not np.allclose(images[m].affine, ref, rtol=0.0, atol=AFFINE_TOL_MM):
            diff = float(np.abs(images[m].affine - ref).max())
            raise UserError(f"{labels['t1']} and {labels[m]} are not registered to one grid (their voxel-to-world "
                            f"affines differ by up to {diff:.3g} mm); register and resample them onto one grid first")


def _axial_slices(path: Path, img) -> np.ndarray:
    """Canonical image -> float32 [Z, H, W] in [0, 1]: axial slices, anterior up (as load_spm_volumes)."""
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from None
    data = data.reshape(data.shape[:3])  # drops a trailing singleton axis
    if not np.isfinite(data).all():
        raise UserError(f"{path}: volume holds NaN or infinite values")
    vol = normalise_volume(data)
    return np.ascontiguousarray(np.transpose(vol, (2, 1, 0))[:, ::-1, :])


def _to_rgb24_xyz(fused: np.ndarray) -> np.ndarray:
    """uint8 [Z,3,h,w] slices -> RGB24 [w, h, Z] volume: undoes the row flip and transpose of reading."""
    xyzc = fused[:, :, ::-1, :].transpose(3, 2, 0, 1)
    return np.ascontiguousarray(xyzc).view(RGB24)[..., 0]


def _labels(paths: dict[str, Path]) -> dict[str, str]:
    """Short names for messages: the file names, or the full paths where the names alone are ambiguous."""
    names = [p.name for p in paths.values()]
    unique = len(set(names)) == len(names)
    return {m: p.name if unique else str(p) for m, p in paths.items()}


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


# --------------------------------------------------------------------------- folders of slices


class _FolderScan(Scan):
    kind = "folder"

    def __init__(self, names: list[str], files: dict[str, list[Path]]):
        self.names = names
        self._files = files  # modality -> one file per name, in the order of `names`
        first = read_image(files["t1"][0])
        self.shape = (int(first.shape[-2]), int(first.shape[-1]))

    @classmethod
    def open(cls, dirs: dict[str, Path]) -> _FolderScan:
        files = {m: _images_by_stem(d) for m, d in dirs.items()}
        for m, d in dirs.items():
            if not files[m]:
                raise UserError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) in the {m} folder")
        common = set.intersection(*(set(f) for f in files.values()))
        unmatched = sorted(set().union(*files.values()) - common)
        if unmatched:
            stem = unmatched[0]
            have = ", ".join(str(dirs[m]) for m in MODALITIES if stem in files[m])
            lack = ", ".join(str(dirs[m]) for m in MODALITIES if stem not in files[m])
            raise UserError(f"slice '{stem}' is in {have} but not in {lack} ({len(unmatched)} unmatched name(s)); "
                            f"slices are matched by file name, so each needs a file in all three folders")
        names = sorted(common)
        return cls(names, {m: [files[m][s] for s in names] for m in MODALITIES})

    def slice(self, i: int) -> ScanSlice:
        i = self._index(i)
        imgs = []
        for m in MODALITIES:
            path = self._files[m][i]
            img = read_image(path)
            if tuple(img.shape[-2:]) != self.shape:
                h, w = img.shape[-2:]
                raise UserError(f"{path}: size {h}x{w} differs from {self._files['t1'][0]} "
                                f"({self.shape[0]}x{self.shape[1]}); all slices must have one size")
            imgs.append(img)
        return ScanSlice(self.names[i], *imgs)

    def write_output(self, out: str | Path, fused: np.ndarray) -> list[Path]:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder; folder input gives a folder of PNGs")
        self._check_fused(fused)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{out}: cannot create the folder ({e.strerror or e})") from None
        written = []
        for name, rgb in zip(self.names, fused, strict=True):
            img = torch.from_numpy(rgb.astype(np.float32)) / 255.0
            written.append(write_png(out / f"{name}.png", img))
        return written


def _images_by_stem(folder: Path) -> dict[str, Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise UserError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    found: dict[str, Path] = {}
    for f in entries:
        # Hidden files include the "._name.png" resource forks some systems leave beside images.
        if f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
            continue
        if f.stem in found:
            raise UserError(f"{folder}: {found[f.stem].name} and {f.name} are the same slice; keep one of them")
        found[f.stem] = f
    return found


# --------------------------------------------------------------------------- montage


def write_montage(path: str | Path, fused: np.ndarray, names: list[str], tiles: int = 16) -> Path:
    """A PNG overview of up to `tiles` slices of uint8 [N,3,h,w], evenly spaced and labelled by name.

    The tiles fill a near-square grid (cols = ceil(sqrt(n)), rows = ceil(n / cols)) of h x w cells, row
    by row; unused cells stay black. Written atomically.
    """
    path = Path(path)
    _check_rgb_stack(fused)
    n, _, h, w = fused.shape
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} slices")
    if n == 0 or tiles < 1:
        raise ValueError(f"nothing to tile ({n} slices, tiles={tiles})")
    picks = np.unique(np.round(np.linspace(0, n - 1, min(tiles, n))).astype(int))
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h))
    for k, i in enumerate(picks):
        sheet.paste(_labelled_tile(fused[i], names[i]), ((k % cols) * w, (k // cols) * h))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _labelled_tile(rgb: np.ndarray, label: str) -> Image.Image:
    # Drawn on the tile itself so a label longer than the tile is clipped, not spilled onto its neighbour.
    tile = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
    draw = ImageDraw.Draw(tile)
    left, top, right, bottom = draw.textbbox((2, 1), label)
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
    draw.text((2, 1), label, fill=(255, 255, 255))
    return tile


def _check_rgb_stack(fused: np.ndarray) -> None:
    if not isinstance(fused, np.ndarray) or fused.dtype != np.uint8 or fused.ndim != 4 or fused.shape[1] != 3:
        got = f"{fused.dtype} {fused.shape}" if isinstance(fused, np.ndarray) else type(fused).__name__
        raise ValueError(f"fused slices must be a uint8 array [N,3,h,w], got {got}")
