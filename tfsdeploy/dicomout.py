"""DICOM series out: a fused volume as one series of RGB Secondary Capture images placed in the patient.

Each axial slice of the fused volume becomes one single-frame Secondary Capture Image (SOP class
1.2.840.10008.5.1.4.1.1.7, built with highdicom), RGB, 8 bits a sample, with the Image Plane
attributes (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness) and a Frame of
Reference that place it on the output grid, the grid the NIfTI output of the same fuse has (the README
says why this IOD). A slice is laid out as a scanner lays out an axial slice and a PACS shows it
(radiological convention): rows top to bottom as in the fused picture (anterior first), each row
running towards the subject's left, so the fused picture is mirrored left to right and the slice
normal (row x column) points along the grid's k axis, slices ascending with k. DICOM's patient axes
are LPS, the project's RAS (tfsdeploy.volumes).

Patient and study come from the T1's series when it is DICOM; otherwise the caller names the patient
(or states that there is none) and the series opens a new study. The series gets new Series and SOP
Instance UIDs, keeps the Frame of Reference of the grid's input when that is a DICOM series, and refers
to its sources: each slice names the nearest slice of every DICOM input (SourceImageSequence), and
lists those instances by series and study (ReferencedSeriesSequence, the Common Instance Reference
module).

Needs the optional extra `tfsdeploy[scans]` (pydicom) and `tfsdeploy[dicom]` (highdicom).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tfsdeploy.errors import UserError
from tfsdeploy.volumes import DICOM_EXTRA, import_extra

# RAS <-> LPS: flip the first two world axes.
_FLIP = np.diag([-1.0, -1.0, 1.0])
DICOM_SUFFIX = ".dcm"
MANUFACTURER = "tfsdeploy"
MODEL_NAME = "TFS-Diff"
SERIES_NUMBER = 9001
FUNCTIONAL = {"NM": "SPECT", "PT": "PET"}  # DICOM Modality -> the name a radiologist reads
LABELS = {"t1": "T1", "t2": "T2"}
MAX_LO = 64  # characters of a DICOM LO value (SeriesDescription, PatientID)


@dataclass(frozen=True)
class SourceSeries:
    """One DICOM input: its series and study, and each slice's SOP class, instance and position along
    the slice normal (LPS mm), in the order of the series' files (along the normal)."""

    modality: str  # t1, t2 or func
    series_uid: str
    study_uid: str
    frame_of_reference: str
    normal: tuple[float, float, float]
    slices: tuple[tuple[str, str, float], ...]

    def nearest(self, point_lps: np.ndarray) -> tuple[str, str]:
        """(SOP class, SOP instance) of the slice whose plane lies nearest to `point_lps`."""
        along = float(np.dot(self.normal, point_lps))
        best = min(self.slices, key=lambda s: abs(s[2] - along))
        return best[0], best[1]


@dataclass(frozen=True)
class SeriesPlan:
    """What the series says besides its pixels, settled before any work (`plan_series`).

    reference: the T1's first slice header (pydicom, no pixels) whose patient and study the series
    takes, or None for a NIfTI T1 (then patient_id / patient_name, empty when anonymous, and a new
    study); frame_of_reference: the grid input's, or a new one; derivation: set once the model is loaded.
    """

    reference: object | None
    patient_id: str
    patient_name: str
    study_uid: str
    frame_of_reference: str
    sources: tuple[SourceSeries, ...]
    description: str
    derivation: str = ""
    body_part: str = "BRAIN"

    def with_model(self, settings: str, model: Path | None) -> SeriesPlan:
        """The plan with its DerivationDescription: the series' own words, then how it was made, from
        `settings` (FusionPipeline.describe(): scale, sampler, engine) with the model named by its file and
        folder names only: a path of this machine means nothing in a PACS and may say too much."""
        if model is not None:
            settings = settings.replace(f", model {model}", "") + f", model {model.name} ({model.parent.name})"
        return replace(self, derivation=f"{self.description}, super-resolved and fused from the T1, T2 and "
                                        f"functional series ({settings})")


