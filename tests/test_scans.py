"""Whole-scan I/O: NIfTI volumes and folders of slices in, fused NIfTI / PNGs / montage out."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from tfsdeploy.errors import UserError
from tfsdeploy.imaging import normalise_volume
from tfsdeploy.scans import RGB24, open_scan, scan_kind, write_montage

X, Y, Z = 20, 24, 6
# Stored as LAS (x flipped, as radiological files often are), 2 mm voxels, origin away from the corner.
AFFINE = np.array([
    [-2.0, 0.0, 0.0, 40.0],
    [0.0, 2.0, 0.0, -60.0],
    [0.0, 0.0, 2.0, -20.0],
    [0.0, 0.0, 0.0, 1.0],
])


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def unique_volume(seed: int, shape: tuple[int, ...] = (X, Y, Z)) -> np.ndarray:
    """Every voxel a different value, so a value tells where it came from."""
    return np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape).astype(np.float32)


@pytest.fixture
def volumes(tmp_path) -> dict[str, tuple[Path, np.ndarray]]:
    out = {}
    for seed, m in enumerate(("t1", "t2", "func")):
        raw = unique_volume(seed)
        out[m] = (save_nifti(tmp_path / f"{m}.nii.gz", raw), raw)
    return out


def open_volumes(volumes) -> object:
    return open_scan(*(volumes[m][0] for m in ("t1", "t2", "func")))


# --------------------------------------------------------------------------- NIfTI in


def test_scan_kind(tmp_path):
    assert scan_kind(tmp_path) == "folder"
    assert scan_kind(tmp_path / "a.nii") == "nifti"
    assert scan_kind(tmp_path / "A.NII.GZ") == "nifti"
    assert scan_kind(tmp_path / "a.png") is None
    assert scan_kind(tmp_path / "a.gz") is None


def test_nifti_slices_land_in_the_project_orientation(volumes):
    scan = open_volumes(volumes)
    assert scan.kind == "nifti"
    assert len(scan) == Z
    assert scan.names == [f"z{k:03d}" for k in range(Z)]
    assert scan.shape == (Y, X)  # rows run along y, columns along x
    i, j, k = 3, 5, 2
    for m in ("t1", "t2", "func"):
        expected = normalise_volume(volumes[m][1])[i, j, k]
        assert 0.0 < expected < 1.0  # not clipped, so unique in the volume
        sl = getattr(scan.slice(k), m)
        assert sl.shape == (1, Y, X) and sl.dtype == torch.float32
        # Raw voxel (i, j, k): world x = 40 - 2i, so the columns (x growing to the right) hold it at
        # X-1-i; world y = 2j - 60 with anterior up, so it is in row Y-1-j.
        assert np.argwhere(sl[0].numpy() == expected).tolist() == [[Y - 1 - j, X - 1 - i]]
        assert float(sl.min()) >= 0.0 and float(sl.max()) <= 1.0
    assert scan.slice(-1).name == f"z{Z - 1:03d}"
    with pytest.raises(IndexError):
        scan.slice(Z)


def test_slice_names_widen_for_many_slices(tmp_path):
    paths = [save_nifti(tmp_path / f"{m}.nii", unique_volume(0, (4, 4, 1001))) for m in ("t1", "t2", "func")]
    scan = open_scan(*paths)
    assert scan.names[0] == "z0000" and scan.names[-1] == "z1000"


def test_trailing_singleton_axis_is_squeezed(tmp_path, volumes):
    func = save_nifti(tmp_path / "func4d.nii.gz", unique_volume(7, (X, Y, Z, 1)))
    scan = open_scan(volumes["t1"][0], volumes["t2"][0], func)
    assert len(scan) == Z and scan.slice(0).func.shape == (1, Y, X)


def test_affines_equal_within_rounding_are_accepted(tmp_path, volumes):
    nudged = AFFINE.copy()
    nudged[0, 3] += 1e-4
    func = save_nifti(tmp_path / "nudged.nii.gz", unique_volume(2), nudged)
    assert len(open_scan(volumes["t1"][0], volumes["t2"][0], func)) == Z


@pytest.mark.parametrize("case, message", [
    ("far", "do not overlap in world space"),
    ("4d", "3-D"),
    ("missing", "no such file"),
    ("not_nifti", "cannot read as NIfTI"),
    ("nan", "NaN"),
    ("mixed", "mix"),
    ("png", "not a NIfTI volume"),
])
def test_bad_inputs_are_user_errors(tmp_path, volumes, case, message):
    t1, t2 = volumes["t1"][0], volumes["t2"][0]
    if case == "far":  # another grid is resampled onto the T1's, but not one 500 mm away
        pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
        shifted = AFFINE.copy()
        shifted[1, 3] += 500.0
        func = save_nifti(tmp_path / "f.nii.gz", unique_volume(2, (X, Y, Z - 1)), shifted)
    elif case == "4d":
        func = save_nifti(tmp_path / "f.nii.gz", unique_volume(2, (X, Y, Z, 3)))
    elif case == "missing":
        func = tmp_path / "absent.nii.gz"
    elif case == "not_nifti":
        func = tmp_path / "f.nii"
        func.write_text("not an image\n")
    elif case == "nan":
        raw = unique_volume(2)
        raw[1, 1, 1] = np.nan
        func = save_nifti(tmp_path / "f.nii.gz", raw)
    elif case == "mixed":
        func = tmp_path / "slices"
        func.mkdir()
        Image.new("L", (4, 4)).save(func / "s0.png")
    else:
        func = tmp_path / "f.png"
        Image.new("L", (4, 4)).save(func)
    with pytest.raises(UserError, match=message) as err:
        open_scan(t1, t2, func)
    assert "\n" not in str(err.value)
    if case in ("far", "4d", "missing", "not_nifti", "nan"):
        assert func.name in str(err.value)


def qform_only(path: Path, data: np.ndarray, pixdim: dict[int, float]) -> Path:
    """A NIfTI placed by its qform alone (no sform), its pixdim then overwritten as written on disk."""
    img = nib.Nifti1Image(data.astype(np.float32), None)
    img.header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.header.set_sform(None, code=0)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    for i, v in pixdim.items():  # pixdim[i] is the float32 at byte 76 + 4 i of the header
        raw[76 + 4 * i:80 + 4 * i] = np.float32(v).tobytes()
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("pixdim, sizes", [({1: 0.0}, "0x2x2"), ({2: -2.0}, "2x-2x2")])
def test_a_voxel_size_of_zero_or_below_is_refused(tmp_path, pixdim, sizes, capfd):
    good = qform_only(tmp_path / "good.nii", unique_volume(0), {})
    bad = qform_only(tmp_path / "bad.nii", unique_volume(1), pixdim)
    with pytest.raises(UserError) as err:
        open_scan(bad, good, good)
    assert str(err.value) == (f"{bad}: its header gives voxel sizes of {sizes} mm (pixdim, with no sform); each "
                              "must be positive")
    assert capfd.readouterr().err == ""  # nibabel's "setting 0 dims to 1" stays off the terminal
    assert len(open_scan(good, good, good)) == Z


def test_nibabel_complaints_stay_off_the_terminal_on_a_good_read(tmp_path, capfd):
    # qfac (pixdim[0]) 0: nibabel logs that it takes 1, which is what the file means; the read is fine.
    odd = qform_only(tmp_path / "odd.nii", unique_volume(0), {0: 0.0})
    assert len(open_scan(odd, odd, odd)) == Z
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("case, message", [
    ("blank", "every voxel is 0, so there is nothing to register it by"),
    ("constant", "every voxel is 7, so there is nothing to register it by"),
    ("tiny", "2x2x2 voxels are too few to register"),
])
def test_volumes_that_cannot_be_registered_are_one_line(tmp_path, volumes, case, message):
    pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
    t1 = save_nifti(tmp_path / "big_t1.nii.gz", unique_volume(0, (40, 48, 40)))
    t2 = save_nifti(tmp_path / "big_t2.nii.gz", unique_volume(1, (40, 48, 40)))
    if case == "tiny":  # 2x2x2 voxels of 60 mm around the T1's centre (1, -13, 19): covering all of it
        affine = np.diag([-60.0, 60.0, 60.0, 1.0])
        affine[:3, 3] = (31.0, -43.0, -11.0)
        func = save_nifti(tmp_path / "f.nii.gz", unique_volume(2, (2, 2, 2)), affine)
    else:
        func = save_nifti(tmp_path / "f.nii.gz", np.full((40, 48, 40), 0.0 if case == "blank" else 7.0))
    with pytest.raises(UserError, match=message) as err:
        open_scan(t1, t2, func, register=True)
    assert str(err.value).startswith("f.nii.gz: ") and "\n" not in str(err.value)


# --------------------------------------------------------------------------- NIfTI out


def position_coded(n: int, h: int, w: int) -> np.ndarray:
    """uint8 [n,3,h,w] with R = 10 z, G = row, B = col."""
    z, row, col = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([10 * z, row, col], axis=1).astype(np.uint8)


def voxel_of(data: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    hits = np.argwhere((data["R"] == rgb[0]) & (data["G"] == rgb[1]) & (data["B"] == rgb[2]))
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_output_overlays_the_input(tmp_path, volumes, suffix):
    scan = open_volumes(volumes)
    h, w = 2 * Y, 2 * X
    out = tmp_path / f"fused{suffix}"
    assert scan.write_output(out, position_coded(Z, h, w)) == [out]

    img = nib.load(out)
    data = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == RGB24 and data.dtype == RGB24
    assert img.shape == (w, h, Z)
    assert np.allclose(img.header.get_zooms(), (1.0, 1.0, 2.0))
    source = nib.load(volumes["t1"][0])
    assert nib.aff2axcodes(nib.as_closest_canonical(img).affine) == nib.aff2axcodes(
        nib.as_closest_canonical(source).affine)

    def world(affine, index):
        return (affine @ np.append(index, 1.0))[:3]

    # The top-left pixel of output slice 2 shows the input's slice-2 corner that is most anterior
    # (raw j = Y-1) and furthest to the subject's left (smallest world x: raw i = X-1 in this LAS file).
    top_left = world(img.affine, voxel_of(data, (20, 0, 0)))
    input_top_left = world(AFFINE, (X - 1, Y - 1, 2))
    assert np.all(np.abs(top_left - input_top_left) <= 1.0)  # within half an input voxel
    bottom_right = world(img.affine, voxel_of(data, (20, h - 1, w - 1)))
    input_bottom_right = world(AFFINE, (0, 0, 2))
    assert np.all(np.abs(bottom_right - input_bottom_right) <= 1.0)
    # Same extent: the output grid is centred where the input grid is.
    assert np.allclose((top_left + bottom_right) / 2, (input_top_left + input_bottom_right) / 2)


def test_nifti_output_needs_a_nifti_name_and_matching_slices(tmp_path, volumes):
    scan = open_volumes(volumes)
    fused = position_coded(Z, Y, X)
    with pytest.raises(UserError, match=r"\.nii"):
        scan.write_output(tmp_path / "fused.png", fused)
    with pytest.raises(ValueError, match="slices"):
        scan.write_output(tmp_path / "fused.nii", fused[:-1])
    with pytest.raises(ValueError, match="uint8"):
        scan.write_output(tmp_path / "fused.nii", fused.astype(np.float32))
    assert not (tmp_path / "fused.nii").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_failed_nifti_write_leaves_nothing(tmp_path, volumes, monkeypatch, suffix):
    scan = open_volumes(volumes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    kept = out_dir / f"kept{suffix}"
    kept.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", broken)
    with pytest.raises(RuntimeError):
        scan.write_output(out_dir / f"fused{suffix}", position_coded(Z, Y, X))
    with pytest.raises(RuntimeError):
        scan.write_output(kept, position_coded(Z, Y, X))
    assert sorted(p.name for p in out_dir.iterdir()) == [kept.name]
    assert kept.read_bytes() == b"previous"


def test_disk_full_while_compressing_is_a_user_error(tmp_path, volumes, monkeypatch):
    scan = open_volumes(volumes)

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gzip.GzipFile, "write", full)
    with pytest.raises(UserError, match="No space left"):
        scan.write_output(tmp_path / "fused.nii.gz", position_coded(Z, Y, X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["func.nii.gz", "t1.nii.gz", "t2.nii.gz"]


# --------------------------------------------------------------------------- folders


def write_grey(path: Path, value: int, size: tuple[int, int] = (10, 8)) -> None:
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Three folders holding slices a, b, c; each file is flat, valued 100 * modality + 10 * slice."""
    dirs = {m: tmp_path / m for m in ("t1", "t2", "func")}
    for mi, (m, d) in enumerate(dirs.items()):
        d.mkdir()
        # Different creation orders, and one folder using .tif, must not matter.
        order = ["a", "b", "c"] if mi != 1 else ["c", "a", "b"]
        for s in order:
            ext = ".tif" if m == "t2" else ".png"
            write_grey(d / f"{s}{ext}", 100 * mi + 10 * "abc".index(s))
        (d / "notes.txt").write_text("ignored")
    return dirs


