"""DICOM series in: a folder (or a DICOMDIR) holding one series -> a volume with its true geometry.

The headers are read with pydicom and checked before any pixel is: one series per folder (or the one
chosen by its SeriesInstanceUID), one orientation, one slice size, evenly spaced slices along the slice
normal. Slices are ordered by their position along that normal, never by file name or instance number.
SimpleITK's series reader then reads the pixels (rescale slope and intercept applied), and the
geometry is set from the checked headers. The volume comes back as the scan reader holds NIfTI
volumes: a nibabel image, float32 [i, j, k] with a RAS affine (tfsdeploy.volumes).

Needs the optional extra `tfsdeploy[scans]`; `is_dicom_folder` alone does not (it reads file
preambles), so a caller can tell a DICOM folder from a folder of PNGs without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from tfsdeploy.errors import UserError
from tfsdeploy.imaging import IMAGE_SUFFIXES
from tfsdeploy.volumes import describe_grid, from_itk, import_extra, quiet_readers as quiet

DICOMDIR = "DICOMDIR"
# Tolerances on header geometry: direction cosines, and slice gaps relative to their median.
ORIENTATION_TOL = 1e-4
# ImageOrientationPatient's two vectors: unit length and perpendicular within this (headers round them).
UNIT_TOL = 1e-3
GAP_TOL = 0.01


def is_dicom_folder(path: str | Path) -> bool:
    """True for a folder with a DICOMDIR or with a DICOM file ('DICM' at byte 128) in it. Files named as
    images (.png, ...) are slices of a folder scan and are not opened; every other file may be DICOM,
    however many notes or reports sort before it."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / DICOMDIR).is_file():
        return True
    return any(_has_dicom_preamble(f) for f in _files_under(path) if f.suffix.lower() not in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder. files: ordered along the slice normal once the series is checked."""

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]

    @property
    def slices(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return f"{self.uid} '{self.description or 'no description'}' ({self.modality or '?'}, {self.slices} slices)"


@dataclass(frozen=True)
class DicomVolume:
    """A DICOM series read as a volume: image (nibabel Nifti1Image, float32, RAS affine) and its series."""

    image: object
    series: SeriesInfo
    skipped: int  # files in the folder that were not images of any series (DICOMDIR, reports, stray files)

    def describe(self) -> str:
        return f"DICOM series {self.series.describe()}: {describe_grid(self.image)}"


def list_dicom_series(folder: str | Path) -> tuple[list[SeriesInfo], int]:
    """The image series in a folder (searched recursively) or a DICOMDIR, and how many files were skipped.

    Refuses a missing or empty folder, and a folder with no DICOM image in it.
    """
    infos, _, skipped = _read_headers(Path(folder))
    return infos, skipped


def _read_headers(folder: Path) -> tuple[list[SeriesInfo], dict[str, list], int]:
    """list_dicom_series, plus each series' headers (pydicom datasets without pixels) in its files' order."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; a DICOM series is given as the folder that holds it")
    dicomdir = (folder / DICOMDIR).is_file()
    if not dicomdir:
        files = list(_files_under(folder))
        if not files:
            raise UserError(f"{folder}: the folder is empty; expected the files of one DICOM series")
        if not any(map(_has_dicom_preamble, files)) and all(os.access(f, os.R_OK) for f in files):
            # said without pydicom: a folder of other files needs no DICOM reader to be refused
            raise UserError(f"{folder}: no DICOM images in its {len(files)} file(s) (e.g. {files[0].name})")
    pydicom = import_extra("pydicom", "reading DICOM series")
    files = _dicomdir_files(pydicom, folder) if dicomdir else files
    if not files:
        raise UserError(f"{folder}: the folder is empty; expected the files of one DICOM series")
    groups: dict[str, list] = {}
    skipped, not_dicom, no_uid = 0, [], []
    for f in files:
        try:
            with quiet():
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        except (pydicom.errors.InvalidDicomError, EOFError, ValueError, TypeError, KeyError):
            not_dicom.append(f)
            continue
        except OSError as e:
            raise UserError(f"{f}: cannot read ({e.strerror or e})") from None
        if "Rows" not in ds:  # a DICOMDIR, a report, a presentation state
            skipped += 1
            continue
        if not uid:  # an image that names no series
            no_uid.append(f)
            continue
        groups.setdefault(uid, []).append((f, ds))
    if not groups and no_uid:
        raise UserError(f"{folder}: its {len(no_uid)} DICOM image(s) have no SeriesInstanceUID (e.g. {no_uid[0].name}), "
                        "so their series cannot be told; export them again with their series")
    if not groups:
        example = f" (e.g. {not_dicom[0].name})" if not_dicom else ""
        raise UserError(f"{folder}: no DICOM images in its {len(files)} file(s){example}")
    infos = [SeriesInfo(uid, _text(members[0][1], "SeriesDescription"), _text(members[0][1], "Modality"),
                        tuple(f for f, _ in members)) for uid, members in groups.items()]

    def number(info: SeriesInfo) -> float:
        # Only orders the list of series; a SeriesNumber that is not a number sorts last.
        try:
            return float(_text(groups[info.uid][0][1], "SeriesNumber") or "inf")
        except ValueError:
            return float("inf")

    infos.sort(key=lambda s: (number(s), s.uid))
    return (infos, {uid: [ds for _, ds in members] for uid, members in groups.items()},
            skipped + len(not_dicom) + len(no_uid))


