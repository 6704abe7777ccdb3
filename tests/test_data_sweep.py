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

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import typing
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from conftest import smooth_image
from test_sweep import commands, parameters
from tfsdeploy.cli import app
from training import shrink
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


SHRINK = "training.shrink"  # a module run as `python -m training.shrink`, not a command of the CLI


@dataclasses.dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args) -> tuple:
    """Run the CLI (or, for SHRINK, that module's main) in-process; returns (result, the Python
    warnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args and args[0] == SHRINK:
            res = run_module_main(shrink.main, [str(a) for a in args[1:]])
        else:
            res = runner.invoke(app, [str(a) for a in args])
    return res, [f"{w.category.__name__}: {w.message}" for w in caught]


def run_module_main(main, argv: list[str]) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    code, exc = 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001 - reported by the caller's assertions
            code, exc = 1, e
            traceback.print_exc()
    return Ran(code, out.getvalue(), err.getvalue(), exc)


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
    refused(work, "fuse", *dirs, "-m", base["model"], "--out", kept, *FAST, match="holds notes.txt")
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


# --------------------------------------------------------------------------- every command that writes

# Every path a command takes is either only read or written. The tables are checked against the
# commands' own signatures, and against training.shrink's parser (a module run as
# `python -m training.shrink`, not a command of the CLI, which rewrites bundles as `bundle` writes
# them and builds the packaged model), so a new command or path option fails
# test_every_path_parameter_is_read_or_written until it is listed here, and every output listed
# must have a case in WRITERS.
READS = {
    ("fuse", "t1"), ("fuse", "t2"), ("fuse", "func"), ("fuse", "model"), ("fuse", "export_dir"),
    ("train", "data"), ("train", "init"), ("bundle", "x2"), ("bundle", "x4"), ("bundle", "x8"),
    ("export", "model"), ("evaluate", "model"), ("evaluate", "data"), ("evaluate", "lpips_backbone"),
    ("evaluate", "lpips_lin"), ("bench", "model"), ("bench", "data"), ("demo", "model"), (SHRINK, "bundle"),
    ("cohort", "bids_dir"), ("cohort", "model"), ("cohort", "export_dir"),
}
WRITES = {
    ("fuse", "out"), ("fuse", "save_transforms"), ("train", "out"), ("bundle", "out"), ("export", "out"),
    ("data build", "out"), ("evaluate", "out"), ("bench", "out"), ("demo", "out"), (SHRINK, "out"),
    ("cohort", "output_dir"),
}
# Outputs not yet put through WRITERS' cases, each with what guards it meanwhile. Keep this empty.
NOT_YET: dict = {}


def path_parameters() -> set[tuple[str, str]]:
    found = {(c, n) for c, fn in commands().items() for n, tp, _ in parameters(fn) if tp is Path}
    found |= {(SHRINK, a.dest) for a in shrink.parser()._actions if a.type is Path}
    return found


def test_every_path_parameter_is_read_or_written():
    assert path_parameters() == READS | WRITES and not READS & WRITES, (
        f"classify: {sorted(path_parameters() - READS - WRITES)}; gone: {sorted((READS | WRITES) - path_parameters())}")
    assert set(WRITERS) | set(NOT_YET) == WRITES and not set(WRITERS) & set(NOT_YET)


@dataclasses.dataclass
class Writer:
    """A cheap valid command line writing `out`, from inputs copied into the work folder."""

    argv: typing.Callable[[dict, Path], list]  # (the inputs by name, out) -> command line
    inputs: typing.Callable[[dict, Path], dict[str, Path]]  # (base, work) -> the inputs by name
    own: tuple[str, ...]  # files it writes: a folder holding only these is written over
    why_not: dict[str, str] = dataclasses.field(default_factory=dict)  # case -> why it does not apply


def _copied(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def thick(base) -> dict[str, np.ndarray]:
    """The plain volumes stacked to 9 slices: registration needs 8 voxels or more along each axis."""
    return {m: np.concatenate([base["vols"][m]] * 3, axis=2) for m in MODS}


def _run(base, work):
    return {"run": _copied(base["model"], work / "run")}


def _run_and_data(base, work):
    return {**_run(base, work), "data": _copied(base["dataset"], work / "ds")}


TRAIN = ["--preset", "tiny", "--steps", "1", "--batch-size", "1", "--crop", "32", "--val-every", "0", "--no-progress"]
BENCH = ["--engines", "torch", "--sizes", "32", "--batches", "1", "--repeats", "1", "--warmup", "0", "--fuse-steps",
         "1", "--ddpm-steps", "1", "--cold-runs", "0"]

WRITERS = {
    ("bundle", "out"): Writer(lambda i, o: ["bundle", o, "--x4", i["run"]], _run,
                              ("bundle.json", "x4.safetensors", "x2.safetensors")),
    (SHRINK, "out"): Writer(lambda i, o: [SHRINK, i["bundle"], "--scale", "4", "--alpha", "0.5", "--out", o],
                            lambda b, w: {"bundle": _copied(b["bundle"], w / "b")}, ("bundle.json", "x4.safetensors"),
                            {"is": "the same bundle is rewritten in place "
                                   "(test_shrink_in_place_touches_nothing_else)"}),
    ("train", "out"): Writer(lambda i, o: ["train", "--out", o, "--data", i["data"], *TRAIN],
                             lambda b, w: {"data": _copied(b["dataset"], w / "ds")}, ("log.jsonl",)),
    ("export", "out"): Writer(lambda i, o: ["export", i["run"], "--out", o, "--no-fp16", "--min-size", "32",
                                            "--max-size", "64", "--parity-steps", "1"], _run,
                              ("denoiser-fp32.onnx", "denoiser-fp32.onnx.json"),
                              {"inside": "a checkpoint's export folder lies inside it by design (CKPT/export); "
                                         "its files are the inputs"}),
    ("data build", "out"): Writer(lambda i, o: ["data", "build", "--out", o, "--size", "32", "--combos", "t1-t2-spect",
                                                "--sources", "spm", "--force"], lambda b, w: {},
                                  ("summary.json", "train/t1/old.png")),
    ("evaluate", "out"): Writer(lambda i, o: ["evaluate", "-m", i["run"], "--engine", "torch", "--data", i["data"],
                                              "--scales", "4", "--limit", "1", "--steps", "1", "--methods", "classical",
                                              "--out", o, "--no-progress"], _run_and_data,
                                ("report.md", "values.json")),
    ("bench", "out"): Writer(lambda i, o: ["bench", "-m", i["run"], *BENCH, "--out", o], _run,
                             ("bench.md", "bench.json")),
    ("demo", "out"): Writer(lambda i, o: ["demo", "-m", i["run"], "--engine", "torch", "--steps", "1", "--out", o,
                                          "--no-progress"], _run, ("fused.png", "side_by_side.png")),
    ("fuse", "out"): Writer(lambda i, o: ["fuse", i["t1"], i["t2"], i["func"], "-m", i["model"], "--out", o, *FAST],
                            lambda b, w: {**dict(zip(MODS, make_folders(b, w))),
                                          "model": _copied(b["model"], w / "run")},
                            ("s0.png", "old_slice.png")),
    ("cohort", "output_dir"): Writer(
        lambda i, o: ["cohort", i["manifest"], o, "participant", "-m", i["model"], *FAST],
        lambda b, w: _cohort_inputs(dict(zip(MODS, make_folders(b, w))), _copied(b["model"], w / "run"), w),
        ("participants.tsv", "cohort_report.html")),
    ("fuse", "save_transforms"): Writer(
        lambda i, o: ["fuse", i["t1"], i["t2"], i["func"], "-m", i["model"], "--out", i["t1"].parent / "o.nii.gz",
                      "--register", "--save-transforms", o, *FAST],
        lambda b, w: {**dict(zip(MODS, volumes(b, w, **thick(b)))), "model": _copied(b["model"], w / "run")},
        ("t2_to_t1.tfm", "old_to_t1.tfm")),
}


def _cohort_inputs(folders: dict[str, Path], model: Path, work: Path) -> dict[str, Path]:
    """A one-participant manifest naming the folders of slices, and the model."""
    manifest = work / "cohort.csv"
    manifest.write_text("id,t1,t2,func\na," + ",".join(str(folders[m]) for m in MODS) + "\n")
    return {**folders, "manifest": manifest, "model": model}


@pytest.fixture(scope="module")
def writer_base(base, small_bundle, synth_dataset):
    return {**base, "bundle": small_bundle, "dataset": synth_dataset}


@pytest.mark.parametrize("output", sorted(WRITERS), ids=[" ".join(k) for k in sorted(WRITERS)])
def test_every_output_spares_inputs_and_what_it_did_not_write(output, writer_base, work, monkeypatch):
    """For each output of each command: it may not be an input, lie inside an input folder or hold
    an input; an existing output that holds a file the command does not write is refused with one
    line naming that file, and stays as it was; one that holds only the command's own files is
    written over."""
    w = WRITERS[output]
    if output == ("fuse", "save_transforms"):
        pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
    inputs = w.inputs(writer_base, work)
    cases = 0
    for name, given in inputs.items():
        for case, out, word in (("is", given, "input"), ("inside", given / "sub", "input"),
                                ("holds", given.parent, "holds the input")):
            if case in w.why_not or (case == "inside" and not given.is_dir()):
                continue
            refused(work, *w.argv(inputs, out), match=word)
            cases += 1
    assert cases or output == ("data build", "out")  # it reads nothing but the installed templates
    out = work / "out"
    for rel in w.own:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    refused(work, *w.argv(inputs, out), match="notes.txt")
    (out / "notes.txt").unlink()
    if output == ("export", "out"):  # a real export takes the better part of a minute on this CPU
        import export.onnx_export as onnx_export

        def fake(model, precision, out, *args, **kwargs):
            (Path(out) / "denoiser-fp32.onnx").write_bytes(b"new")
            (Path(out) / "denoiser-fp32.onnx.json").write_text("{}")
            return Path(out) / "denoiser-fp32.onnx", {"relative_l2": 0.0, "limits": {"max_relative_l2": 1,
                                                      "min_fused_psnr_db": 1}, "fused_psnr_db": 99.0,
                                                      "ddim_steps": 1, "size": 32, "provider": "fake"}

        monkeypatch.setattr(onnx_export, "export_onnx", fake)
    res, _ = cli(*w.argv(inputs, out))
    assert res.exit_code == 0, res.output
    left = [rel for rel in w.own if (out / rel).is_file() and (out / rel).read_bytes() == b"old"]
    assert not left, f"{output}: {left} neither replaced nor removed"


def test_a_resumed_run_keeps_what_else_its_folder_holds(base, synth_dataset, work):
    run = _copied(base["model"], work / "run")  # at step 4
    (run / "notes.txt").write_text("mine")
    (run / "ckpt-0-notes").mkdir()  # named like a checkpoint, and older than all by name
    (run / "ckpt-0-notes" / "plan.md").write_text("mine too")
    res, _ = cli("train", "--out", run, "--data", synth_dataset, "--steps", "5", "--val-every", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    assert (run / "latest").read_text().strip() == "ckpt-0000005"
    assert (run / "notes.txt").read_text() == "mine" and (run / "ckpt-0-notes" / "plan.md").read_text() == "mine too"


def test_shrink_in_place_touches_nothing_else(small_bundle, work):
    b = _copied(small_bundle, work / "b")
    (b / "notes.txt").write_text("mine")
    (b / "export" / "x4").mkdir(parents=True)
    (b / "export" / "x4" / "denoiser-fp32.onnx").write_bytes(b"an export of the member")
    kept = hashes(b)
    res, _ = cli(SHRINK, b, "--scale", "4", "--alpha", "0.5")
    assert res.exit_code == 0, res.output
    changed = diff(kept, hashes(b))
    assert changed == ["bundle.json", "x4.safetensors"], changed
    from tfsdeploy.modelref import resolve_model

    assert resolve_model(b).manifest["models"]["4"]["residual_alpha"] == 0.5
    resolve_model(b).members()  # the new member matches its sha256 in bundle.json


def test_shrink_of_the_packaged_model_is_one_line(work):
    """`default` names the packaged bundle: it is read, never rewritten in place."""
    refused(work, SHRINK, "default", "--scale", "4", "--alpha", "0.5", match="--out")
    res, _ = cli(SHRINK, "default", "--scale", "4", "--ddim-steps", "1", "--out", work / "mine")
    assert res.exit_code == 0, res.output
    from tfsdeploy.modelref import resolve_model

    assert resolve_model(work / "mine").manifest["models"]["4"]["ddim_steps"] == 1
    assert sorted(p.name for p in (work / "mine").iterdir()) == ["bundle.json", "x2.safetensors", "x4.safetensors",
                                                                 "x8.safetensors"]


def test_written_files_follow_the_umask(base, small_bundle, work):
    """Bundle members, shrunk members and checkpoints get the permissions of any other output."""
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    res, _ = cli(SHRINK, small_bundle, "--scale", "4", "--alpha", "0.5", "--out", work / "shrunk")
    assert res.exit_code == 0, res.output
    modes = {p: p.stat().st_mode & 0o777 for p in (*small_bundle.iterdir(), *(work / "shrunk").iterdir(),
                                                  *base["model"].rglob("*.safetensors"))}
    assert all(m == want for m in modes.values()), {str(p): oct(m) for p, m in modes.items()}


@pytest.fixture()
def read_only(tmp_path):
    """A folder no file can be created in: a read-only tmpfs as root (which ignores permission
    bits), else a folder without write permission."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_save_transforms_where_nothing_can_be_written_is_refused_before_the_fuse(base, work, read_only):
    pytest.importorskip("SimpleITK", reason="needs the scans extra: pip install 'tfsdeploy[scans]'")
    vols = volumes(base, work, **thick(base))
    # began=False: the one line comes before the `fusing N slices` line, i.e. before any work
    refused(work, "fuse", *vols, "-m", base["model"], "--out", work / "o.nii.gz", "--register", "--save-transforms",
            read_only / "tfm", *FAST, match="cannot write here")


