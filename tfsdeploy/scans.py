"""Whole-scan I/O: three registered NIfTI volumes, or three folders of 2-D slices, fused slice by slice.

Two layers, kept apart so that new input forms slot in without touching how outputs are written:

* Readers (`open_scan` and the `Scan` classes) turn inputs into axial slices. They check everything
  that can be checked before any work: the shapes, the grids, and for folders every slice's file.
  Volumes are NIfTI files or DICOM series (a folder holding one, tfsdeploy.dicom), in any mix. When
  they lie on different grids, or with `register`, they are checked to overlap in world space,
  optionally registered rigidly, and resampled onto the reference grid (`grid`: the T1's by
  default) by tfsdeploy.volumes, which needs the optional extra `tfsdeploy[scans]`.
  A volume is read in the orientation the dataset builder uses (`load_spm_volumes`): brought to the
  closest canonical (RAS) orientation and stored as [z, y, x] with z ascending, anterior at the top
  of each slice and x growing towards the subject's right along a row. Volumes are normalised to
  [0, 1] per volume by the same rule the dataset builder uses. Folders are matched by file name,
  never by order.
* The writer (`ScanOutput`) publishes a fused scan: an RGB NIfTI volume on the input's grid (in-plane
  voxel size scaled to the fused slice size) for volume input, one PNG per slice for folder input,
  and beside it `NAME_montage.png`; or, for volume input, a DICOM series (tfsdeploy.dicomout) in a folder. It is checked before any work (its name, its place, that it
  spares every input) and written all or nothing: everything goes into a temporary folder beside
  the output and is renamed into place at the end, replacing a previous output as a whole. With
  `transforms`, the registrations go into that folder as ITK .tfm files, published as a whole
  folder once the outputs are in place, and only then.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_dir, atomic_outputs, atomic_path, check_output, check_outputs_spare_inputs
from tfsdeploy.imaging import IMAGE_SUFFIXES, check_writable, normalise_volume, read_image

SCAN_SUFFIXES = (".nii", ".nii.gz")
MODALITIES = ("t1", "t2", "func")
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
# Registered volumes written by one tool agree exactly; tolerate only rounding in stored affines.
AFFINE_TOL_MM = 1e-3
MONTAGE_SUFFIX = "_montage.png"
DICOM_OUTPUT = "fused_dicom"  # the default folder of a DICOM series output


VOLUME_KINDS = ("nifti", "dicom")
TRANSFORM_SUFFIX = ".tfm"
FUSED_SLICES = ("*.png",)  # what a fused folder holds: `fuse` replaces one that holds nothing else


def scan_kind(path: str | Path) -> str | None:
    """"nifti" for a .nii/.nii.gz name, "dicom" for a folder holding a DICOM series (or a DICOMDIR),
    "folder" for another directory, None otherwise (a single 2-D image)."""
    from tfsdeploy.dicom import is_dicom_folder

    path = Path(path)
    if path.is_dir():
        return "dicom" if is_dicom_folder(path) else "folder"
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
    file stems for folders). shape: (H, W) of every slice. inputs: the three paths it was read from.
    output_kind: the form of its fused output, "nifti" (a volume on `grid`) or "folder".
    """

    kind: str
    output_kind: str
    names: list[str]
    shape: tuple[int, int]
    inputs: dict[str, Path]
    grid: "VolumeGrid | None" = None

    def __len__(self) -> int:
        return len(self.names)

    @abstractmethod
    def slice(self, i: int) -> ScanSlice:
        """The i-th slice (negative i counts from the end)."""

    def write_output(self, out: str | Path, fused: np.ndarray) -> list[Path]:
        """Write the fused slices, uint8 [N,3,h,w] with N = len(self), in the input's format, all or
        nothing and without a montage (see ScanOutput). Returns the paths written."""
        output = ScanOutput(self, out, montage=False)
        output.check()
        return output.publish(fused)

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"slice {i} out of range for a scan of {len(self)} slices")
        return i % len(self)


