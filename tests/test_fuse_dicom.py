"""`fuse` on scans as they come from the scanner, end to end through the CLI: a DICOM series beside NIfTI
volumes on other grids, optional registration, and the ways such input is refused.

The series are written with pydicom from the SPM templates (tests/test_dicom_grids.py has the writer);
the fused volume of the wiring is compared with the fuse of the same volumes resampled beforehand by
nibabel.processing (scipy), an implementation independent of SimpleITK.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
pydicom = pytest.importorskip("pydicom", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")

from nibabel.processing import resample_from_to  # noqa: E402
from test_dicom_grids import oblique_grid, on_grid, rigid, spm, write_series  # noqa: E402, F401

from tfsdeploy.cli import app  # noqa: E402
from tfsdeploy.volumes import world_extent  # noqa: E402

runner = CliRunner()
EXTRA = "pip install 'tfsdeploy[scans]'"
SLICES = slice(36, 52)  # 16 axial slices of the T1 template: a quick fuse
MOTION = ((3.0, -2.0, 4.0), (4.0, -3.0, 2.0))  # degrees about R/A/S, mm along R/A/S


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def fast(model) -> list[str]:
    return ["--model", str(model), "--engine", "torch", "--scale", "4", "--size", "64", "--steps", "1",
            "--no-progress"]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(root: Path, *args) -> str:
    """The command ends in exactly one `error:` line, exit 2, and leaves `root` exactly as it was."""
    before = hashes(root)
    res = cli(*args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert hashes(root) == before, sorted(set(hashes(root)) ^ set(before))
    return lines[0]


def t1_crop(spm) -> nib.Nifti1Image:
    """16 axial slices of the 2 mm T1 template, with the affine that places them."""
    t1 = spm["t1"]
    affine = t1.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, SLICES.start], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(t1.get_fdata(dtype=np.float32)[:, :, SLICES], affine)


@pytest.fixture(scope="module")
def scanner(spm, tmp_path_factory):
    """A DICOM T1 series (shuffled names), a NIfTI T2 on an oblique 3 mm grid and a 4 mm SPECT."""
    root = tmp_path_factory.mktemp("scanner")
    t1 = t1_crop(spm)
    perm = np.random.default_rng(1).permutation(t1.shape[2])
    _, t1_values = write_series(t1, root / "t1_dicom", "T1 axial", names=[f"{p:03d}.dcm" for p in perm])
    shape, affine = oblique_grid(spm["t2"], 3.0)
    nib.save(on_grid(spm["t2"], shape, affine), root / "t2.nii.gz")
    shape, affine = oblique_grid(spm["spect"], 4.0, rot_deg=(0.0, 0.0, 0.0))
    nib.save(on_grid(spm["spect"], shape, affine), root / "spect.nii.gz")
    return {"root": root, "t1": root / "t1_dicom", "t2": root / "t2.nii.gz", "func": root / "spect.nii.gz",
            "t1_image": nib.Nifti1Image(t1_values.astype(np.float32), t1.affine)}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def rgb_slices(path: Path) -> np.ndarray:
    data = np.asanyarray(nib.load(path).dataobj)
    return np.stack([data["R"], data["G"], data["B"]], axis=-1).astype(int)


# --------------------------------------------------------------------------- fusing


def test_a_dicom_t1_with_nifti_volumes_on_other_grids_fuses_on_the_t1_grid(scanner, work, tiny_run):
    res = cli("fuse", scanner["t1"], scanner["t2"], scanner["func"], *fast(tiny_run))
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert re.search(r"read t1_dicom: DICOM series [\d.]+ 'T1 axial' \(MR, 16 slices\): 91x109x16 of "
                     r"2\.00x2\.00x2\.00 mm", err), err
    assert "read t2.nii.gz: NIfTI volume, " in err and "of 3.00x3.00x3.00 mm" in err
    assert re.search(r"resampled t2\.nii\.gz from \d+x\d+x\d+ of 3\.00x3\.00x3\.00 mm onto t1_dicom's grid "
                     r"\(91x109x16 of 2\.00x2\.00x2\.00 mm\), trilinear by the affines", err), err
    assert re.search(r"resampled spect\.nii\.gz from \d+x\d+x\d+ of 4\.00x4\.00x4\.00 mm onto t1_dicom's grid", err)
    out = work / "fused.nii.gz"  # the default output of a volume fuse
    assert "wrote fused.nii.gz" in res.stdout and (work / "fused_montage.png").is_file()
    img = nib.load(out)
    assert img.shape[2] == 16 and max(img.shape[:2]) == 64
    # On the T1's grid: the fused volume spans the world box of the T1 series.
    np.testing.assert_allclose(world_extent(img), world_extent(scanner["t1_image"]), atol=1e-3)

    # The same fuse from volumes put on the T1 grid beforehand by scipy: the same picture.
    ref = scanner["t1_image"]
    nib.save(ref, work / "t1_grid.nii.gz")
    for m in ("t2", "func"):
        moving = nib.load(scanner[m])
        cval = float(moving.get_fdata().min())  # outside its field of view: its background
        nib.save(resample_from_to(moving, ref, order=1, cval=cval), work / f"{m}_grid.nii.gz")
    res = cli("fuse", *(work / f"{m}_grid.nii.gz" for m in ("t1", "t2", "func")), *fast(tiny_run),
              "--out", work / "scipy.nii.gz")
    assert res.exit_code == 0, res.output
    ours, theirs = rgb_slices(out), rgb_slices(work / "scipy.nii.gz")
    diff = np.abs(ours - theirs)
    assert ours.shape == theirs.shape and diff.mean() < 0.5 and np.percentile(diff, 99) <= 3, (diff.mean(), diff.max())
    assert ours.std() > 10  # a picture, not a blank


def test_grid_option_puts_the_output_on_the_chosen_grid(scanner, work, tiny_run):
    res = cli("fuse", scanner["t1"], scanner["t2"], scanner["func"], *fast(tiny_run), "--size", "32", "--grid",
              "func", "--out", work / "on_spect.nii.gz")
    assert res.exit_code == 0, res.output
    assert "resampled t1_dicom from 91x109x16 of 2.00x2.00x2.00 mm onto spect.nii.gz's grid" in res.stderr
    spect = nib.load(scanner["func"])
    img = nib.load(work / "on_spect.nii.gz")
    assert img.shape[2] == spect.shape[2]
    np.testing.assert_allclose(world_extent(img), world_extent(spect), atol=1e-3)


def test_register_writes_itk_transforms_that_undo_a_known_motion(spm, scanner, work, tiny_run):
    # The whole 2 mm head (a thin slab holds a rotation loosely) and the template's own T2, moved.
    ref = spm["t1"]
    write_series(ref, work / "head", "T1 head")
    center = world_extent(ref).mean(axis=1)
    motion = rigid(*MOTION, center)
    t2 = spm["t2"]
    nib.save(nib.Nifti1Image(t2.get_fdata(dtype=np.float32), motion @ t2.affine), work / "t2_moved.nii.gz")
    tfm = work / "transforms"
    res = cli("fuse", work / "head", work / "t2_moved.nii.gz", scanner["func"], *fast(tiny_run), "--size", "32",
              "--register", "--save-transforms", tfm)
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    metric = [line for line in err if line.startswith("registered t2_moved.nii.gz to head: Mattes mutual")]
    turned = [line for line in err if line.startswith("t2_moved.nii.gz -> head: rotation ")]
    assert len(metric) == 1 and len(turned) == 1, res.stderr
    assert any("trilinear through its rigid registration" in line for line in err)
    assert sorted(p.name for p in tfm.iterdir()) == ["func_to_t1.tfm", "t2_to_t1.tfm"]
    assert f"wrote {tfm}/ (t2_to_t1.tfm, func_to_t1.tfm)" in res.stdout

    import SimpleITK as sitk

    # ITK's file maps a T1 point (LPS) to the moved T2: it is `motion` (RAS), within 1 mm and 1 degree.
    t = sitk.ReadTransform(str(tfm / "t2_to_t1.tfm"))
    flip = np.diag([-1.0, -1.0, 1.0])
    pts = center + np.array([[0, 0, 0], [30, 0, 0], [0, 30, 0], [0, 0, 15.0]])
    got = np.array([flip @ np.asarray(t.TransformPoint(tuple(flip @ p))) for p in pts])
    want = (motion @ np.c_[pts, np.ones(len(pts))].T)[:3].T
    assert np.linalg.norm(got[0] - want[0]) < 1.0, (got, want)
    arm = lambda a: (a[1:] - a[0]) / np.linalg.norm(a[1:] - a[0], axis=1, keepdims=True)  # noqa: E731
    angles = np.degrees(np.arccos(np.clip(np.sum(arm(got) * arm(want), axis=1), -1, 1)))
    assert angles.max() < 1.0, angles
    rot = [float(v) for v in re.search(r"rotation (\S+) (\S+) (\S+) deg", turned[0]).groups()]
    np.testing.assert_allclose(rot, MOTION[0], atol=1.0)


def test_save_transforms_needs_register_and_a_folder_of_its_own(scanner, work, tiny_run):
    args = ("fuse", scanner["t1"], scanner["t2"], scanner["func"], *fast(tiny_run))
    assert "add --register" in refused(work, *args, "--save-transforms", work / "tfm")
    (work / "keep").mkdir()
    (work / "keep" / "notes.txt").write_text("mine\n")
    line = refused(work, *args, "--register", "--save-transforms", work / "keep")
    assert "holds notes.txt, which is not a .tfm transform" in line
    # A bad output is refused before any work: no transforms are written either.
    assert "use a .nii or .nii.gz name" in refused(work, *args, "--register", "--save-transforms", work / "tfm",
                                                   "--out", work / "fused.png")


# --------------------------------------------------------------------------- refused


def test_the_bounds_on_a_fit_are_checked_and_reach_the_registration(scanner, work, tiny_run):
    args = ("fuse", scanner["t1"], scanner["t2"], scanner["func"], *fast(tiny_run), "--register")
    assert "--max-rotation must be above 0 and at most 180, got 0" in refused(work, *args, "--max-rotation", "0")
    assert "--max-shift must be above 0 and at most 500, got nan" in refused(work, *args, "--max-shift", "nan")
    line = refused(work, *args, "--max-shift", "0.001", "--max-rotation", "180")
    assert re.search(r"registering (t2|spect).nii.gz to t1_dicom gave a shift of \d+\.\d mm \(the bound is 0.001\)",
                     line), line


def test_volumes_that_do_not_overlap_are_refused_with_their_extents(scanner, work, tiny_run):
    spect = nib.load(scanner["func"])
    far = spect.affine.copy()
    far[0, 3] += 600.0
    nib.save(nib.Nifti1Image(spect.get_fdata(dtype=np.float32), far), work / "far.nii.gz")
    line = refused(work, "fuse", scanner["t1"], scanner["t2"], work / "far.nii.gz", *fast(tiny_run))
    assert "far.nii.gz and t1_dicom do not overlap in world space" in line
    assert "t1_dicom: x -91..91, y -127..91, z -1..31 mm" in line and "far.nii.gz: x " in line


def test_a_folder_with_two_series_is_refused_with_the_list_then_picked_with_series(spm, scanner, work, tiny_run):
    both = work / "both"
    small = t1_crop(spm)
    write_series(small, both / "a", "T1 axial", series_uid="1.2.826.0.9.1", number=3)
    coarse = nib.Nifti1Image(small.get_fdata(dtype=np.float32)[::2, ::2, ::2], small.affine @ np.diag([2, 2, 2, 1.0]))
    write_series(coarse, both / "b", "T1 coarse", series_uid="1.2.826.0.9.2", number=4)
    args = ("fuse", both, scanner["t2"], scanner["func"], *fast(tiny_run))
    line = refused(work, *args)
    assert "both: holds 2 DICOM series; choose one with --series UID" in line
    assert "1.2.826.0.9.1 'T1 axial' (MR, 16 slices)" in line and "1.2.826.0.9.2 'T1 coarse' (MR, 8 slices)" in line
    res = cli(*args, "--series", "1.2.826.0.9.2", "--out", work / "coarse.nii.gz")
    assert res.exit_code == 0, res.output
    read = "read both: DICOM series 1.2.826.0.9.2 'T1 coarse' (MR, 8 slices): 46x55x8 of 4.00x4.00x4.00 mm"
    assert read in res.stderr
    assert nib.load(work / "coarse.nii.gz").shape[2] == 8
    assert "--series 9.9: no DICOM input holds that series" in refused(work, *args, "--series", "1.2.826.0.9.1",
                                                                        "--series", "9.9")


def broken_series(spm, folder: Path, how: str) -> Path:
    small = t1_crop(spm)
    small = nib.Nifti1Image(small.get_fdata(dtype=np.float32)[::2, ::2], small.affine @ np.diag([2, 2, 1, 1.0]))
    folder.mkdir()
    if how == "empty":
        return folder
    write_series(small, folder, "broken")
    if how == "missing slice":
        (folder / "IM0007.dcm").unlink()
    else:
        ds = pydicom.dcmread(folder / "IM0005.dcm")
        ds.ImageOrientationPatient = ["-1", "0", "0", "0", "0", "-1"]  # a coronal slice among axial ones
        ds.save_as(folder / "IM0005.dcm")
    return folder


@pytest.mark.parametrize("how, message", [
    ("missing slice", "uneven slice spacing: a gap of 4.00 mm"),
    ("mixed orientations", "mixes 2 slice orientations"),
    ("empty", "the folder is empty; expected the files of one DICOM series"),
])
@pytest.mark.parametrize("where", ["t1", "func"])
def test_broken_series_are_one_line_and_leave_no_file(spm, scanner, work, tiny_run, how, message, where):
    folder = broken_series(spm, work / "series", how)
    inputs = {m: scanner[m] for m in ("t1", "t2", "func")} | {where: folder}
    assert message in refused(work, "fuse", *inputs.values(), *fast(tiny_run), "--register", "--save-transforms",
                              work / "tfm")


def test_volume_options_are_refused_for_images_and_folders(scanner, work, tiny_run, synth_dataset):
    pngs = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    assert "--register applies to volumes" in refused(work, "fuse", *pngs, *fast(tiny_run), "--register")
    assert "--series applies to volumes" in refused(work, "fuse", *pngs, *fast(tiny_run), "--series", "1.2")
    dirs = [synth_dataset / "test" / m for m in ("t1", "t2", "func")]
    assert "--grid applies to volumes" in refused(work, "fuse", *dirs, *fast(tiny_run), "--grid", "t2")
    assert "--grid must be one of t1, t2, func" in refused(work, "fuse", *pngs, *fast(tiny_run), "--grid", "ct")
    nifti = [scanner["t2"]] * 3
    assert "no input is a DICOM folder" in refused(work, "fuse", *nifti, *fast(tiny_run), "--series", "1.2")
    assert "not a mix" in refused(work, "fuse", scanner["t1"], dirs[1], scanner["func"], *fast(tiny_run))


@pytest.mark.parametrize("module", ["SimpleITK", "pydicom"])
def test_without_the_extra_a_command_that_needs_it_names_it(scanner, work, tiny_run, monkeypatch, module):
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if it were not installed
    line = refused(work, "fuse", scanner["t1"], scanner["t2"], scanner["func"], *fast(tiny_run))
    assert line == f"error: reading DICOM series needs {module}, which is not installed: {EXTRA}"
    if module == "SimpleITK":
        nifti = (scanner["t2"], scanner["t2"], scanner["func"])
        line = refused(work, "fuse", *nifti, *fast(tiny_run))
        assert line == f"error: resampling volumes needs SimpleITK, which is not installed: {EXTRA}"
        line = refused(work, "fuse", *(scanner["t2"],) * 3, *fast(tiny_run), "--register")
        assert line == f"error: registration needs SimpleITK, which is not installed: {EXTRA}"