def test_folders_are_matched_by_name(folders):
    scan = open_scan(folders["t1"], folders["t2"], folders["func"])
    assert scan.kind == "folder" and scan.names == ["a", "b", "c"] and len(scan) == 3
    assert scan.shape == (10, 8)
    for i, s in enumerate("abc"):
        sl = scan.slice(i)
        assert sl.name == s
        for mi, m in enumerate(("t1", "t2", "func")):
            t = getattr(sl, m)
            assert t.shape == (1, 10, 8)
            assert round(float(t.mean()) * 255) == 100 * mi + 10 * i


def test_colour_functional_slice_is_kept_as_rgb(folders):
    Image.new("RGB", (8, 10), (255, 0, 0)).save(folders["func"] / "b.png")
    scan = open_scan(folders["t1"], folders["t2"], folders["func"])
    func = scan.slice(1).func
    assert func.shape == (3, 10, 8) and float(func[0].min()) == 1.0 and float(func[1:].max()) == 0.0


def test_unmatched_or_missing_slices_are_user_errors(folders, tmp_path):
    (folders["t2"] / "b.tif").unlink()
    with pytest.raises(UserError, match="'b'"):
        open_scan(folders["t1"], folders["t2"], folders["func"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        open_scan(folders["t1"], empty, folders["func"])


def test_slice_of_another_size_or_unreadable_is_refused_when_the_scan_opens(folders):
    """Every slice is checked before any work, not when the fusing reaches it."""
    write_grey(folders["func"] / "c.png", 0, size=(12, 8))
    with pytest.raises(UserError, match="12x8"):
        open_scan(folders["t1"], folders["t2"], folders["func"])
    write_grey(folders["func"] / "c.png", 0)
    (folders["t2"] / "c.tif").write_bytes(b"II*\x00 truncated")
    with pytest.raises(UserError, match="c.tif"):
        open_scan(folders["t1"], folders["t2"], folders["func"])


def test_folder_output_is_one_png_per_slice(folders, tmp_path):
    scan = open_scan(folders["t1"], folders["t2"], folders["func"])
    fused = position_coded(3, 16, 12)
    out = tmp_path / "new" / "fused"
    paths = scan.write_output(out, fused)
    assert paths == [out / f"{s}.png" for s in "abc"]
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), fused[i].transpose(1, 2, 0))
    regular = tmp_path / "a_file"
    regular.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        scan.write_output(regular, fused)