def open_scan(t1: str | Path, t2: str | Path, func: str | Path, *, grid: str = "t1",
              series: tuple[str, ...] = (), register=False, log=None) -> Scan:
    """Open three volumes (NIfTI files or DICOM series folders, in any mix), or three folders of slices
    matched by file name.

    Volumes only: grid, the input whose grid the others are resampled onto and the output lies on
    ("t1", "t2" or "func"); series, SeriesInstanceUIDs choosing the series of a DICOM folder that holds
    several (each folder takes the one it holds); register, rigidly register the other two volumes
    before resampling (True, or a tfsdeploy.volumes.RegisterConfig; see `register_volumes`). log(line) receives one line per volume read, per registration
    (metric, transform) and per volume resampled. Everything is read and checked here, before any work.
    """
    paths = dict(zip(MODALITIES, (Path(t1), Path(t2), Path(func)), strict=True))
    kinds = {m: scan_kind(p) for m, p in paths.items()}
    for m, p in paths.items():
        if kinds[m] is None and not p.exists():
            raise UserError(f"{p}: no such file or folder")
        if kinds[m] is None:
            raise UserError(f"{p}: not a NIfTI volume ({', '.join(SCAN_SUFFIXES)}), a DICOM series or a folder "
                            "of slices")
    if any(k in VOLUME_KINDS for k in kinds.values()):
        # Beside volumes, a folder without slice images is a DICOM series to be (read and refused as it is:
        # empty, or holding no DICOM image).
        kinds = {m: "dicom" if k == "folder" and not _images_by_stem(paths[m]) else k for m, k in kinds.items()}
    what = {"nifti": "a NIfTI volume", "dicom": "a DICOM series", "folder": "a folder of slices"}
    if len({k in VOLUME_KINDS for k in kinds.values()}) > 1:
        listed = ", ".join(f"{m} is {what[k]}" for m, k in kinds.items())
        raise UserError(f"give three volumes (NIfTI or DICOM series) or three folders of slices, not a mix ({listed})")
    if grid not in MODALITIES:
        raise UserError(f"--grid must be one of {', '.join(MODALITIES)}, got {grid!r}")
    if kinds["t1"] == "folder":
        refuse_volume_options(grid, series, register, "folders of slices")
        return _FolderScan.open(paths)
    if series and "dicom" not in kinds.values():
        raise UserError("--series chooses a DICOM series, and no input is a DICOM folder")
    return _VolumeScan.open(paths, kinds, grid, tuple(series), register, log or (lambda line: None))


def refuse_volume_options(grid: str, series, register: bool, inputs: str) -> None:
    """One line for an option that applies to volumes only, given with `inputs` (images, folders...)."""
    given = [o for o, on in (("--grid", grid != "t1"), ("--series", bool(series)), ("--register", register)) if on]
    if given:
        raise UserError(f"{given[0]} applies to volumes (NIfTI files or DICOM series); {inputs} are fused slice by "
                        "slice as they are, already registered")


def default_output(scan: Scan) -> Path:
    return Path("fused.nii.gz" if scan.output_kind == "nifti" else "fused")


def montage_path(out: str | Path) -> Path:
    """`OUT_montage.png` beside the output, named from the whole output name less a NIfTI suffix, so
    `case.x4.nii.gz` and `case.x8.nii.gz` get montages of their own."""
    out = Path(out)
    name = out.name
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return out.parent / f"{name}{MONTAGE_SUFFIX}"


# --------------------------------------------------------------------------- the writer


