"""Scans as they come from the scanner: DICOM series, volumes on different grids, rigid registration.

The DICOM series are written here with pydicom from the SPM templates; the expected geometry of each is
worked out from the affine it was written from, and the resampling is checked against
nibabel.processing (scipy), an implementation independent of SimpleITK.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
pydicom = pytest.importorskip("pydicom", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")

from nibabel.processing import resample_from_to  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from tfsdeploy.data.spm import SPM_MEMBERS, SPM_PREFIX, spm_archive  # noqa: E402
from tfsdeploy.dicom import is_dicom_folder, list_dicom_series, read_dicom_series  # noqa: E402
from tfsdeploy.errors import UserError  # noqa: E402
from tfsdeploy.volumes import (  # noqa: E402
    RegisterConfig, Registration, brain_box, check_overlap, check_plausible, onto_grid, register_rigid,
    register_volumes, resample_onto, save_transforms,
    world_extent_of_box)

EXTRA = "pip install 'tfsdeploy[scans]'"
FLIP = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def spm() -> dict[str, nib.Nifti1Image]:
    """SPM T1, T2 and SPECT templates (2 mm, 91x109x91), canonical RAS, data in memory."""
    with zipfile.ZipFile(spm_archive()) as z:
        out = {}
        for key in ("t1", "t2", "spect"):
            img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(z.read(SPM_PREFIX + SPM_MEMBERS[key])))
            out[key] = nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine)
    return out


def rigid(rot_deg, shift_mm, center) -> np.ndarray:
    """4x4 RAS: rotate by Rz @ Rx @ Ry (degrees about R, A, S) around `center`, then shift."""
    ax, ay, az = np.radians(rot_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ ry
    m[:3, 3] = np.asarray(center) + np.asarray(shift_mm) - m[:3, :3] @ np.asarray(center)
    return m


def on_grid(img, shape, affine) -> nib.Nifti1Image:
    """`img` resampled by nibabel.processing (scipy, trilinear) onto another grid."""
    out = resample_from_to(img, (shape, affine), order=1, cval=0.0)
    return nib.Nifti1Image(out.get_fdata(dtype=np.float32), affine)


def write_series(img, folder: Path, description: str, names: list[str] | None = None, reverse: bool = False,
                 series_uid: str | None = None, number: int = 1) -> tuple[list[Dataset], np.ndarray]:
    """Write `img` (right-handed, orthogonal axes) as a DICOM series of its k-slices into `folder`.

    names: file name of each slice k (default IM0000.dcm ...); reverse: instance numbers run against the
    slice positions, as in a feet-first acquisition. Returns the datasets and the voxel values as stored
    (quantised to int16 through RescaleSlope / RescaleIntercept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    affine = np.asarray(img.affine, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row, col = (FLIP @ affine[:3, i] / spacing[i] for i in (0, 1))
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / 30000 or 1.0
    stored = np.round((data - lo) / slope).astype(np.int16)
    study, series_uid = generate_uid(), series_uid or generate_uid()
    nz = data.shape[2]
    names = names or [f"IM{k:04d}.dcm" for k in range(nz)]
    written = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.StudyID = "Template^SPM", "SPM152", "1"
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SeriesDescription, ds.SeriesNumber, ds.Modality = description, number, "MR"
        ds.InstanceNumber = nz - k if reverse else k + 1
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in FLIP @ (affine[:3, :3] @ [0, 0, k] + affine[:3, 3])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows, between columns
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{lo:.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()  # [row, column]
        ds.save_as(folder / names[k], enforce_file_format=True)
        written.append(ds)
    values = stored.astype(np.float64) * float(f"{slope:.10g}") + float(f"{lo:.10g}")
    return written, values


def oblique_grid(img, voxel: float, rot_deg=(10.0, 0.0, 0.0)) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid of `voxel` mm covering `img`'s field of view, turned by `rot_deg` around its centre."""
    box = world_extent_of_box(img, np.array([[-0.5, n - 0.5] for n in img.shape[:3]]))
    center = box.mean(axis=1)
    shape = tuple(int(math.ceil((hi - lo) / voxel)) for lo, hi in box)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = center - voxel * (np.array(shape) - 1) / 2
    return shape, rigid(rot_deg, (0, 0, 0), center) @ affine


@pytest.fixture(scope="module")
def t1_series(spm, tmp_path_factory):
    """The T1 template as a 2 mm axial series whose file names and instance numbers are shuffled."""
    folder = tmp_path_factory.mktemp("t1_dicom")
    nz = spm["t1"].shape[2]
    perm = np.random.default_rng(0).permutation(nz)
    datasets, values = write_series(spm["t1"], folder, "T1 template", names=[f"{p:04d}.dcm" for p in perm])
    for ds, p in zip(datasets, perm):  # instance numbers no more ordered than the names
        ds.InstanceNumber = int(p) + 1
    return folder, values


@pytest.fixture(scope="module")
def t2_series(spm, tmp_path_factory):
    """The T2 template resampled onto an oblique 3 mm grid, written feet-first (instance numbers descending)."""
    shape, affine = oblique_grid(spm["t2"], 3.0)
    img = on_grid(spm["t2"], shape, affine)
    folder = tmp_path_factory.mktemp("t2_dicom")
    _, values = write_series(img, folder, "T2 oblique 3 mm", reverse=True, number=2)
    return folder, values, affine


# --------------------------------------------------------------------------- DICOM series


def test_series_with_shuffled_names_reads_with_its_geometry(spm, t1_series):
    folder, values = t1_series
    assert is_dicom_folder(folder)
    vol = read_dicom_series(folder)
    assert vol.series.slices == spm["t1"].shape[2] and vol.skipped == 0
    assert vol.image.shape == spm["t1"].shape
    np.testing.assert_allclose(vol.image.affine, spm["t1"].affine, atol=1e-4)
    np.testing.assert_allclose(vol.image.get_fdata(), values, atol=1e-3 * np.abs(values).max())
    # Slices are in place: slice k is the template's slice k, whatever its file is called.
    assert np.corrcoef(vol.image.get_fdata().ravel(), spm["t1"].get_fdata().ravel())[0, 1] > 0.9999


def test_oblique_series_with_another_spacing_reads_with_its_geometry(t2_series):
    folder, values, affine = t2_series
    vol = read_dicom_series(folder)
    np.testing.assert_allclose(np.linalg.norm(vol.image.affine[:3, :3], axis=0), [3.0, 3.0, 3.0], atol=1e-5)
    np.testing.assert_allclose(vol.image.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.image.get_fdata(), values, atol=1e-3 * np.abs(values).max())
    assert "T2 oblique 3 mm" in vol.describe() and "3.00x3.00x3.00 mm" in vol.describe()


def dicomdir_media(spm, tmp_path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A small T1 series written as media with a DICOMDIR into tmp_path/media: (its image, its values)."""
    from pydicom.fileset import FileSet

    small = nib.Nifti1Image(spm["t1"].get_fdata(dtype=np.float32)[::3, ::3, 30:40], spm["t1"].affine @ np.diag([3, 3, 1, 1]))
    datasets, values = write_series(small, tmp_path / "loose", "T1 small")
    fs = FileSet()
    for ds in datasets:
        fs.add(ds)
    fs.write(tmp_path / "media")
    return small, values


def test_dicomdir_is_followed(spm, tmp_path):
    small, values = dicomdir_media(spm, tmp_path)
    assert (tmp_path / "media" / "DICOMDIR").is_file()
    vol = read_dicom_series(tmp_path / "media")
    np.testing.assert_allclose(vol.image.affine, small.affine, atol=1e-4)
    np.testing.assert_allclose(vol.image.get_fdata(), values, atol=1e-3 * np.abs(values).max())


def test_folder_with_two_series_is_refused_with_a_list_then_one_is_chosen(spm, tmp_path):
    small = nib.Nifti1Image(spm["t1"].get_fdata(dtype=np.float32)[::4, ::4, 40:46], spm["t1"].affine)
    write_series(small, tmp_path / "a", "first", series_uid="1.2.826.0.1.1", number=1)
    write_series(small, tmp_path / "b", "second", series_uid="1.2.826.0.1.2", number=2)
    with pytest.raises(UserError) as e:
        read_dicom_series(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "2 DICOM series" in msg and "--series UID" in msg
    assert "1.2.826.0.1.1 'first' (MR, 6 slices)" in msg and "1.2.826.0.1.2 'second' (MR, 6 slices)" in msg
    assert read_dicom_series(tmp_path, series="1.2.826.0.1.2").series.description == "second"
    # Several UIDs (one per input of a command): the one this folder holds is taken.
    assert read_dicom_series(tmp_path, series=["9.9", "1.2.826.0.1.1"]).series.description == "first"
    with pytest.raises(UserError, match="holds no series 9.9"):
        read_dicom_series(tmp_path, series="9.9")
    assert [s.uid for s in list_dicom_series(tmp_path)[0]] == ["1.2.826.0.1.1", "1.2.826.0.1.2"]


@pytest.fixture
def small_series(spm, tmp_path):
    small = nib.Nifti1Image(spm["t1"].get_fdata(dtype=np.float32)[::4, ::4, 30:40], spm["t1"].affine)
    write_series(small, tmp_path / "s", "small")
    return tmp_path / "s"


def one_line_error(folder, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        read_dicom_series(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_slice_is_refused(small_series):
    (small_series / "IM0004.dcm").unlink()
    msg = one_line_error(small_series, "uneven slice spacing")
    assert "gap of 4.00 mm" in msg and "2.00 mm" in msg and "1 slice(s) missing" in msg


def test_mixed_orientations_are_refused(small_series):
    ds = pydicom.dcmread(small_series / "IM0003.dcm")
    ds.ImageOrientationPatient = ["-1", "0", "0", "0", "0", "-1"]  # a coronal slice among axial ones
    ds.save_as(small_series / "IM0003.dcm")
    one_line_error(small_series, "mixes 2 slice orientations")


def test_empty_and_non_dicom_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "the folder is empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image\n" * 20)
    assert not is_dicom_folder(tmp_path / "text")
    one_line_error(tmp_path / "text", r"no DICOM images in its 1 file\(s\) \(e.g. notes.txt\)")
    one_line_error(tmp_path / "absent", "no such folder")


def test_stray_files_beside_a_series_are_skipped(small_series):
    (small_series / "README.txt").write_text("exported\n")
    vol = read_dicom_series(small_series)
    assert vol.series.slices == 10 and vol.skipped == 1


def patch_header(path: Path, keyword: str, text: str) -> None:
    """Overwrite the value of `keyword` in the file as written, bytes for bytes (the element keeps its
    length, so `text` may be what no writer would write: 'abc' for a number, 5 values for 6)."""
    raw = pydicom.dcmread(path)._dict[pydicom.datadict.tag_for_keyword(keyword)]
    new = text.encode("ascii").ljust(raw.length)
    assert len(new) == raw.length, f"{text!r} does not fit in {raw.length} bytes"
    data = bytearray(path.read_bytes())
    data[raw.value_tell:raw.value_tell + raw.length] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("keyword, text, message", [
    ("PixelSpacing", "abc", "has PixelSpacing 'abc', which is not 2 numbers"),
    ("PixelSpacing", "2", "has PixelSpacing '2', which is not 2 numbers"),
    ("PixelSpacing", "0\\0", "has PixelSpacing 0/0; a pixel spacing must be positive"),
    ("PixelSpacing", "-2\\-2", "has PixelSpacing -2/-2; a pixel spacing must be positive"),
    ("ImagePositionPatient", "a\\b\\c", "has ImagePositionPatient 'a\\b\\c', which is not 3 numbers"),
    ("ImageOrientationPatient", "1\\0\\0\\0\\1", "has ImageOrientationPatient '1\\0\\0\\0\\1', which is not 6 numbers"),
    ("ImageOrientationPatient", "2\\0\\0\\0\\1\\0", "which is not two perpendicular unit vectors"),
    ("ImageOrientationPatient", "0\\0\\0\\0\\0\\0", "which is not two perpendicular unit vectors"),
    ("ImageOrientationPatient", "1\\0\\0\\1\\0\\0", "which is not two perpendicular unit vectors"),
    ("NumberOfFrames", "x", "has NumberOfFrames 'x', which is not a whole number"),
])
def test_damaged_headers_are_one_line(small_series, keyword, text, message):
    if keyword == "NumberOfFrames":
        ds = pydicom.dcmread(small_series / "IM0003.dcm")
        ds.NumberOfFrames = 1
        ds.save_as(small_series / "IM0003.dcm")
    patch_header(small_series / "IM0003.dcm", keyword, text)
    msg = one_line_error(small_series, re.escape(message))
    assert "IM0003.dcm" in msg and "gantry tilt" not in msg


def test_a_damaged_series_number_only_orders_the_list(small_series):
    patch_header(small_series / "IM0000.dcm", "SeriesNumber", "x")
    assert read_dicom_series(small_series).series.slices == 10


def test_images_without_a_series_uid_are_named_as_such(small_series):
    for f in small_series.iterdir():
        ds = pydicom.dcmread(f)
        del ds.SeriesInstanceUID
        ds.save_as(f)
    one_line_error(small_series, r"its 10 DICOM image\(s\) have no SeriesInstanceUID \(e.g. IM0000.dcm\)")


def test_a_multi_frame_file_is_named_as_such_not_as_one_slice(small_series):
    for f in sorted(small_series.iterdir())[1:]:
        f.unlink()
    ds = pydicom.dcmread(small_series / "IM0000.dcm")
    ds.NumberOfFrames = 10
    ds.save_as(small_series / "IM0000.dcm")
    msg = one_line_error(small_series, "multi-frame DICOM files are not supported")
    assert "IM0000.dcm holds 10 frames" in msg and "1 slice" not in msg


def test_a_dicomdir_listing_a_missing_file_is_refused(spm, tmp_path):
    dicomdir_media(spm, tmp_path)
    listed = sorted(p for p in (tmp_path / "media").rglob("*") if p.is_file() and p.name != "DICOMDIR")
    listed[4].unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no reader's warning on the way
        msg = one_line_error(tmp_path / "media", r"DICOMDIR: lists 1 file\(s\) that are not there")
    assert listed[4].name in msg


def test_a_series_beside_many_other_files_is_still_a_series(small_series):
    for k in range(20):
        (small_series / f"A{k:02d}_notes.txt").write_text("notes\n")  # sort before IM0000.dcm
    (small_series / "preview.png").write_bytes(b"not opened")
    assert is_dicom_folder(small_series)
    assert read_dicom_series(small_series).series.slices == 10


def test_undecodable_pixels_are_one_line_without_the_decoders_chatter(small_series, capfd):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    for f in small_series.iterdir():
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([b"\xff\xd8garbage" * 10])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    capfd.readouterr()
    msg = one_line_error(small_series, r"cannot read the pixels of series [\d.]+ \(Failed to change")
    assert "ITK ERROR" not in msg
    assert capfd.readouterr().err == ""  # libjpeg's line per slice ("Corrupt JPEG data ...") is not shown


def test_a_successful_read_shows_no_reader_warnings(spm, tmp_path):
    # A UID with letters in it, which pydicom reads with a warning per file; the series is fine.
    small = nib.Nifti1Image(spm["t1"].get_fdata(dtype=np.float32)[::4, ::4, 30:34], spm["t1"].affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_series(small, tmp_path / "s", "odd uid", series_uid="1.2.840.10008.abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_dicom_series(tmp_path / "s").series.uid == "1.2.840.10008.abc"


# --------------------------------------------------------------------------- grids


def test_volumes_on_different_grids_go_onto_the_reference_grid(spm, t1_series):
    t1 = read_dicom_series(t1_series[0]).image
    shape, affine = oblique_grid(spm["spect"], 4.0, rot_deg=(0.0, 0.0, 0.0))
    spect4 = on_grid(spm["spect"], shape, affine)
    images = {"t1": t1, "t2": spm["t2"], "func": spect4}
    fractions = check_overlap(images, "t1")
    assert fractions["t2"] == 1.0 and fractions["func"] > 0.99
    out, lines = onto_grid(images, "t1", labels={"t1": "t1/", "t2": "t2.nii", "func": "spect.nii"})
    assert out["t1"] is t1 and out["t2"] is spm["t2"]  # already on the grid: left as it is
    assert len(lines) == 1 and lines[0].startswith("resampled spect.nii from ")
    assert f"{'x'.join(map(str, shape))} of 4.00x4.00x4.00 mm onto t1/'s grid (91x109x91 of 2.00x2.00x2.00 mm)" in lines[0]
    assert out["func"].shape == t1.shape
    np.testing.assert_allclose(out["func"].affine, t1.affine)
    # The same points, interpolated by scipy: equal wherever the reference voxel lies inside the SPECT grid.
    expected = resample_from_to(spect4, t1, order=1).get_fdata()
    ijk = np.moveaxis(np.indices(t1.shape), 0, -1).reshape(-1, 3)
    theirs = (np.linalg.inv(affine) @ t1.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    inside = np.all((theirs > 0.01) & (theirs < np.array(shape) - 1.01), axis=1).reshape(t1.shape)
    assert inside.mean() > 0.5
    got = out["func"].get_fdata()
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-4 * np.abs(expected).max())


def test_resampling_through_a_rotated_lps_grid_matches_scipy(spm):
    # A radiological (LAS, left-handed) grid turned about all three axes: every sign of the RAS <-> LPS flip shows.
    shape, affine = oblique_grid(spm["t2"], 2.5, rot_deg=(7.0, -5.0, 12.0))
    affine = affine @ np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] += affine[:3, 0] * -(shape[0] - 1)
    moving = on_grid(spm["t2"], shape, affine)
    got = resample_onto(moving, spm["t1"]).get_fdata()
    expected = resample_from_to(moving, spm["t1"], order=1).get_fdata()
    core = (slice(20, 70), slice(20, 90), slice(20, 70))
    np.testing.assert_allclose(got[core], expected[core], atol=1e-4 * np.abs(expected).max())


def test_volumes_that_do_not_overlap_are_refused(spm):
    far = nib.Nifti1Image(spm["spect"].get_fdata(dtype=np.float32), spm["spect"].affine.copy())
    far.affine[0, 3] += 500.0
    far = nib.Nifti1Image(far.get_fdata(dtype=np.float32), np.array(far.affine))
    with pytest.raises(UserError) as e:
        check_overlap({"t1": spm["t1"], "func": far}, "t1", labels={"t1": "t1.nii", "func": "spect.nii"})
    msg = str(e.value)
    assert "\n" not in msg and "spect.nii and t1.nii do not overlap in world space" in msg
    assert "t1.nii: x -91..91, y -127..91, z -73..109 mm" in msg and "spect.nii: x 409..591" in msg


def test_a_volume_covering_too_little_of_the_brain_is_refused(spm):
    box = world_extent_of_box(spm["t1"], brain_box(spm["t1"]))
    fov = world_extent_of_box(spm["spect"], np.array([[-0.5, n - 0.5] for n in spm["spect"].shape]))
    shifted = spm["spect"].affine.copy()
    # The SPECT's left edge moved to 70 % of the way across the T1's brain box: it covers the last 30 %.
    shifted[0, 3] += box[0, 0] + 0.7 * (box[0, 1] - box[0, 0]) - fov[0, 0]
    img = nib.Nifti1Image(spm["spect"].get_fdata(dtype=np.float32), shifted)
    with pytest.raises(UserError, match=r"func covers only (\d+) % of t1's brain box .* at least 50 % is needed") as e:
        check_overlap({"t1": spm["t1"], "func": img}, "t1")
    assert 27 <= int(re.search(r"only (\d+) %", str(e.value)).group(1)) <= 33 and "\n" not in str(e.value)


# --------------------------------------------------------------------------- registration


def test_registration_recovers_a_known_rotation_and_shift(spm, tmp_path):
    box = world_extent_of_box(spm["t1"], brain_box(spm["t1"]))
    center = box.mean(axis=1)
    motion = rigid((4.0, -3.0, 6.0), (5.0, -4.0, 3.0), center)
    # The T2 moved by `motion`: the anatomy at p now lies at motion(p). Its grid moves with it (exact, no resampling).
    moved = nib.Nifti1Image(spm["t2"].get_fdata(dtype=np.float32), motion @ spm["t2"].affine)
    reg = register_rigid(spm["t1"], moved)
    # The registration maps a T1 point to the moved T2's point: it should be `motion` itself. Errors: the
    # angle of the residual rotation, and the residual shift of the brain's centre (the rotation centre).
    # The unmoved templates themselves sit about 0.5 mm and 0.2 degrees apart at the metric's optimum.
    residual = np.linalg.inv(motion) @ reg.matrix()
    angle = math.degrees(math.acos(np.clip((np.trace(residual[:3, :3]) - 1) / 2, -1, 1)))
    shift = np.linalg.norm(residual[:3, :3] @ center + residual[:3, 3] - center)
    assert angle < 1.0 and shift < 1.0, (angle, shift, reg.describe_transform())
    assert reg.metric < reg.metric_start
    np.testing.assert_allclose(reg.rotation_deg, (4.0, -3.0, 6.0), atol=1.0)
    # Resampled through the registration, the moved T2 is back in the T1's place.
    back = resample_onto(moved, spm["t1"], reg).get_fdata()
    assert np.corrcoef(back.ravel(), spm["t2"].get_fdata().ravel())[0, 1] > 0.98
    # The .tfm file ITK writes reads back as the same transform.
    import SimpleITK as sitk

    paths = save_transforms(tmp_path / "tfm", {"t2": reg}, "t1")
    assert [p.name for p in paths] == ["t2_to_t1.tfm"] and not list((tmp_path / "tfm").glob(".*"))
    again = sitk.ReadTransform(str(paths[0]))
    point = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(again.TransformPoint(point), reg.itk_transform().TransformPoint(point), atol=1e-6)
    assert "Mattes mutual information" in reg.describe_metric() and "deg about R/A/S" in reg.describe_transform()


def test_registration_parameters_are_the_ras_matrix():
    import SimpleITK as sitk

    t = sitk.Euler3DTransform((3.0, -2.0, 1.0), 0.1, -0.2, 0.3, (1.0, 2.0, -3.0))
    reg = Registration.from_itk(t, metric_start=0.0, metric=0.0, iterations=0, seconds=0.0, stop="")
    flip = np.diag([-1.0, -1.0, 1.0])
    p_ras = np.array([12.0, -7.0, 25.0])
    q_lps = np.asarray(t.TransformPoint(tuple(flip @ p_ras)))
    np.testing.assert_allclose((reg.matrix() @ np.r_[p_ras, 1])[:3], flip @ q_lps, atol=1e-9)
    np.testing.assert_allclose(reg.matrix(), rigid(reg.rotation_deg, reg.translation_mm, reg.center_mm), atol=1e-9)


def coarse(img, step: int = 2) -> nib.Nifti1Image:
    """Every `step`-th voxel of `img` (a grid `step` times coarser over the same field of view): small,
    fast volumes for the registration tests."""
    affine = img.affine @ np.diag([step, step, step, 1.0])
    return nib.Nifti1Image(np.ascontiguousarray(img.get_fdata(dtype=np.float32)[::step, ::step, ::step]), affine)


def brain_centre(img) -> np.ndarray:
    return world_extent_of_box(img, brain_box(img)).mean(axis=1)


def motion_error(truth: np.ndarray, reg: Registration, center: np.ndarray) -> tuple[float, float]:
    """(angle in degrees, shift of `center` in mm) of the residual truth^-1 @ reg."""
    residual = np.linalg.inv(truth) @ reg.matrix()
    angle = math.degrees(math.acos(np.clip((np.trace(residual[:3, :3]) - 1) / 2, -1, 1)))
    return angle, float(np.linalg.norm(residual[:3, :3] @ center + residual[:3, 3] - center))


def test_registration_is_repeatable_on_every_run_and_thread_count(spm):
    import SimpleITK as sitk

    t1, spect = coarse(spm["t1"]), coarse(spm["spect"])
    motion = rigid((3.0, -2.0, 4.0), (4.0, -3.0, 2.0), brain_centre(t1))
    spect = nib.Nifti1Image(spect.get_fdata(dtype=np.float32), motion @ spect.affine)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        found = []
        for threads in (1, 2, 2, 1):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            found.append(register_rigid(t1, spect))
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1  # the caller's setting is left alone
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert {(r.itk_parameters, r.metric_start, r.metric) for r in found} == {
        (found[0].itk_parameters, found[0].metric_start, found[0].metric)}
    assert found[0].moved and found[0].metric < found[0].metric_start
    with pytest.raises(ValueError, match="seed"):
        RegisterConfig(seed=0)


def test_a_fit_no_better_than_the_start_keeps_the_headers_placement(spm):
    # The T2 is in place already; one huge first step throws the fit off, and its metric is worse.
    t1, t2 = coarse(spm["t1"]), coarse(spm["t2"])
    config = RegisterConfig(step_mm=40.0, iterations=1, shrink=(1,), smooth=(0.0,), max_rotation_deg=180.0,
                            max_shift_mm=500.0)
    reg = register_rigid(t1, t2, config, label="t2.nii")
    assert not reg.moved and reg.metric >= reg.metric_start
    np.testing.assert_allclose(reg.matrix(), np.eye(4), atol=1e-12)
    line = reg.describe_metric()
    assert line.startswith("kept the headers' placement: the fit's Mattes mutual information") and "\n" not in line


def test_an_implausible_fit_is_refused_unless_the_bound_is_raised(spm):
    t1, t2 = coarse(spm["t1"]), coarse(spm["t2"])
    center = brain_centre(t1)
    motion = rigid((0.0, 0.0, 0.0), (0.0, 36.0, 0.0), center)  # 36 mm: beyond the default 30 mm
    far = nib.Nifti1Image(t2.get_fdata(dtype=np.float32), motion @ t2.affine)
    with pytest.raises(UserError) as e:
        register_rigid(t1, far, label="t2.nii", fixed_label="t1.nii")
    msg = str(e.value)
    assert re.fullmatch(r"registering t2.nii to t1.nii gave a shift of 3[5-7]\.\d mm \(the bound is 30\), too far for "
                        r"scans of one subject; check the headers, or raise --max-rotation / --max-shift if the "
                        r"motion is real", msg), msg
    reg = register_rigid(t1, far, RegisterConfig(max_shift_mm=40.0))
    angle, shift = motion_error(motion, reg, center)
    assert angle < 1.0 and shift < 1.5, (angle, shift)
    # A rotation beyond its bound, as check_plausible sees it (Euler angles about R, A, S).
    import SimpleITK as sitk

    turned = Registration.from_itk(sitk.Euler3DTransform((0.0, 0.0, 0.0), math.radians(25.0), 0.0, 0.0),
                                   metric_start=0.0, metric=-1.0, iterations=1, seconds=0.0, stop="")
    with pytest.raises(UserError, match=r"gave a rotation of 25.0 deg \(the bound is 20\)"):
        check_plausible(turned, RegisterConfig(), "spect.nii", "t1.nii")
    check_plausible(turned, RegisterConfig(max_rotation_deg=30.0), "spect.nii", "t1.nii")


def test_grid_func_registers_through_the_t1(spm):
    # --grid func: the SPECT is the reference grid; the T1 and T2 are moved together. Each volume is
    # fitted to the T1, and the T1's and T2's transforms onto the SPECT's grid are derived from the
    # SPECT's fit, so both land where the motion put them.
    t1, t2, spect = coarse(spm["t1"]), coarse(spm["t2"]), coarse(spm["spect"])
    center = brain_centre(t1)
    motion = rigid((-6.0, 4.0, 5.0), (6.0, 8.0, -5.0), center)
    images = {"t1": nib.Nifti1Image(t1.get_fdata(dtype=np.float32), motion @ t1.affine),
              "t2": nib.Nifti1Image(t2.get_fdata(dtype=np.float32), motion @ t2.affine), "func": spect}
    regs, lines = register_volumes(images, "func")
    assert set(regs) == {"t1", "t2"}
    for key in ("t1", "t2"):
        angle, shift = motion_error(motion, regs[key], center)
        assert angle < 2.5 and shift < 3.0, (key, angle, shift)
    assert lines[0].startswith("registered t2 to t1: Mattes") and lines[2].startswith("registered func to t1: ")
    assert lines[-1].startswith("t2 -> func (through t1): rotation")


# --------------------------------------------------------------------------- the extra


@pytest.mark.parametrize("module", ["SimpleITK", "pydicom"])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, small_series, spm):
    monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if it were not installed
    with pytest.raises(UserError) as e:
        read_dicom_series(small_series)
    assert str(e.value) == f"reading DICOM series needs {module}, which is not installed: {EXTRA}"
    if module == "SimpleITK":
        with pytest.raises(UserError, match=re.escape(f"resampling volumes needs SimpleITK, which is not installed: {EXTRA}")):
            resample_onto(spm["spect"], spm["t1"])
        with pytest.raises(UserError, match="registration needs SimpleITK"):
            register_rigid(spm["t1"], spm["t2"])
