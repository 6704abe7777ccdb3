"""DICOM out: `fuse --format dicom` writes the fused volume as one DICOM series, and `--send` stores it in a
PACS. The PACS is a real Orthanc (Debian's `orthanc`), started here on 127.0.0.1 with a configuration and
storage of its own; the validator is dicom3tools' `dciodvfy`. Tests that need one skip when it is missing.

The series is read back by SimpleITK (GDCM) and pydicom, and compared with the NIfTI output of the same
fuse: its geometry with the NIfTI affine, its pixels with the NIfTI voxels.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

sitk = pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
pydicom = pytest.importorskip("pydicom", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
pytest.importorskip("highdicom", reason="needs the dicom extra: pip install 'tfsdeploy[dicom]'")
pytest.importorskip("pynetdicom", reason="needs the dicom extra: pip install 'tfsdeploy[dicom]'")

from pydicom.uid import generate_uid  # noqa: E402
from test_dicom_grids import spm, write_series  # noqa: E402, F401
from test_fuse_dicom import SLICES, fast, refused  # noqa: E402

from tfsdeploy.cli import app  # noqa: E402
from tfsdeploy.dicomout import slice_geometry  # noqa: E402
from tfsdeploy.errors import UserError  # noqa: E402
from tfsdeploy.pacs import Destination, send_series  # noqa: E402
from tfsdeploy.volumes import itk_affine  # noqa: E402

runner = CliRunner()
PACS_AE = "TFSPACS"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
# Series index (c, r, s) -> NIfTI voxel (w-1-c, h-1-r, s): rows anterior first, each row towards the left.
MIRROR_IJ = np.diag([-1.0, -1.0, 1.0, 1.0])


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def crop(img) -> nib.Nifti1Image:
    """The axial slices SLICES of a 2 mm template, with the affine that places them."""
    shift = np.eye(4)
    shift[2, 3] = SLICES.start
    return nib.Nifti1Image(img.get_fdata(dtype=np.float32)[:, :, SLICES], img.affine @ shift)


@pytest.fixture(scope="module")
def inputs(spm, tmp_path_factory):
    """The T1, T2 and SPECT templates, 16 axial slices each, as three DICOM series (and as NIfTI)."""
    root = tmp_path_factory.mktemp("dicom_in")
    out = {"root": root}
    for m, key, number in (("t1", "t1", 1), ("t2", "t2", 2), ("func", "spect", 3)):
        img = crop(spm[key])
        write_series(img, root / f"{m}_dicom", f"{key.upper()} axial", number=number)
        frame = generate_uid()  # each series in a Frame of Reference of its own, as from a scanner
        for f in (root / f"{m}_dicom").iterdir():
            ds = pydicom.dcmread(f)
            ds.FrameOfReferenceUID = frame
            ds.save_as(f)
        files = sorted((root / f"{m}_dicom").iterdir())  # IM0000.dcm ...: slice k
        out[m], out[f"{m}_datasets"] = root / f"{m}_dicom", [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        nib.save(img, root / f"{m}.nii.gz")
        out[f"{m}_nifti"] = root / f"{m}.nii.gz"
    return out


@pytest.fixture(scope="module")
def fused(inputs, tiny_run, tmp_path_factory):
    """The same fuse written as NIfTI and as a DICOM series."""
    work = tmp_path_factory.mktemp("dicom_out")
    triplet = [inputs[m] for m in ("t1", "t2", "func")]
    res = cli("fuse", *triplet, *fast(tiny_run), "--out", work / "fused.nii.gz")
    assert res.exit_code == 0, res.output
    res = cli("fuse", *triplet, *fast(tiny_run), "--format", "dicom", "--out", work / "series")
    assert res.exit_code == 0, res.output
    assert "wrote " in res.stdout and "series/ (DICOM series, 16 files)" in res.stdout, res.stdout
    files = sorted((work / "series").iterdir())
    return {"work": work, "nifti": work / "fused.nii.gz", "folder": work / "series", "files": files,
            "datasets": [pydicom.dcmread(f) for f in files]}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def nifti_rgb(path: Path) -> np.ndarray:
    """An RGB NIfTI as uint8 [i, j, k, 3]."""
    data = np.asanyarray(nib.load(path).dataobj)
    return np.stack([data["R"], data["G"], data["B"]], axis=-1)


# --------------------------------------------------------------------------- the series


def test_simpleitk_reads_one_rgb_volume_on_the_nifti_grid(fused):
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(fused["folder"]))
    assert len(names) == 16
    reader.SetFileNames(names)
    image = reader.Execute()
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetPixelID() == sitk.sitkVectorUInt8
    nifti = nib.load(fused["nifti"])
    w, h, z = nifti.shape
    assert image.GetSize() == (w, h, z)
    # A DICOM row runs to the subject's left, rows from anterior: index (c, r, s) of the series is voxel
    # (w-1-c, h-1-r, s) of the NIfTI, at the same place in the patient.
    mirror = MIRROR_IJ.copy()
    mirror[:2, 3] = w - 1, h - 1
    expected = nifti.affine @ mirror
    ours = itk_affine(image)
    np.testing.assert_allclose(ours[:3, 3], expected[:3, 3], atol=1e-3)  # origin, mm
    spacing = np.linalg.norm(expected[:3, :3], axis=0)
    np.testing.assert_allclose(ours[:3, :3] / spacing, expected[:3, :3] / spacing, atol=1e-3)  # direction
    written = [float(v) for v in fused["datasets"][0].PixelSpacing][::-1] + [float(fused["datasets"][0].SliceThickness)]
    assert image.GetSpacing() == tuple(written)
    np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-6)
    # Pixels: slice s of the series is NIfTI slice s, rows and columns flipped; so slices come in order.
    voxels = sitk.GetArrayFromImage(image)  # [s, r, c, 3]
    expected_voxels = nifti_rgb(fused["nifti"])[::-1, ::-1, :, :].transpose(2, 1, 0, 3)
    np.testing.assert_array_equal(voxels, expected_voxels)
    assert voxels.std() > 10  # a picture, not a blank


def test_every_instance_is_an_rgb_secondary_capture_of_the_t1s_patient_and_study(fused, inputs, tiny_run):
    t1 = inputs["t1_datasets"][0]
    sources = {m: inputs[f"{m}_datasets"] for m in ("t1", "t2", "func")}
    source_uids = {str(ds.SOPInstanceUID): m for m, dss in sources.items() for ds in dss}
    series = {str(ds.SeriesInstanceUID) for ds in fused["datasets"]}
    assert len(series) == 1 and not series & {str(d[0].SeriesInstanceUID) for d in sources.values()}
    sops = [str(ds.SOPInstanceUID) for ds in fused["datasets"]]
    assert len(set(sops)) == 16 and not set(sops) & set(source_uids)
    for k, ds in enumerate(fused["datasets"]):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.file_meta.MediaStorageSOPInstanceUID == sops[k]
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated) == (3, "RGB", 8)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns, 3) and ds.pixel_array.dtype == np.uint8
        assert int(ds.InstanceNumber) == k + 1
        assert (ds.PatientID, str(ds.PatientName)) == (t1.PatientID, str(t1.PatientName))
        assert ds.StudyInstanceUID == t1.StudyInstanceUID
        assert ds.FrameOfReferenceUID == t1.FrameOfReferenceUID  # on the T1's grid, in its Frame of Reference
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "TFS-Diff x4 fusion T1/T2/SPECT"
        assert ds.DerivationDescription.startswith("TFS-Diff x4 fusion T1/T2/SPECT, super-resolved and fused")
        assert "x4, ddim-1, engine torch" in ds.DerivationDescription
        assert ds.DerivationDescription.endswith(f", model {tiny_run.name} ({tiny_run.parent.name}))")
        # Each slice names the nearest slice of each source series: on one grid, the slice at its own place.
        refs = [str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence]
        assert [source_uids[r] for r in refs] == ["t1", "t2", "func"]
        assert refs[0] == str(sources["t1"][k].SOPInstanceUID)
        # The Common Instance Reference module lists them: the T1's series in this study, the others by study.
        own = {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence}
        assert own == {str(t1.SeriesInstanceUID)}
        others = {str(s.StudyInstanceUID) for s in ds.StudiesContainingOtherReferencedInstancesSequence}
        assert others == {str(sources[m][0].StudyInstanceUID) for m in ("t2", "func")}


def test_positions_are_the_nifti_affines_in_lps(fused):
    nifti = nib.load(fused["nifti"])
    w, h, _ = nifti.shape
    for k, ds in enumerate(fused["datasets"]):
        # The centre of pixel (row r, column c) is NIfTI voxel (w-1-c, h-1-r, k), LPS = RAS with x and y negated.
        ras = nifti.affine @ np.array([w - 1.0, h - 1.0, k, 1.0])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-ras[0], -ras[1], ras[2]], atol=1e-3)
        ras_next_col = nifti.affine @ np.array([w - 2.0, h - 1.0, k, 1.0])
        row = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        np.testing.assert_allclose(row * float(ds.PixelSpacing[1]), np.diag([-1, -1, 1]) @ (ras_next_col - ras)[:3],
                                   atol=1e-6)


def test_slice_geometry_of_an_oblique_grid():
    # A grid turned 30 degrees about S: row direction, column direction and spacings follow the affine.
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    affine = np.array([[1.5 * c, -2 * s, 0, 10], [1.5 * s, 2 * c, 0, -20], [0, 0, 3, 5], [0, 0, 0, 1]])
    geo = slice_geometry(affine, h=4, w=5, k=2)
    # Row: -i in LPS (i is (c, s) in RAS, so (-c, -s) in LPS, negated); column: -j ((-s, c) RAS, (s, -c) LPS).
    np.testing.assert_allclose(geo["orientation"], [c, s, 0, -s, c, 0], atol=1e-12)
    normal = np.cross(geo["orientation"][:3], geo["orientation"][3:])
    np.testing.assert_allclose(normal, [0, 0, 1], atol=1e-12)  # along k: slices ascend with k
    assert geo["pixel_spacing"] == pytest.approx((2.0, 1.5)) and geo["thickness"] == pytest.approx(3.0)
    ras = affine @ [4, 3, 2, 1]
    np.testing.assert_allclose(geo["position"], [-ras[0], -ras[1], ras[2]], atol=1e-12)


def values(ds):
    """Every text value of a dataset, nested sequences included."""
    for elem in ds.iterall():
        if elem.VR in ("LO", "LT", "ST", "UT", "SH", "PN", "UC", "UR", "CS", "DS", "IS", "AE"):
            for v in (elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]):
                yield elem.keyword, str(v)


def test_no_attribute_holds_a_path_of_the_machine(fused, tiny_run):
    paths = {str(fused["work"]), str(tiny_run), str(Path.home()), os.getcwd(), "/tmp", "/home", "site-packages"}
    for ds in fused["datasets"]:
        found = [(k, v) for k, v in values(ds) if any(p in v for p in paths) or v.startswith("/")]
        assert not found, found


def dciodvfy(files: list[Path]) -> set[str]:
    """Run dciodvfy on every file; assert it reports no error; return its warnings (skip without it)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    warnings = set()
    for f in files:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        lines = (res.stdout + res.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, (f.name, errors)
        warnings |= {line.strip() for line in lines if line.startswith("Warning")}
    return warnings


def test_dciodvfy_reports_no_error(fused):
    warnings = dciodvfy(fused["files"])
    # The Image Plane attributes, which its edition of the Secondary Capture IOD does not list yet.
    assert any("Image Position (Patient)" in w for w in warnings), warnings
    print("\n".join(sorted(warnings)))


# --------------------------------------------------------------------------- NIfTI inputs, options


def test_nifti_inputs_need_a_patient_or_anonymous(inputs, tiny_run, work):
    triplet = [inputs[f"{m}_nifti"] for m in ("t1", "t2", "func")]
    line = refused(work, "fuse", *triplet, *fast(tiny_run), "--format", "dicom")
    assert "--patient-id" in line and "--anonymous" in line
    res = cli("fuse", *triplet, *fast(tiny_run), "--format", "dicom", "--patient-id", "P-17",
              "--patient-name", "Doe^Jane")
    assert res.exit_code == 0, res.output
    files = sorted((work / "fused_dicom").iterdir())  # the default folder
    datasets = [pydicom.dcmread(f) for f in files]
    assert len(datasets) == 16 and (work / "fused_dicom_montage.png").is_file()
    assert {(d.PatientID, str(d.PatientName)) for d in datasets} == {("P-17", "Doe^Jane")}
    assert len({d.StudyInstanceUID for d in datasets}) == 1 and len({d.FrameOfReferenceUID for d in datasets}) == 1
    assert "SourceImageSequence" not in datasets[0]  # no DICOM source to refer to
    res = cli("fuse", *triplet, *fast(tiny_run), "--format", "dicom", "--anonymous", "--out", work / "anon")
    assert res.exit_code == 0, res.output
    anon = pydicom.dcmread(sorted((work / "anon").iterdir())[0])
    assert anon.PatientID == "" and str(anon.PatientName) == ""
    assert anon.StudyInstanceUID != datasets[0].StudyInstanceUID
    if shutil.which("dciodvfy") is not None:
        dciodvfy(files + sorted((work / "anon").iterdir()))


@pytest.mark.parametrize("args, message", [
    (["--patient-id", "P1"], "--patient-id is for a NIfTI T1"),
    (["--anonymous"], "--anonymous is for a NIfTI T1"),
    (["--send", "PACS@localhost"], "--send takes AE@HOST:PORT"),
    (["--send", "AETITLEMUCHTOOLONG@localhost:104"], "an AE title has 1 to 16"),
    (["--send", "PACS@localhost:70000"], "the port must be 1 to 65535"),
    (["--calling-ae", "ME"], "--calling-ae names this end of a --send"),
    (["--stow", "pacs:8042/dicom-web"], "--stow takes the DICOMweb root as an http(s) URL"),
])
def test_bad_dicom_options_are_one_line_before_any_work(inputs, tiny_run, work, args, message):
    line = refused(work, "fuse", inputs["t1"], inputs["t2"], inputs["func"], *fast(tiny_run), "--format", "dicom",
                   *args)
    assert message in line, line


def test_dicom_options_need_format_dicom_and_volumes(inputs, tiny_run, work, synth_dataset):
    triplet = [inputs[m] for m in ("t1", "t2", "func")]
    assert "--send goes with --format dicom" in refused(work, "fuse", *triplet, *fast(tiny_run), "--send",
                                                        "PACS@localhost:104")
    images = [next((synth_dataset / "test" / m).iterdir()) for m in ("t1", "t2", "func")]
    assert "--format dicom applies to volumes" in refused(work, "fuse", *images, *fast(tiny_run), "--format", "dicom")
    assert "--format must be one of" in refused(work, "fuse", *triplet, *fast(tiny_run), "--format", "dcm")


def test_an_output_folder_with_other_files_is_not_replaced(inputs, tiny_run, work):
    (work / "keep").mkdir()
    (work / "keep" / "notes.txt").write_text("mine")
    line = refused(work, "fuse", inputs["t1"], inputs["t2"], inputs["func"], *fast(tiny_run), "--format", "dicom",
                   "--out", work / "keep")
    assert "holds notes.txt, which is not a .dcm file of a series" in line


def test_dicom_inputs_of_different_patients_are_refused(inputs, spm, tiny_run, work):
    other = work / "other"
    shutil.copytree(inputs["t2"], other)
    for f in other.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientID = "SOMEONE-ELSE"
        ds.save_as(f)
    line = refused(work, "fuse", inputs["t1"], other, inputs["func"], *fast(tiny_run), "--format", "dicom")
    assert "different patients" in line and "SOMEONE-ELSE" in line


@pytest.mark.parametrize("module, args", [("highdicom", []), ("pynetdicom", ["--send", "PACS@localhost:104"])])
def test_without_the_dicom_extra_the_command_names_it_before_any_work(inputs, tiny_run, work, monkeypatch, module,
                                                                       args):
    import sys

    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if it were not installed
    line = refused(work, "fuse", inputs["t1"], inputs["t2"], inputs["func"], *fast(tiny_run), "--format", "dicom",
                   *args)
    assert line.endswith(f"needs {module}, which is not installed: pip install 'tfsdeploy[dicom]'"), line


# --------------------------------------------------------------------------- a real PACS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """An Orthanc on 127.0.0.1 with its own configuration and storage; it accepts any calling AE title,
    checks the called one, and refuses SOP classes it does not know (its default). With its DICOMweb
    plugin installed, it serves DICOMweb at /dicom-web."""

    def __init__(self, root: Path):
        self.root, self.dicom_port, self.http_port = root, free_port(), free_port()
        root.mkdir(parents=True)
        config = {"Name": "tfsdeploy-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "DicomAet": PACS_AE, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
                  "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": False, "Plugins": [],
                  "HttpServerEnabled": True, "DicomServerEnabled": True, "ConcurrentJobs": 1,
                  "StorageCompression": False}
        if DICOMWEB_PLUGIN.is_file():
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "wb")
        self.process = subprocess.Popen([shutil.which("Orthanc"), str(root / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)

    @property
    def destination(self) -> str:
        return f"{PACS_AE}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def check_holds(self, folder: Path) -> None:
        """Orthanc holds the series in `folder` and nothing else: every instance, with its UIDs and pixel data."""
        written = {}
        for f in sorted(folder.iterdir()):
            ds = pydicom.dcmread(f)
            written[str(ds.SOPInstanceUID)] = ds
        series = self.get("/series?expand")
        assert len(series) == 1 and len(series[0]["Instances"]) == len(written) == 16
        first = next(iter(written.values()))
        assert series[0]["MainDicomTags"]["SeriesInstanceUID"] == first.SeriesInstanceUID
        for instance in series[0]["Instances"]:
            stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(self.get(f"/instances/{instance}/file", raw=True)))
            ours = written.pop(str(stored.SOPInstanceUID))
            assert (stored.SeriesInstanceUID, stored.StudyInstanceUID) == (ours.SeriesInstanceUID,
                                                                           ours.StudyInstanceUID)
            assert stored.PixelData == ours.PixelData
            np.testing.assert_array_equal(stored.pixel_array, ours.pixel_array)
        assert not written  # every instance arrived

    def get(self, route: str, raw: bool = False):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{route}", timeout=10) as r:
            body = r.read()
        return body if raw else json.loads(body)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture()
def orthanc(tmp_path):
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    pacs = Orthanc(tmp_path / "orthanc")
    yield pacs
    pacs.stop()


def test_the_series_sent_to_orthanc_arrives_whole(inputs, tiny_run, work, orthanc):
    res = cli("fuse", inputs["t1"], inputs["t2"], inputs["func"], *fast(tiny_run), "--format", "dicom",
              "--send", orthanc.destination, "--calling-ae", "TFSTEST")
    assert res.exit_code == 0, res.output
    assert f"sent 16 of 16 instances to {orthanc.destination} (C-STORE from TFSTEST)" in res.stdout
    orthanc.check_holds(work / "fused_dicom")


def test_the_series_stored_by_stow_rs_arrives_whole(inputs, tiny_run, work, orthanc):
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    res = cli("fuse", inputs["t1"], inputs["t2"], inputs["func"], *fast(tiny_run), "--format", "dicom",
              "--stow", orthanc.dicomweb + "/")
    assert res.exit_code == 0, res.output
    assert f"sent 16 of 16 instances to {orthanc.dicomweb} (STOW-RS)" in res.stdout
    orthanc.check_holds(work / "fused_dicom")
    line = refused_after_writing(work, inputs, tiny_run, "--stow", orthanc.dicomweb + "/nowhere")
    assert f"{orthanc.dicomweb}/nowhere/studies answered HTTP 404" in line and "0 of 16 instance(s) stored" in line


def test_a_dicomweb_server_that_is_down_is_one_line(inputs, tiny_run, work):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    line = refused_after_writing(work, inputs, tiny_run, "--stow", url)
    assert f"{url}/studies: cannot connect" in line and "0 of 16 instance(s) sent" in line


def test_a_pacs_that_is_down_is_one_line_and_the_series_stays(inputs, tiny_run, work):
    port = free_port()  # nothing listens there
    line = refused_after_writing(work, inputs, tiny_run, "--send", f"{PACS_AE}@127.0.0.1:{port}")
    assert f"{PACS_AE}@127.0.0.1:{port}: cannot connect or associate" in line and "0 of 16" in line


def test_a_wrong_ae_title_is_one_line_and_the_series_stays(inputs, tiny_run, work, orthanc):
    line = refused_after_writing(work, inputs, tiny_run, "--send", f"NOTTHEPACS@127.0.0.1:{orthanc.dicom_port}")
    assert "refused the association from TFSDEPLOY: Called AE title not recognised" in line and "0 of 16" in line
    assert orthanc.get("/instances") == []


def test_a_rejected_instance_is_one_line_and_counts_what_was_stored(fused, orthanc, tmp_path):
    # One file of the series in a SOP class the PACS does not know: it refuses that one, stores the others.
    folder = tmp_path / "series"
    shutil.copytree(fused["folder"], folder)
    files = sorted(folder.iterdir())
    odd = pydicom.dcmread(files[3])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.1"
    odd.save_as(files[3])
    with pytest.raises(UserError) as e:
        send_series(files, Destination.parse(orthanc.destination))
    line = str(e.value)
    assert line.startswith(f"{orthanc.destination} did not store 1 of 16 instance(s) (IM0004.dcm: the PACS does "
                           "not accept SOP class 1.2.826.0.1.3680043.8.498.1 in Explicit VR Little Endian)"), line
    assert line.endswith("; 15 stored")
    assert len(orthanc.get("/instances")) == 15


def refused_after_writing(work: Path, inputs, tiny_run, *args) -> str:
    """The fuse writes its series, then a failed send is one `error:` line, exit 2; the series stays."""
    res = cli("fuse", inputs["t1"], inputs["t2"], inputs["func"], *fast(tiny_run), "--format", "dicom", *args)
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("read ", "fusing "))]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and "sent " not in res.stdout
    assert "the series stays in fused_dicom/" in lines[0]
    assert len([f for f in (work / "fused_dicom").iterdir() if f.suffix == ".dcm"]) == 16
    return lines[0]