def plan_series(series: dict, grid: str, scale: int, *, patient_id: str | None = None,
                patient_name: str | None = None, anonymous: bool = False) -> SeriesPlan:
    """The plan of the output series, from the DICOM inputs' series (modality -> tfsdeploy.dicom.SeriesInfo,
    NIfTI inputs absent) and the patient options. Refuses, in one line: patient options beside a DICOM T1,
    a NIfTI T1 with neither a patient nor --anonymous, and DICOM inputs of different patients."""
    pydicom = import_extra("pydicom", "writing a DICOM series")
    import_extra("highdicom", "writing a DICOM series", DICOM_EXTRA)
    from pydicom.uid import generate_uid

    given = [o for o, v in (("--patient-id", patient_id), ("--patient-name", patient_name)) if v is not None]
    headers = {m: [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files] for m, info in series.items()}
    ids = {m: str(h[0].get("PatientID", "")) for m, h in headers.items()}
    if len(set(ids.values())) > 1:
        listed = ", ".join(f"{m} {v!r}" for m, v in ids.items())
        raise UserError(f"the DICOM inputs belong to different patients (PatientID: {listed}); a fused series "
                        "has one patient")
    if "t1" in headers:
        if given or anonymous:
            option = given[0] if given else "--anonymous"
            raise UserError(f"{option} is for a NIfTI T1; the series takes its patient and study from the T1's "
                            "DICOM series")
        first = headers["t1"][0]
        reference, pid, pname, study = first, str(first.get("PatientID", "")), str(first.get("PatientName", "")), \
            str(first.StudyInstanceUID)
    else:
        if anonymous and given:
            raise UserError(f"{given[0]} names a patient and --anonymous says there is none; give one or the other")
        if not anonymous and patient_id is None:
            raise UserError("a DICOM series needs its patient: give --patient-id (and --patient-name) for a NIfTI "
                            "T1, or --anonymous")
        pid, pname = ("", "") if anonymous else (patient_id or "", patient_name or "")
        for option, value in (("--patient-id", pid), ("--patient-name", pname)):
            if len(value) > MAX_LO or any(c in value for c in "\\\r\n\t") or value != value.strip():
                raise UserError(f"{option} {value!r}: at most {MAX_LO} characters, no backslash, control "
                                "character or surrounding space")
        if patient_id is not None and not pid:
            raise UserError("--patient-id is empty; give the patient's ID, or --anonymous")
        reference, study = None, generate_uid()
    sources = tuple(_source(m, info.uid, headers[m]) for m, info in series.items())
    frame = next((s.frame_of_reference for s in sources if s.modality == grid and s.frame_of_reference), None)
    func = FUNCTIONAL.get(str(headers["func"][0].get("Modality", "")), "SPECT") if "func" in headers else "SPECT"
    body = str(headers["t1"][0].get("BodyPartExamined", "")) if "t1" in headers else ""
    return SeriesPlan(reference, pid, pname, study, frame or generate_uid(), sources,
                      f"{MODEL_NAME} x{scale} fusion T1/T2/{func}", body_part=body or "BRAIN")


def _source(modality: str, uid: str, headers: list) -> SourceSeries:
    row_col = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(row_col[:3], row_col[3:])
    slices = tuple((str(h.SOPClassUID), str(h.SOPInstanceUID),
                    float(np.dot(normal, [float(v) for v in h.ImagePositionPatient]))) for h in headers)
    return SourceSeries(modality, uid, str(headers[0].StudyInstanceUID), str(headers[0].get("FrameOfReferenceUID", "")),
                        tuple(float(v) for v in normal), slices)


def slice_pixels(rgb: np.ndarray) -> np.ndarray:
    """uint8 [3,h,w] fused slice -> the DICOM slice's [rows, columns, 3]: pixel (r, c) is voxel
    (w-1-c, h-1-r) of the grid (the fused picture holds voxel (c, h-1-r) at (r, c))."""
    return np.ascontiguousarray(rgb.transpose(1, 2, 0)[:, ::-1])


def slice_geometry(affine: np.ndarray, h: int, w: int, k: int) -> dict:
    """The Image Plane attributes of slice k of the series (pixel (r, c) = voxel (w-1-c, h-1-r, k), see
    slice_pixels) on the grid of RAS voxel-to-world `affine`.

    Returns LPS position of the first pixel's centre, row and column direction cosines, PixelSpacing
    (between rows, between columns) and the slice thickness, all in mm."""
    affine = np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = -(_FLIP @ affine[:3, 0]) / spacing[0]  # along a row: i falls
    col_dir = -(_FLIP @ affine[:3, 1]) / spacing[1]  # down the picture: j falls
    first = affine @ np.array([w - 1.0, h - 1.0, float(k), 1.0])  # row 0, column 0
    return {"position": _FLIP @ first[:3], "orientation": np.concatenate([row_dir, col_dir]),
            "pixel_spacing": (float(spacing[1]), float(spacing[0])), "thickness": float(spacing[2])}