class ScanOutput:
    """Where a fused scan goes: the output in the scan's form and, with `montage`, OUT_montage.png.

        output = ScanOutput(scan, out)
        output.check()             # before any work
        ...                        # fuse
        output.publish(fused)      # all of it, or (on any failure or Ctrl-C) nothing
    """

    def __init__(self, scan: Scan, out: str | Path | None = None, montage: bool = True,
                 transforms: str | Path | None = None, dicom=None):
        self.scan = scan
        # A volume written as a DICOM series (a tfsdeploy.dicomout.SeriesPlan) into the folder `out`.
        self.dicom = dicom
        self.path = Path(out) if out is not None else Path(DICOM_OUTPUT) if dicom is not None else default_output(scan)
        self.montage = montage_path(self.path) if montage else None
        # A folder for the scan's registrations (KEY_to_REFERENCE.tfm), published after the outputs.
        self.transforms = Path(transforms) if transforms is not None else None
        self.transform_files: list[Path] = []  # what publish wrote there

    @property
    def paths(self) -> list[Path]:
        return [self.path] + ([self.montage] if self.montage is not None else [])

    def check(self, also: list[Path | None] = ()) -> None:
        """Refuse, before any work, an output that cannot be written or would harm an input (the
        scan's, or those `also` names: the model)."""
        inputs = [*self.scan.inputs.values(), *also]
        out = self.path
        if self.dicom is not None:
            from tfsdeploy.dicomout import DICOM_SUFFIX

            if self.scan.output_kind != "nifti":
                raise UserError("--format dicom writes a volume; folders of slices give a folder of PNGs")
            if out.exists() and not out.is_dir():
                raise UserError(f"{out}: exists and is not a folder; a DICOM series is written into a folder")
            owns, what = (f"*{DICOM_SUFFIX}",), f"a {DICOM_SUFFIX} file of a series"
        elif self.scan.output_kind == "nifti":
            if not out.name.lower().endswith(SCAN_SUFFIXES):
                raise UserError(f"{out}: NIfTI input gives a NIfTI output; use a .nii or .nii.gz name")
            if out.is_dir():
                raise UserError(f"{out}: is a directory; give a file name for the output")
            owns, what = None, ""
        else:
            if out.exists() and not out.is_dir():
                raise UserError(f"{out}: exists and is not a folder; folder input gives a folder of PNGs")
            owns, what = FUSED_SLICES, "a fused slice (PNG)"
        check_output(out, inputs, owns=owns, what=what)
        check_outputs_spare_inputs(self.paths, [p for p in inputs if p is not None])
        # The montage's name probes the output's folder (a missing folder is made when publishing
        # a lone output).
        probe = self.montage or out.parent / f"{out.name}.png"
        if self.montage is not None or probe.parent.is_dir():
            check_writable(probe)
        if self.transforms is not None:
            self._check_transforms(inputs)

    def _check_transforms(self, inputs: list[Path | None]) -> None:
        if not getattr(self.scan, "registrations", None):
            raise UserError(f"{self.transforms}: there are no transforms to save; --save-transforms goes with "
                            "--register")
        check_transform_folder(self.transforms, self.paths, inputs)

    def publish(self, fused: np.ndarray) -> list[Path]:
        """Write uint8 [N,3,h,w] fused slices; returns the paths of the output's own files."""
        _check_rgb_stack(fused)
        if fused.shape[0] != len(self.scan):
            raise ValueError(f"fused holds {fused.shape[0]} slices but the scan has {len(self.scan)}")
        if min(fused.shape[2:]) < 1:
            raise ValueError(f"fused slices of {_fmt_shape(fused.shape[2:])} hold no pixels")
        with contextlib.ExitStack() as stack:
            if self.transforms is not None:  # renamed into place only once the outputs are
                from tfsdeploy.volumes import save_transforms

                staged_tfm = stack.enter_context(atomic_dir(self.transforms))
                tfms = save_transforms(staged_tfm, self.scan.registrations, self.scan.reference)
            with atomic_outputs(*self.paths) as staged:
                if self.dicom is not None:
                    from tfsdeploy.dicomout import write_series

                    h_out, w_out = fused.shape[2:]
                    names = write_series(staged[0], fused, self.scan.grid.output_affine(h_out, w_out), self.dicom)
                    written = [self.path / n for n in names]
                elif self.scan.output_kind == "nifti":
                    _write_volume(staged[0], fused, self.scan.grid)
                    written = [self.path]
                else:
                    names = _write_slices(staged[0], fused, self.scan.names)
                    written = [self.path / n for n in names]
                if self.montage is not None:
                    montage_image(fused, self.scan.names).save(staged[1], format="PNG")
        if self.transforms is not None:
            self.transform_files = [self.transforms / t.name for t in tfms]
        return written


def check_transform_folder(folder: Path, outputs: list[Path], inputs: list[Path | None]) -> None:
    """Refuse, before any work, a folder for transforms that cannot be written or replaced as a whole,
    or that is, holds or lies in one of the outputs or inputs."""
    check_output(folder, inputs, owns=(f"*{TRANSFORM_SUFFIX}",), what=f"a {TRANSFORM_SUFFIX} transform",
                 option="--save-transforms")
    real = folder.resolve()
    for p in outputs:
        r = p.resolve()
        if r == real or r.is_relative_to(real) or real.is_relative_to(r):
            raise UserError(f"{folder}: the transforms need a folder of their own, apart from the output {p}")


def _write_slices(folder: Path, fused: np.ndarray, names: list[str]) -> list[str]:
    folder.mkdir()
    files = []
    for name, rgb in zip(names, fused, strict=True):
        files.append(f"{name}.png")
        Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).save(folder / files[-1], format="PNG")
    return files