def test_a_truncated_volume_beside_volumes_on_another_grid_is_one_line(base, work):
    """Volumes on other grids are resampled: the damaged file is named before that reads it."""
    paths = volumes(base, work)
    other = AFFINE.copy()
    other[:3, :3] *= 0.8
    for p in paths[1:]:
        save_volume(p, base["vols"]["t2"], affine=other)
    whole = paths[0].read_bytes()
    paths[0].write_bytes(whole[: len(whole) // 2])  # the header reads, the voxels end early
    refused(work, "fuse", *paths, "-m", base["model"], "--out", work / "o.nii.gz", *FAST, match="t1.nii.gz")


def test_ctrl_c_once_the_output_is_published_exits_130_cleanly(base, work):
    """SIGINT as the interpreter exits, after a scan is published (here from an exit handler that
    the writer registers, so it lands while the handlers run): exit 130, one line, no traceback;
    the output, already complete, stays."""
    dirs = make_folders(base, work, 2)
    script = """
import atexit, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see the test above)
import tfsdeploy.scans as scans
publish = scans.ScanOutput.publish
def publish_then_ctrl_c(self, fused):
    written = publish(self, fused)
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))
    return written
scans.ScanOutput.publish = publish_then_ctrl_c
from tfsdeploy.cli import main
sys.argv = ["tfsdeploy"] + sys.argv[1:]
main()
"""
    args = [*dirs, "-m", base["model"], "--out", work / "fused", *FAST]
    proc = subprocess.run([sys.executable, "-c", script, "fuse", *map(str, args)], capture_output=True, text=True,
                          cwd=work, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("fusing ")]
    assert lines == ["error: interrupted"], proc.stderr
    assert sorted(p.name for p in (work / "fused").iterdir()) == ["s0.png", "s1.png"]