def _orientation_letters(direction: np.ndarray) -> str:
    """The patient-orientation letters of an LPS direction (its dominant axes, largest first)."""
    letters = ""
    for axis in np.argsort(-np.abs(direction)):
        if abs(direction[axis]) > 1e-3 and len(letters) < 3:
            letters += ("LR", "PA", "HF")[axis][0 if direction[axis] > 0 else 1]
    return letters


def _ds(value: float) -> str:
    """A DS value (at most 16 characters) that holds `value` as closely as the format allows."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_series(folder: Path, fused: np.ndarray, affine: np.ndarray, plan: SeriesPlan) -> list[str]:
    """Write uint8 [N,3,h,w] fused slices into the new folder `folder` as one DICOM series; returns the file
    names (IM0001.dcm ... in slice order). `affine`: the RAS voxel-to-world affine of the output grid."""
    import_extra("pydicom", "writing a DICOM series")
    hd = import_extra("highdicom", "writing a DICOM series", DICOM_EXTRA)
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    import tfsdeploy

    n, _, h, w = fused.shape
    series_uid = generate_uid()
    now = datetime.datetime.now()
    folder.mkdir()
    names = []
    for k in range(n):
        geo = slice_geometry(affine, h, w, k)
        orient = (_orientation_letters(geo["orientation"][:3]), _orientation_letters(geo["orientation"][3:]))
        common = dict(pixel_array=slice_pixels(fused[k]), photometric_interpretation="RGB",
                      bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
                      series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=k + 1,
                      manufacturer=MANUFACTURER, pixel_spacing=tuple(float(_ds(v)) for v in geo["pixel_spacing"]),
                      patient_orientation=orient, transfer_syntax_uid="1.2.840.10008.1.2.1")
        if plan.reference is not None:
            ds = hd.sc.SCImage.from_ref_dataset(plan.reference, **common)
        else:
            ds = hd.sc.SCImage(study_instance_uid=plan.study_uid, patient_id=plan.patient_id,
                               patient_name=plan.patient_name, study_date=now.date(), study_time=now.time(),
                               **common)
        ds.ManufacturerModelName = MODEL_NAME
        ds.SoftwareVersions = f"tfsdeploy {tfsdeploy.__version__}"
        ds.ImageType = ["DERIVED", "SECONDARY", "FUSION"]
        ds.SeriesDescription = plan.description
        ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.BodyPartExamined = plan.body_part
        ds.BurnedInAnnotation = "NO"
        ds.DerivationDescription = plan.derivation or plan.description
        ds.ImagePositionPatient = [_ds(v) for v in geo["position"]]
        ds.ImageOrientationPatient = [_ds(v) for v in geo["orientation"]]
        ds.SliceThickness = _ds(geo["thickness"])
        ds.SliceLocation = _ds(float(np.dot(np.cross(geo["orientation"][:3], geo["orientation"][3:]),
                                            geo["position"])))
        ds.FrameOfReferenceUID = plan.frame_of_reference
        ds.PositionReferenceIndicator = ""
        _add_references(ds, plan, geo, h, w, Dataset, Sequence)
        name = f"IM{k + 1:04d}{DICOM_SUFFIX}"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    return names


def _add_references(ds, plan: SeriesPlan, geo: dict, h: int, w: int, Dataset, Sequence) -> None:
    """SourceImageSequence: the nearest slice of each DICOM input to this slice's centre; the Common
    Instance Reference module lists them by series, and by study for those of other studies."""
    if not plan.sources:
        return
    row, col = geo["orientation"][:3], geo["orientation"][3:]
    centre = geo["position"] + row * geo["pixel_spacing"][1] * (w - 1) / 2 + col * geo["pixel_spacing"][0] * (h - 1) / 2
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    sources, by_study = [], {}
    for src in plan.sources:
        sop_class, sop_uid = src.nearest(centre)
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        item.PurposeOfReferenceCodeSequence = Sequence([purpose])
        sources.append(item)
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
        series = Dataset()
        series.SeriesInstanceUID = src.series_uid
        series.ReferencedInstanceSequence = Sequence([ref])
        by_study.setdefault(src.study_uid, []).append(series)
    ds.SourceImageSequence = Sequence(sources)
    own = by_study.pop(str(ds.StudyInstanceUID), [])
    if own:
        ds.ReferencedSeriesSequence = Sequence(own)
    if by_study:
        others = []
        for study_uid, series_items in by_study.items():
            study = Dataset()
            study.StudyInstanceUID = study_uid
            study.ReferencedSeriesSequence = Sequence(series_items)
            others.append(study)
        ds.StudiesContainingOtherReferencedInstancesSequence = Sequence(others)


__all__ = ["SourceSeries", "SeriesPlan", "plan_series", "slice_geometry", "write_series", "DICOM_SUFFIX"]