# --------------------------------------------------------------------------- montage


def test_montage_grid(tmp_path):
    n, h, w = 10, 40, 30
    fused = np.zeros((n, 3, h, w), np.uint8)
    fused[:, 1] = (np.arange(n) * 20)[:, None, None]  # green level tells the slice
    names = [f"z{k:03d}" for k in range(n)]

    path = write_montage(tmp_path / "m.png", fused, names, tiles=4)  # slices 0, 3, 6, 9 in 2 x 2
    with Image.open(path) as im:
        assert im.size == (2 * w, 2 * h)
        arr = np.asarray(im)
    for k, s in enumerate((0, 3, 6, 9)):
        r, c = divmod(k, 2)
        assert tuple(arr[r * h + h - 1, c * w + w - 1]) == (0, 20 * s, 0)
    assert arr[:h, :w].max() > 200  # the label, light on black

    path = write_montage(tmp_path / "all.png", fused, names)  # 10 slices: 4 columns, 3 rows
    with Image.open(path) as im:
        assert im.size == (4 * w, 3 * h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.png", "m.png"]


# --------------------------------------------------------------------------- all-or-nothing outputs


def test_a_scan_output_and_its_montage_are_published_together_or_not_at_all(tmp_path, volumes, monkeypatch):
    import tfsdeploy.scans as scans

    scan = open_volumes(volumes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = scans.ScanOutput(scan, out_dir / "case.x4.nii.gz")
    assert output.montage == out_dir / "case.x4_montage.png"  # named from the whole output name
    output.check()
    fused = position_coded(Z, Y, X)
    assert output.publish(fused) == [out_dir / "case.x4.nii.gz"]
    first = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert sorted(first) == ["case.x4.nii.gz", "case.x4_montage.png"]

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scans, "montage_image", broken)  # the volume is staged, then the montage fails
    with pytest.raises(UserError, match=r"case\.x4\.nii\.gz: cannot write here \(No space left on device\)"):
        output.publish(fused[:, :, ::-1])
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == first  # the previous outputs, untouched


def test_a_folder_output_replaces_the_previous_one_as_a_whole(folders, tmp_path):
    scan = open_scan(folders["t1"], folders["t2"], folders["func"])
    out = tmp_path / "fused"
    out.mkdir()
    (out / "old.png").write_bytes(b"a slice of another scan")
    scan.write_output(out, position_coded(3, 16, 12))
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    (out / "notes.txt").write_text("not a slice")
    with pytest.raises(UserError, match="holds notes.txt, which is not a fused slice"):
        scan.write_output(out, position_coded(3, 16, 12))
    assert (out / "notes.txt").is_file()


def test_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path, volumes):
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    out = tmp_path / "fused.nii.gz"
    dead = tmp_path / f".fused.nii.gz.{dead_pid}.k9xq.tmp"  # a write killed with kill -9
    dead.write_bytes(b"half a volume")
    dead_dir = tmp_path / f".fused.nii.gz.{dead_pid}.abcd.tmp"
    (dead_dir / "inner").mkdir(parents=True)
    alive = tmp_path / f".fused.nii.gz.{os.getpid()}.live.tmp"  # a write still running
    alive.write_bytes(b"in progress")
    other = tmp_path / f".other.nii.gz.{dead_pid}.k9xq.tmp"  # another output's: not ours to judge
    other.write_bytes(b"x")
    open_volumes(volumes).write_output(out, position_coded(Z, Y, X))
    assert out.is_file() and not dead.exists() and not dead_dir.exists()
    assert alive.exists() and other.exists()