def read_dicom_series(folder: str | Path, series: str | Iterable[str] | None = None) -> DicomVolume:
    """Read the one DICOM series in `folder` (or the DICOMDIR there) as a volume with its true geometry.

    series: a SeriesInstanceUID, or several (one per input of a command), of which a folder holding more
    than one series must hold exactly one; such a folder is otherwise refused with a list of its series
    (UID, description, modality, slice count). A folder holding one series gives that one.
    """
    folder = Path(folder)
    infos, headers_of, skipped = _read_headers(folder)  # a folder with no DICOM in it is refused without the extra
    sitk = import_extra("SimpleITK", "reading DICOM series")
    chosen = _choose(folder, infos, series)
    headers = headers_of[chosen.uid]
    order, geometry = _check_series(folder, chosen, headers)
    files = tuple(chosen.files[i] for i in order)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with quiet(sitk):  # a decoder's complaints, one per slice, would come before the one line below
            image = reader.Execute()
    except RuntimeError as e:
        reason = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ", "", str(e).strip().splitlines()[-1])
        raise UserError(f"{folder}: cannot read the pixels of series {chosen.uid} ({reason})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{folder}: series {chosen.uid} is not a grey volume")
    # The geometry checked from the headers, not the reader's guess from the first slices.
    origin, direction, spacing = geometry
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetSpacing([float(v) for v in spacing])
    info = SeriesInfo(chosen.uid, chosen.description, chosen.modality, files)
    return DicomVolume(from_itk(image), info, skipped)


def _choose(folder: Path, infos: list[SeriesInfo], series: str | Iterable[str] | None) -> SeriesInfo:
    wanted = {series} if isinstance(series, str) else set(series or ())
    if wanted and len(infos) > 1:
        found = [s for s in infos if s.uid in wanted]
        if len(found) == 1:
            return found[0]
        held = "; ".join(s.describe() for s in infos)
        if not found:
            raise UserError(f"{folder}: holds no series {' or '.join(sorted(wanted))} (it holds: {held})")
        raise UserError(f"{folder}: holds more than one of the chosen series ({held}); choose one per folder")
    if len(infos) > 1:
        held = "; ".join(s.describe() for s in infos)
        raise UserError(f"{folder}: holds {len(infos)} DICOM series; choose one with --series UID: {held}")
    return infos[0]