# --------------------------------------------------------------------------- NIfTI volumes


@dataclass(frozen=True)
class VolumeGrid:
    """The grid a fused volume is written on: the inputs' canonical (RAS) voxel-to-world affine,
    their header, NIfTI class and slice shape (H, W)."""

    affine: np.ndarray
    header: object
    image_class: type
    shape: tuple[int, int]

    def output_affine(self, h_out: int, w_out: int) -> np.ndarray:
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
        return self.affine @ out_to_in

    def output_header(self):
        hdr = self.header.copy()
        hdr.set_data_dtype(RGB24)
        hdr.set_slope_inter(None, None)  # RGB bytes are stored as they are
        hdr.set_intent("none")
        hdr["cal_min"] = hdr["cal_max"] = 0
        hdr["descrip"] = b"fused T1/T2/functional, RGB"
        return hdr


def _write_volume(path: Path, fused: np.ndarray, grid: VolumeGrid) -> None:
    """uint8 [Z,3,h,w] -> an RGB24 NIfTI at `path` (a staging name: the final name says .nii or .nii.gz)."""
    h_out, w_out = fused.shape[2:]
    img = grid.image_class(_to_rgb24_xyz(fused), grid.output_affine(h_out, w_out), grid.output_header())
    # nibabel picks the format from the file name; serialise to a stream instead, compressing it
    # here for .nii.gz.
    with open(path, "wb") as raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as stream:
                img.to_stream(stream)
        else:
            img.to_stream(raw)


class _VolumeScan(Scan):
    kind = "nifti"
    output_kind = "nifti"

    def __init__(self, volumes: dict[str, np.ndarray], grid: VolumeGrid, inputs: dict[str, Path],
                 registrations: dict | None = None, reference: str = "t1"):
        self._volumes = volumes  # modality -> float32 [Z, H, W], the project's slice orientation
        self.grid = grid
        self.inputs = inputs
        # modality -> tfsdeploy.volumes.Registration to `reference` (with register=True)
        self.registrations = registrations or {}
        self.series: dict = {}  # modality -> tfsdeploy.dicom.SeriesInfo, for the inputs read from DICOM series
        self.reference = reference
        z, h, w = volumes[reference].shape
        width = max(3, len(str(z - 1)))
        self.names = [f"z{k:0{width}d}" for k in range(z)]
        self.shape = (h, w)

    @classmethod
    def open(cls, paths: dict[str, Path], kinds: dict[str, str], reference: str = "t1", series: tuple[str, ...] = (),
             register=False, log=lambda line: None) -> _VolumeScan:
        from tfsdeploy.volumes import describe_grid, same_grid

        labels = _labels(paths)
        images, read, used, dicom_series = {}, {}, set(), {}
        for m, p in paths.items():
            if kinds[m] == "dicom":
                images[m], dicom_series[m], read[m] = _read_dicom(p, series)
                used.add(dicom_series[m].uid)
            else:
                images[m] = _load_canonical(p)
                read[m] = f"NIfTI volume, {describe_grid(images[m])}"
        unused = [uid for uid in series if uid not in used]
        if unused:
            raise UserError(f"--series {unused[0]}: no DICOM input holds that series")
        one_grid = all(same_grid(images[m], images[reference]) for m in MODALITIES)
        if register or not one_grid or "dicom" in kinds.values():
            for m in MODALITIES:
                log(f"read {labels[m]}: {read[m]}")
        registrations = {}
        if register or not one_grid:
            from tfsdeploy.volumes import RegisterConfig, check_overlap, onto_grid, register_volumes

            for m in MODALITIES:  # read now, so that a damaged file is named before resampling reads it
                _voxels(paths[m], images[m])
            check_overlap(images, "t1", labels)
            if register:
                config = register if isinstance(register, RegisterConfig) else RegisterConfig()
                registrations, lines = register_volumes(images, reference, "t1", config, labels)
                for line in lines:
                    log(line)
            images, lines = onto_grid(images, reference, registrations, labels)
            for line in lines:
                log(line)
        ref = images[reference]
        x, y = ref.shape[:2]
        grid = VolumeGrid(ref.affine.copy(), ref.header.copy(), type(ref), (int(y), int(x)))
        # Pop each image once read so that only one raw volume is held beside the float32 ones.
        volumes = {m: _axial_slices(paths[m], images.pop(m)) for m in MODALITIES}
        scan = cls(volumes, grid, dict(paths), registrations, reference)
        scan.series = dicom_series
        return scan

    def slice(self, i: int) -> ScanSlice:
        i = self._index(i)
        # Copies, so that a caller editing a slice in place cannot change the held volume.
        t1, t2, func = (torch.from_numpy(self._volumes[m][i].copy())[None] for m in MODALITIES)
        return ScanSlice(self.names[i], t1, t2, func)


