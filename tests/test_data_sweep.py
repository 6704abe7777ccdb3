"""The bad-data sweep: malformed or unusual inputs and hostile conditions, beside the option sweep.

Every input is generated here. Each refused case must end with exit 2 (130 for Ctrl-C), exactly one
`error:` line on stderr, no traceback, no Python warning, and no new or changed file anywhere in
its work folder (every file is hashed before and after). Each case that is valid but unusual (an
EXIF-rotated JPEG, a palette PNG, a CMYK image, a 1-slice volume...) must fuse exactly like the same
data given in plain form (an upright 8-bit PNG, a plain 3-D volume).

Everything runs on a tiny model at --size 32 with one sampler step, so the whole file stays well
under a minute and a half on two CPU cores.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from conftest import smooth_image
from tfsdeploy.cli import app
from tfsdeploy.imaging import normalise_volume

# End to end through the command line and subprocesses: in the slow run (python -m pytest -m slow).
pytestmark = pytest.mark.slow

runner = CliRunner()
FAST = ["--engine", "torch", "--steps", "1", "--size", "32", "--no-progress"]
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
MODS = ("t1", "t2", "func")


# --------------------------------------------------------------------------- helpers


def hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> sha256; folders as their own entries."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def cli(*args) -> tuple:
    """Run the CLI in-process; returns (result, the Python warnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = runner.invoke(app, [str(a) for a in args])
    return res, [f"{w.category.__name__}: {w.message}" for w in caught]


def refused(root: Path, *args, match: str = "", code: int = 2, began: bool = False) -> str:
    """Run a command that must be refused cleanly and leave `root` exactly as it was; returns the line.
    With `began`, the refusal comes after the work, whose one `fusing N slices` line may precede it."""
    before = hashes(root)
    res, caught = cli(*args)
    shown = " ".join(map(str, args))
    assert res.exit_code == code, f"tfsdeploy {shown}: exit {res.exit_code}\n{res.output}"
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"tfsdeploy {shown} raised {type(res.exception).__name__}: {res.exception}")
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip() and not (began and line.startswith("fusing "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"tfsdeploy {shown}:\n{res.stderr}"
    assert not caught, f"tfsdeploy {shown} warned: {caught}"
    assert hashes(root) == before, f"tfsdeploy {shown} changed files: {diff(before, hashes(root))}"
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


def diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def fused_ok(*args) -> None:
    res, caught = cli(*args)
    assert res.exit_code == 0, f"tfsdeploy {' '.join(map(str, args))}\n{res.output}"
    assert not caught, caught
    assert "warning" not in res.stderr.lower(), res.stderr


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def save_u8(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def save_volume(path: Path, data: np.ndarray, affine=AFFINE, **header) -> Path:
    img = nib.Nifti1Image(data, affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, path)
    return path


def volume_slices(path: Path) -> np.ndarray:
    """An RGB24 output volume -> uint8 [Z, h, w, 3] slices in the project's orientation (canonical
    input: x along rows reversed by the row flip of reading)."""
    data = np.asanyarray(nib.load(path).dataobj)
    rgb = np.stack([data["R"], data["G"], data["B"]], axis=-1)  # [x, y, z, 3]
    return rgb.transpose(2, 1, 0, 3)[:, ::-1]


# --------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_run):
    """One plain triplet (64x48 8-bit PNGs), its fused result, and a plain 3-slice volume triplet."""
    root = tmp_path_factory.mktemp("datasweep")
    rng = np.random.default_rng(7)
    imgs = {m: (smooth_image(rng, 64)[:, 8:56] * 255).astype(np.uint8) for m in MODS}
    plain = {m: save_u8(root / f"{m}.png", a) for m, a in imgs.items()}
    ref = root / "ref.png"
    fused_ok("fuse", *plain.values(), "-m", tiny_run, "--out", ref, *FAST)
    vols = {}
    for m in MODS:
        data = np.stack([smooth_image(rng, 24)[:, :20] for _ in range(3)], axis=-1) * 1000  # x 24, y 20, z 3
        vols[m] = data.astype(np.float32)
    return {"root": root, "model": tiny_run, "imgs": imgs, "plain": plain, "ref": png(ref), "vols": vols}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def triplet(base, work: Path, **replace: Path) -> list[Path]:
    """The plain triplet copied into `work`, with some members replaced."""
    out = []
    for m in MODS:
        out.append(replace.get(m) or Path(shutil.copy(base["plain"][m], work / f"{m}.png")))
    return out


def volumes(base, work: Path, **replace: np.ndarray) -> list[Path]:
    return [save_volume(work / f"{m}.nii.gz", replace.get(m, base["vols"][m])) for m in MODS]


# --------------------------------------------------------------------------- refused inputs


def bad_images(base, work: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a T1 file that must be refused, a word the error line holds)."""
    t1 = base["imgs"]["t1"]
    cases = {
        "truncated png": (work / "trunc.png", "trunc.png"),
        "nii named png": (work / "vol.png", "vol.png"),
    }
    (work / "trunc.png").write_bytes(base["plain"]["t1"].read_bytes()[:200])
    (work / "vol.png").write_bytes(gzip.compress(b"\x5c\x01" + bytes(400)))
    nan = t1.astype(np.float32) / 255
    nan[3, 3] = np.nan
    tifffile.imwrite(work / "nan.tif", nan)
    cases["NaN"] = (work / "nan.tif", "NaN")
    inf = t1.astype(np.float32)
    inf[0, 0] = np.inf
    tifffile.imwrite(work / "inf.tif", inf)
    cases["inf"] = (work / "inf.tif", "infinite")
    tifffile.imwrite(work / "complex.tif", (t1 + 1j * t1).astype(np.complex64))
    cases["complex"] = (work / "complex.tif", "complex")
    for pages in (2, 3, 4, 5):
        tifffile.imwrite(work / f"pages{pages}.tif", np.stack([t1] * pages), photometric="minisblack")
        cases[f"{pages}-page tiff"] = (work / f"pages{pages}.tif", "pages")
    frames = [Image.fromarray(t1), Image.fromarray(255 - t1), Image.fromarray(t1 // 2)]
    frames[0].save(work / "pages.png.tiff", save_all=True, append_images=frames[1:], format="TIFF")
    cases["3-page tiff (Pillow)"] = (work / "pages.png.tiff", "pages")
    return cases


def test_bad_images_are_refused(base, work):
    cases = bad_images(base, work)
    for name, (path, word) in cases.items():
        t1, t2, func = triplet(base, work, t1=path)
        refused(work, "fuse", t1, t2, func, "-m", base["model"], "--out", work / "o.png", *FAST, match=word)
    for shape in ((300, 1), (3, 10000)):  # no pixel would be left on the short side
        slivers = [save_u8(work / f"{m}_sliver.png", np.full(shape, 90 + i, np.uint8)) for i, m in enumerate(MODS)]
        refused(work, "fuse", *slivers, "-m", base["model"], "--out", work / "o.png", *FAST, match="pixel")


def test_bad_volumes_are_refused(base, work):
    v = base["vols"]["t1"]
    cases = {
        "0 slices": (v[:, :, :0], "no voxels"),
        "4-D": (np.stack([v, v], axis=-1), "3-D"),
        "complex": ((v + 1j * v).astype(np.complex64), "complex"),
        "NaN": (np.where(v > 500, np.nan, v).astype(np.float32), "NaN"),
    }
    for name, (data, word) in cases.items():
        paths = volumes(base, work)
        save_volume(paths[0], data)
        refused(work, "fuse", *paths, "-m", base["model"], "--out", work / "o.nii.gz", *FAST, match=word)
    paths = volumes(base, work)
    save_volume(paths[0], base["vols"]["t1"], scl_slope=1e38, scl_inter=0.0)  # values overflow float32
    refused(work, "fuse", *paths, "-m", base["model"], "--out", work / "o.nii.gz", *FAST, match="infinite")
    far = AFFINE.copy()
    far[2, 3] = 300.0  # another grid is resampled onto the T1's, but not one that misses it
    save_volume(paths[0], base["vols"]["t1"][:, :, :2], affine=far)
    refused(work, "fuse", *paths, "-m", base["model"], "--out", work / "o.nii.gz", *FAST, match="do not overlap")
    for m, p in zip(MODS, volumes(base, work)):  # a sliver: 1 x 300 voxels in plane, 2 slices
        save_volume(p, np.ones((1, 300, 2), np.float32) * (1 + MODS.index(m)))
    refused(work, "fuse", *paths, "-m", base["model"], "--out", work / "o.nii.gz", *FAST, match="pixel")
    paths = volumes(base, work)
    paths[1].write_bytes(base["plain"]["t2"].read_bytes())  # a PNG named .nii.gz
    refused(work, "fuse", *paths, "-m", base["model"], "--out", work / "o.nii.gz", *FAST, match="t2.nii.gz")


def make_folders(base, work: Path, n: int = 2) -> list[Path]:
    dirs = [work / "scan" / m for m in MODS]
    for d, m in zip(dirs, MODS):
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            save_u8(d / f"s{i}.png", np.roll(base["imgs"][m], 3 * i, axis=1))
    return dirs


def test_bad_folder_slices_are_refused_before_any_work(base, work):
    dirs = make_folders(base, work, 3)
    save_u8(dirs[1] / "s2.png", np.zeros((40, 40), np.uint8))
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", work / "o", *FAST, match="40x40")
    (dirs[1] / "s2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", work / "o", *FAST, match="s2.png")


def test_outputs_that_alias_inputs_are_refused(base, work):
    imgs = triplet(base, work)
    refused(work, "fuse", *imgs, "-m", base["model"], "--out", imgs[0], *FAST, match="input")
    (work / "link.png").symlink_to(imgs[2])
    refused(work, "fuse", *imgs, "-m", base["model"], "--out", work / "link.png", *FAST, match="input")
    vols = volumes(base, work)
    refused(work, "fuse", *vols, "-m", base["model"], "--out", vols[0], *FAST, match="input")
    dirs = make_folders(base, work)
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", dirs[0], *FAST, match="input")
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", dirs[0] / "inner", *FAST, match="input")
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", work / "scan", *FAST, match="input")


def test_bad_dicom_series_and_volume_options_are_refused(base, work):
    pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
    pydicom = pytest.importorskip("pydicom", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
    from test_dicom_grids import write_series

    v = base["vols"]["t1"]
    t1 = nib.Nifti1Image(np.concatenate([v, v[:, :, :1]], axis=2), AFFINE)  # 4 slices
    paths = volumes(base, work)
    args = ("-m", base["model"], "--out", work / "o.nii.gz", *FAST)

    def series(name: str, **kw) -> Path:
        write_series(t1, work / name, name, **kw)
        return work / name

    gap = series("gap")
    (gap / "IM0001.dcm").unlink()
    refused(work, "fuse", gap, *paths[1:], *args, match="uneven slice spacing")
    turned = series("turned")
    ds = pydicom.dcmread(turned / "IM0002.dcm")
    ds.ImageOrientationPatient = ["-1", "0", "0", "0", "0", "-1"]
    ds.save_as(turned / "IM0002.dcm")
    refused(work, "fuse", turned, *paths[1:], *args, match="mixes 2 slice orientations")
    (work / "empty").mkdir()
    refused(work, "fuse", paths[0], work / "empty", paths[2], *args, match="the folder is empty")
    two = work / "two"
    write_series(t1, two / "a", "a", series_uid="1.2.3.1")
    write_series(t1, two / "b", "b", series_uid="1.2.3.2", number=2)
    refused(work, "fuse", two, *paths[1:], *args, match="holds 2 DICOM series")
    refused(work, "fuse", two, *paths[1:], *args, "--series", "1.2.3.9", match="holds no series 1.2.3.9")
    good = series("good")
    refused(work, "fuse", good, *paths[1:], *args, "--series", "1.2.3.9", match="no DICOM input holds")
    refused(work, "fuse", good, *paths[1:], *args, "--grid", "ct", match="--grid must be one of")
    refused(work, "fuse", good, *paths[1:], *args, "--save-transforms", work / "tfm", match="add --register")
    refused(work, "fuse", good, *paths[1:], *args, "--register", "--save-transforms", good, match="good")
    fused_ok("fuse", good, *paths[1:], *args)


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(base, work):
    dirs = make_folders(base, work)
    (work / "afile").write_text("x")
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", work / "afile", *FAST, match="not a folder")
    kept = work / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", kept, *FAST, match="replaced as a whole")
    vols = volumes(base, work)
    (work / "adir.nii.gz").mkdir()
    refused(work, "fuse", *vols, "-m", base["model"], "--out", work / "adir.nii.gz", *FAST, match="directory")
    refused(work, "fuse", *vols, "-m", base["model"], "--out", work / "o.png", *FAST, match=".nii")
    refused(work, "fuse", work / "none1", work / "none2", work / "none3", "-m", base["model"], "--out",
            work / "o.nii.gz", *FAST, match="none1: no such file")


BUNDLE_BREAKS = {
    "models is a list": lambda b: b.update(models=[]),
    "a member is a string": lambda b: b["models"].update({"4": "x4.safetensors"}),
    "no file": lambda b: b["models"]["4"].pop("file"),
    "file is a number": lambda b: b["models"]["4"].update(file=4),
    "file leaves the folder": lambda b: b["models"]["4"].update(file="../x4.safetensors"),
    "ddim_steps is text": lambda b: b["models"]["4"].update(ddim_steps="2"),
    "scale is a word": lambda b: b["models"].update({"four": b["models"]["4"]}),
    "notes is a list": lambda b: b.update(notes=[]),
    "format_version is text": lambda b: b.update(format_version="1"),
}


@pytest.fixture(scope="module")
def small_bundle(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    fused_ok("bundle", out, "--x4", base["model"])
    return out


def test_malformed_bundle_and_checkpoint_metadata_is_one_line(base, work, small_bundle):
    imgs = triplet(base, work)
    for name, brk in BUNDLE_BREAKS.items():
        b = work / "b"
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(small_bundle, b)
        meta = json.loads((b / "bundle.json").read_text())
        brk(meta)
        (b / "bundle.json").write_text(json.dumps(meta))
        refused(work, "fuse", *imgs, "-m", b, "--out", work / "o.png", *FAST, match="bundle.json")
    run = work / "run"
    shutil.copytree(base["model"], run)
    ckpt = next(p for p in run.iterdir() if p.is_dir())
    good = (ckpt / "config.json").read_text()
    for section, field, value in (("model", "image_size", "abc"), ("model", "channel_mults", "1,2"),
                                  ("schedule", "num_steps", 1.5), ("diffusion", "prediction", 3),
                                  ("model", None, [])):
        meta = json.loads(good)
        if field is None:
            meta[section] = value
        else:
            meta[section][field] = value
        (ckpt / "config.json").write_text(json.dumps(meta))
        line = refused(work, "fuse", *imgs, "-m", run, "--out", work / "o.png", *FAST, match="config.json")
        assert (field or section) in line


# --------------------------------------------------------------------------- valid but unusual inputs


def exif_jpeg(path: Path, upright: np.ndarray, orientation: int) -> Path:
    """Store `upright` turned so that a viewer applying EXIF `orientation` shows it upright."""
    stored = {1: upright, 2: upright[:, ::-1], 3: upright[::-1, ::-1], 4: upright[::-1],
              5: upright.T, 6: np.rot90(upright, 1), 7: upright[::-1, ::-1].T, 8: np.rot90(upright, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)
    return path


def upright_from_jpeg(path: Path, orientation: int) -> np.ndarray:
    """The JPEG's decoded pixels turned upright by hand (independently of Pillow's exif_transpose)."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"))
    return {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.T, 6: np.rot90(a, -1),
            7: a[::-1, ::-1].T, 8: np.rot90(a, 1)}[orientation]