def _check_series(folder: Path, info: SeriesInfo, headers: list) -> tuple[list[int], tuple]:
    """Check one series' headers; return the slice order along the normal and (origin, direction, spacing) in LPS."""
    where = f"{folder}: series {info.uid}"
    for ds in headers:
        if _integer(ds, "NumberOfFrames", 1, where) > 1:
            raise UserError(f"{where}: multi-frame DICOM files are not supported ({Path(ds.filename).name} holds "
                            f"{_integer(ds, 'NumberOfFrames', 1, where)} frames); export the series as one file per slice")
        if _integer(ds, "SamplesPerPixel", 1, where) != 1:
            raise UserError(f"{where}: colour images ({_text(ds, 'PhotometricInterpretation') or '?'}) are not a "
                            "grey volume")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise UserError(f"{where}: {Path(ds.filename).name} has no {', '.join(missing)}, so its place in "
                            "the volume is unknown")
    if len(headers) < 2:
        raise UserError(f"{where} has {len(headers)} slice; a volume needs at least 2")
    orientations = np.array([_numbers(ds, "ImageOrientationPatient", 6, where) for ds in headers])
    spacings = np.array([_numbers(ds, "PixelSpacing", 2, where) for ds in headers])
    positions = np.array([_numbers(ds, "ImagePositionPatient", 3, where) for ds in headers])
    for ds, spacing in zip(headers, spacings):
        if not np.all(spacing > 0):
            raise UserError(f"{where}: {Path(ds.filename).name} has PixelSpacing {_fmt(spacing)}; a pixel spacing "
                            "must be positive")
    for ds, o in zip(headers, orientations):
        row, col = o[:3], o[3:]
        if (abs(np.linalg.norm(row) - 1) > UNIT_TOL or abs(np.linalg.norm(col) - 1) > UNIT_TOL
                or abs(float(row @ col)) > UNIT_TOL):
            raise UserError(f"{where}: {Path(ds.filename).name} has ImageOrientationPatient {_fmt(o)}, which is not "
                            "two perpendicular unit vectors; the header is damaged")
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOL:
        kinds = len(np.unique(np.round(orientations, 3), axis=0))
        raise UserError(f"{where} mixes {kinds} slice orientations (ImageOrientationPatient differs between "
                        "slices); a volume has one")
    sizes = {(_integer(ds, "Rows", 0, where), _integer(ds, "Columns", 0, where), *(round(float(v), 4) for v in sp))
             for ds, sp in zip(headers, spacings)}
    if len(sizes) > 1:
        raise UserError(f"{where} mixes slice sizes or pixel spacings ({', '.join(map(str, sorted(sizes)))})")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    if gaps.min() < 1e-3:
        raise UserError(f"{where} has several slices at one position ({along[np.argmin(gaps)]:.2f} mm along the "
                        "normal): it holds more than one volume (echoes, time points, ...)")
    gap = float(np.median(gaps))
    bad = np.nonzero(np.abs(gaps - gap) > GAP_TOL * gap + 1e-3)[0]
    if len(bad):
        k = int(bad[0])
        missing = f", about {round(gaps[k] / gap) - 1} slice(s) missing" if gaps[k] > 1.5 * gap else ""
        raise UserError(f"{where} has uneven slice spacing: a gap of {gaps[k]:.2f} mm at {along[k]:.2f} mm along "
                        f"the normal where the others are {gap:.2f} mm{missing}")
    # Slices must stack along the normal; a tilted stack (gantry tilt) is a sheared volume.
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    if np.linalg.norm(drift, axis=1).max() > max(0.01, 0.01 * gap):
        raise UserError(f"{where}: its slices are not stacked along their normal (gantry tilt); resample it "
                        "onto an orthogonal grid first")
    row_spacing, col_spacing = (float(v) for v in spacings[0])
    direction = np.stack([row, col, normal], axis=1)  # columns: the i, j, k axes in LPS
    return [int(i) for i in order], (positions[0], direction, (col_spacing, row_spacing, gap))


def _files_under(folder: Path) -> Iterable[Path]:
    """Regular, non-hidden files under `folder`, in a stable order, recursively."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name != DICOMDIR:
                yield Path(root) / name


def _dicomdir_files(pydicom, folder: Path) -> list[Path]:
    """The files a DICOMDIR lists (its records' ReferencedFileID, relative to its folder), every one of
    them: a listed file that is not there is refused, never dropped."""
    path = folder / DICOMDIR
    try:
        with quiet():
            records = list(pydicom.dcmread(path).get("DirectoryRecordSequence", []))
            ids = [r.ReferencedFileID for r in records if "ReferencedFileID" in r]
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"{path}: cannot read the DICOMDIR ({type(e).__name__}: {e})") from None
    files = [folder.joinpath(*([str(i)] if isinstance(i, str) else [str(p) for p in i])) for i in ids]
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise UserError(f"{path}: lists {len(absent)} file(s) that are not there (e.g. {absent[0]})")
    return files


def _text(ds, keyword: str) -> str:
    """A header element as text ('' when absent or unreadable)."""
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - a damaged value reads as absent
        return ""


def _numbers(ds, keyword: str, count: int, where: str) -> np.ndarray:
    """The `count` numbers of a header element (ImagePositionPatient, ...), or one line saying what is wrong."""
    name = Path(ds.filename).name
    try:
        with quiet():
            value = ds.get(keyword)
            items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            out = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: {name} has {keyword} '{_raw(ds, keyword)}', which is not {count} numbers; the "
                        "header is damaged") from None
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise UserError(f"{where}: {name} has {keyword} '{_raw(ds, keyword)}', which is not {count} numbers; the "
                        "header is damaged")
    return out


def _integer(ds, keyword: str, default: int, where: str) -> int:
    """An integer header element (NumberOfFrames, Rows, ...), `default` when absent or empty."""
    if keyword not in ds:
        return default
    try:
        with quiet():
            value = ds.get(keyword)
            return default if value in (None, "") else int(str(value).strip())
    except (TypeError, ValueError):
        raise UserError(f"{where}: {Path(ds.filename).name} has {keyword} '{_raw(ds, keyword)}', which is not a "
                        "whole number; the header is damaged") from None


def _raw(ds, keyword: str) -> str:
    """A header value as written, for messages."""
    try:
        value = ds[keyword].value
    except Exception:  # noqa: BLE001
        return "?"
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _fmt(values) -> str:
    return "/".join(f"{float(v):g}" for v in values)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


__all__ = ["DICOMDIR", "is_dicom_folder", "SeriesInfo", "DicomVolume", "list_dicom_series", "read_dicom_series"]