def _load_canonical(path: Path):
    """The NIfTI image at `path` in closest canonical (RAS) orientation; its voxel data still unread if possible."""
    import nibabel as nib

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    from tfsdeploy.volumes import quiet_readers

    with quiet_readers():  # header oddities nibabel mends itself; what matters is refused below
        return _checked_nifti(path, nib)


def _checked_nifti(path: Path, nib):
    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from None
    shape = img.shape
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise UserError(f"{path}: expected a 3-D volume, got shape {_fmt_shape(shape)}")
    if min(shape[:3]) < 1:
        raise UserError(f"{path}: the volume holds no voxels (shape {_fmt_shape(shape)})")
    if np.issubdtype(img.get_data_dtype(), np.complexfloating):
        raise UserError(f"{path}: holds complex values; save the magnitude (or the part to fuse) as a real volume")
    _check_voxel_sizes(path, img)
    try:
        return nib.as_closest_canonical(img)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot reorient the volume ({type(e).__name__}: {e})") from None


def _check_voxel_sizes(path: Path, img) -> None:
    """Refuse a header whose voxel sizes come from pixdim (no sform) and are 0 or negative. nibabel mends
    those on load (0 becomes 1, a negative size its absolute value), so the header is read again as
    written."""
    from nibabel.openers import ImageOpener

    header = img.header
    if "pixdim" not in header or ("sform_code" in header and int(header["sform_code"]) > 0):
        return
    try:
        with ImageOpener(path) as f:
            raw = type(header).from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - read once already; nothing more to learn
        return
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    if not np.all(pixdim > 0):
        raise UserError(f"{path}: its header gives voxel sizes of {'x'.join(f'{v:g}' for v in pixdim)} mm "
                        "(pixdim, with no sform); each must be positive")


def _read_dicom(folder: Path, series: tuple[str, ...]):
    """The DICOM series in `folder`: (canonical image, its tfsdeploy.dicom.SeriesInfo, what was read in words)."""
    import nibabel as nib

    from tfsdeploy.dicom import read_dicom_series

    vol = read_dicom_series(folder, series or None)
    skipped = f", {vol.skipped} other file(s) skipped" if vol.skipped else ""
    return nib.as_closest_canonical(vol.image), vol.series, f"{vol.describe()}{skipped}"


def _voxels(path: Path, img) -> np.ndarray:
    """The image's voxel data as float32, kept in the image for whoever reads it next; a file that
    cannot be read (truncated, corrupt) is one line naming it."""
    try:
        # A scaling that overflows float32 (scl_slope 1e38) gives inf, refused by _axial_slices.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return img.get_fdata(dtype=np.float32, caching="fill")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from None


def _axial_slices(path: Path, img) -> np.ndarray:
    """Canonical image -> float32 [Z, H, W] in [0, 1]: axial slices, anterior up (as load_spm_volumes)."""
    data = _voxels(path, img)
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
    output_kind = "folder"

    def __init__(self, names: list[str], files: dict[str, list[Path]], inputs: dict[str, Path]):
        self.names = names
        self._files = files  # modality -> one file per name, in the order of `names`
        self.inputs = inputs
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
        scan = cls(names, {m: [files[m][s] for s in names] for m in MODALITIES}, dict(dirs))
        for i in range(len(scan)):  # every file read once now: a bad slice is refused before any work
            scan.slice(i)
        return scan

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
    """`montage_image` written as a PNG, atomically."""
    path = Path(path)
    sheet = montage_image(fused, names, tiles)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def montage_image(fused: np.ndarray, names: list[str], tiles: int = 16) -> Image.Image:
    """An overview of up to `tiles` slices of uint8 [N,3,h,w], evenly spaced and labelled by name.

    The tiles fill a near-square grid (cols = ceil(sqrt(n)), rows = ceil(n / cols)) of h x w cells, row
    by row; unused cells stay black.
    """
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
    return sheet


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