def same_as_plain(base, work, odd: dict[str, Path], plain: dict[str, Path]) -> None:
    fused_ok("fuse", *triplet(base, work, **odd), "-m", base["model"], "--out", work / "odd.png", *FAST)
    fused_ok("fuse", *triplet(base, work, **plain), "-m", base["model"], "--out", work / "plain.png", *FAST)
    np.testing.assert_array_equal(png(work / "odd.png"), png(work / "plain.png"))


def test_an_exif_rotated_jpeg_fuses_like_the_upright_png(base, work):
    jpg = exif_jpeg(work / "o6.jpg", base["imgs"]["t1"], 6)
    same_as_plain(base, work, {"t1": jpg}, {"t1": save_u8(work / "u6.png", upright_from_jpeg(jpg, 6))})


def unusual_slices(base, work: Path) -> dict[str, tuple[str, Path, np.ndarray]]:
    """name -> (modality, an unusual file, the pixels it shows, as a plain 8-bit array)."""
    t1, t2, func = (base["imgs"][m] for m in MODS)
    out = {}
    for n in range(1, 9):  # every EXIF orientation of a JPEG, every TIFF orientation tag
        jpg = exif_jpeg(work / f"j{n}.jpg", t1, n)
        upright = upright_from_jpeg(jpg, n)
        assert upright.shape == t1.shape and np.abs(upright.astype(int) - t1).mean() < 3  # it is upright
        out[f"j{n}"] = ("t1", jpg, upright)
        stored = {1: t1, 2: t1[:, ::-1], 3: t1[::-1, ::-1], 4: t1[::-1], 5: t1.T, 6: np.rot90(t1, 1),
                  7: t1[::-1, ::-1].T, 8: np.rot90(t1, -1)}[n]
        tifffile.imwrite(work / f"t{n}.tif", np.ascontiguousarray(stored), extratags=[(274, "H", 1, n, True)])
        out[f"t{n}"] = ("t1", work / f"t{n}.tif", t1)
    # Palette with transparency: its colours, the alpha dropped.
    Image.fromarray(func).convert("P").save(work / "pal.png", transparency=0)
    out["pal"] = ("func", work / "pal.png", np.asarray(Image.open(work / "pal.png").convert("RGBA"))[..., :3])
    # CMYK JPEG and TIFF: converted to RGB as a viewer does.
    cmyk = Image.fromarray(np.stack([func, 255 - func, func // 2], -1)).convert("CMYK")
    for ext in ("jpg", "tif"):
        cmyk.save(work / f"cmyk.{ext}", **({"quality": 95} if ext == "jpg" else {}))
        out[f"cmyk{ext}"] = ("func", work / f"cmyk.{ext}", np.asarray(Image.open(work / f"cmyk.{ext}").convert("RGB")))
    # One TIFF page with three separate colour planes is one RGB image.
    planes = np.stack([func, 255 - func, func // 2])
    tifffile.imwrite(work / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    out["planar"] = ("func", work / "planar.tif", planes.transpose(1, 2, 0))
    # All zero in 16 bits is the same black as in 8 bits.
    zeros = np.zeros_like(t2)
    Image.fromarray(zeros.astype(np.uint16)).save(work / "z16.png")
    assert Image.open(work / "z16.png").mode.startswith("I")
    out["z16"] = ("t2", work / "z16.png", zeros)
    return out


def test_unusual_images_fuse_like_their_plain_form(base, work):
    """Each unusual file is a slice of a folder scan; the same slices in plain form (8-bit PNGs of
    the pixels a viewer shows) must fuse to exactly the same output."""
    (work / "src").mkdir()
    cases = unusual_slices(base, work / "src")
    odd, plain = work / "odd", work / "plain"
    for root in (odd, plain):
        for m in MODS:
            (root / m).mkdir(parents=True)
    for name, (mod, file, pixels) in cases.items():
        for m in MODS:
            if m == mod:
                shutil.copy(file, odd / m / f"{name}{file.suffix}")
                save_u8(plain / m / f"{name}.png", np.ascontiguousarray(pixels))
            else:
                for root in (odd, plain):
                    shutil.copy(base["plain"][m], root / m / f"{name}.png")
    fused_ok("fuse", *(odd / m for m in MODS), "-m", base["model"], "--out", work / "odd_fused", *FAST)
    fused_ok("fuse", *(plain / m for m in MODS), "-m", base["model"], "--out", work / "plain_fused", *FAST)
    for name in cases:
        np.testing.assert_array_equal(png(work / "odd_fused" / f"{name}.png"),
                                      png(work / "plain_fused" / f"{name}.png"), err_msg=name)
    # A slice of the scan fuses like the same triplet given as images (TIFF orientation 1 is the plain T1).
    assert np.abs(png(work / "odd_fused" / "t1.png").astype(int) - base["ref"]).max() <= 1


def test_unusual_volumes_fuse_like_their_plain_form(base, work):
    one = {m: base["vols"][m][:, :, 1:2] for m in MODS}
    # A 4-D volume with one frame is the 3-D volume.
    odd = [save_volume(work / f"{m}4d.nii.gz", one[m][..., None]) for m in MODS]
    fused_ok("fuse", *odd, "-m", base["model"], "--out", work / "odd.nii.gz", *FAST)
    plain = volumes(base, work, **one)
    fused_ok("fuse", *plain, "-m", base["model"], "--out", work / "plain.nii.gz", *FAST)
    got = volume_slices(work / "odd.nii.gz")
    np.testing.assert_array_equal(got, volume_slices(work / "plain.nii.gz"))
    # A 1-slice volume fuses like its normalised slice given as float images in [0, 1].
    flat = []
    for m in MODS:
        sl = normalise_volume(one[m])[:, :, 0].T[::-1]  # [y, x], anterior up: the project's orientation
        tifffile.imwrite(work / f"{m}_slice.tif", np.ascontiguousarray(sl, dtype=np.float32))
        flat.append(work / f"{m}_slice.tif")
    fused_ok("fuse", *flat, "-m", base["model"], "--out", work / "slice.png", *FAST)
    assert got.shape[0] == 1
    np.testing.assert_array_equal(got[0], png(work / "slice.png"))


# --------------------------------------------------------------------------- outputs


def test_existing_output_folder_is_replaced_as_a_whole(base, work):
    dirs = make_folders(base, work)
    out = work / "fused"
    out.mkdir()
    (out / "old_slice.png").write_bytes(base["plain"]["t1"].read_bytes())
    fused_ok("fuse", *dirs, "-m", base["model"], "--out", out, *FAST)
    assert sorted(p.name for p in out.iterdir()) == ["s0.png", "s1.png"]
    assert sorted(p.name for p in work.iterdir()) == ["fused", "fused_montage.png", "scan"]


def test_dotted_output_names_get_their_own_montage(base, work):
    vols = volumes(base, work, **{m: base["vols"][m][:, :, :1] for m in MODS})
    for name in ("case.x4.nii.gz", "case.x8.nii"):
        fused_ok("fuse", *vols, "-m", base["model"], "--out", work / name, *FAST)
    names = sorted(p.name for p in work.iterdir() if not p.name.startswith(("t1", "t2", "func")))
    assert names == ["case.x4.nii.gz", "case.x4_montage.png", "case.x8.nii", "case.x8_montage.png"]


@pytest.fixture()
def full_disk(tmp_path):
    """A 160 KiB tmpfs: room for small inputs, not for the outputs. Needs root (mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root to mount")
    where = tmp_path / "full"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave: int) -> None:
    """Fill the tmpfs until about `leave` bytes are free."""
    free = shutil.disk_usage(where).free
    (where / "ballast").write_bytes(bytes(max(0, free - leave)))


def test_a_full_disk_leaves_nothing_behind(base, full_disk, small_bundle, tmp_path):
    work = full_disk
    vols = [save_volume(tmp_path / f"{m}.nii.gz", base["vols"][m]) for m in MODS]
    dirs = make_folders(base, tmp_path, 2)
    imgs = [base["plain"][m] for m in MODS]
    # Room for a fused volume but not for its montage, for one slice of a folder but not two, for
    # no image at all.
    for inputs, out, leave in ((vols, work / "o.nii.gz", 5_000), (dirs, work / "o", 5_000),
                               (imgs, work / "o.png", 0)):
        fill(work, leave)
        line = refused(work, "fuse", *inputs, "-m", base["model"], "--out", out, *FAST, match="no space", began=True)
        assert str(out) in line
        (work / "ballast").unlink()
    ds = base["root"] / "ds"
    if not ds.exists():
        for split in ("train", "val", "test"):
            for m, d in zip(MODS, make_folders(base, base["root"] / "tmpds", 1)):
                shutil.copytree(d, ds / split / m)
            shutil.copytree(ds / split / "func", ds / split / "gt")
    fill(work, 40_000)
    refused(work, "train", "--out", work / "run", "--preset", "tiny", "--data", ds, "--steps", "1", "--batch-size",
            "1", "--crop", "32", "--val-every", "0", "--no-progress", match="no space")
    refused(work, "bundle", work / "b", "--x4", base["model"], "--fp32", match="no space")


def test_an_export_that_fails_on_a_full_disk_leaves_no_empty_folder(base, work, monkeypatch):
    """The exporter makes its folder, then the disk fills while the graph is written (simulated here:
    a real export takes the better part of a minute on this CPU)."""
    import errno

    import export.onnx_export as onnx_export

    def full(model, precision, out, *args, **kwargs):
        Path(out).mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_export, "export_onnx", full)
    refused(work, "export", base["model"], "--out", work / "new" / "export", "--no-fp16", match="no space")


def test_ctrl_c_while_writing_a_scan_leaves_no_output(base, work):
    """SIGINT lands while the folder's slices are being written (the writer is slowed down and says
    when it has begun): exit 130, one line, and neither the output nor its staging folder remains."""
    dirs = make_folders(base, work, 40)
    started = work / "writing-started"
    script = f"""
import signal, sys, time
import PIL.Image
from pathlib import Path
# as in a terminal: a test runner started in the background (nohup, `&`) hands its children SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler of its own
signal.signal(signal.SIGINT, signal.default_int_handler)
save = PIL.Image.Image.save
def slow_save(self, fp, *a, **k):
    save(self, fp, *a, **k)
    Path({str(started)!r}).touch()
    time.sleep(0.25)  # a window of seconds for the signal, even on a loaded machine
PIL.Image.Image.save = slow_save
from tfsdeploy.cli import main
sys.argv = ["tfsdeploy"] + sys.argv[1:]
main()
"""
    args = [*dirs, "-m", base["model"], "--out", work / "fused", *FAST]
    before = hashes(work)
    proc = subprocess.Popen([sys.executable, "-c", script, "fuse", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=work,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always"})
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    started.unlink()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("fusing ")]
    assert lines == ["error: interrupted"], err
    assert hashes(work) == before, diff(before, hashes(work))


def test_large_images_are_read_without_a_warning(base, work, monkeypatch):
    """Pillow warns of a "decompression bomb" above MAX_IMAGE_PIXELS (89 MP); such an image is read all
    the same, so the warning is not shown. (A smaller limit stands in for a 100 MP file.)"""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 2000)  # the 64x48 inputs hold 3072 pixels
    fused_ok("fuse", *triplet(base, work), "-m", base["model"], "--out", work / "o.png", *FAST)
    np.testing.assert_array_equal(png(work / "o.png"), base["ref"])


def test_duplicate_combinations_are_refused_before_any_work(work):
    refused(work, "data", "build", "--out", work / "ds", "--size", 32, "--combos", "t1-t2-spect,t1-t2-spect",
            match="more than once")


# --------------------------------------------------------------------------- datasets


def test_bad_dataset_slices_are_refused_by_train_and_evaluate(base, work):
    ds = work / "ds"
    for split in ("train", "val", "test"):
        for m, d in zip(MODS, make_folders(base, work / "src" / split, 2)):
            shutil.copytree(d, ds / split / m)
        shutil.copytree(ds / split / "func", ds / split / "gt")
    for split in ("train", "test"):
        (ds / split / "t2" / "s1.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    train = ["train", "--out", work / "run", "--preset", "tiny", "--data", ds, "--steps", "1", "--batch-size", "1",
             "--crop", "32", "--val-every", "0", "--no-progress"]
    refused(work, *train, match="s1.png")
    refused(work, "evaluate", "-m", base["model"], "--engine", "torch", "--data", ds, "--scales", "4", "--steps", "1",
            "--out", work / "eval", "--no-progress", match="s1.png")
    tifffile.imwrite(ds / "train" / "t2" / "s1.tif", np.stack([base["imgs"]["t2"]] * 3), photometric="minisblack")
    (ds / "train" / "t2" / "s1.png").unlink()
    refused(work, *train, match="pages")
