"""`fuse` on whole scans: three NIfTI volumes or three folders of slices, in batches sized to memory."""

import re

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import smooth_image
from tfsdeploy.cli import app
from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.errors import UserError
from tfsdeploy.inputs import as_triplet
from tfsdeploy.pipeline import FusionPipeline
from tfsdeploy.scans import open_scan

runner = CliRunner()
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res):
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture()
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for m in ("t1", "t2", "func"):
        data = np.stack([smooth_image(rng, 48)[:, :40] for _ in range(5)], axis=-1) * 1000  # x 48, y 40, z 5
        paths.append(tmp_path / f"{m}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), paths[-1])
    return paths


@pytest.fixture()
def pipe(tiny_run):
    return FusionPipeline.load(tiny_run, 4, SampleConfig(steps=2), EngineConfig(engine="torch"))


def test_a_scan_fuses_like_its_slices_one_by_one_at_any_batch_size(volumes, pipe):
    scan = open_scan(*volumes)
    assert len(scan) == 5
    whole = pipe.fuse_scan(scan, batch_size=2)
    assert whole.dtype == np.uint8 and whole.shape == (5, 3, 54, 64)  # 40 rows x 48 columns keep their aspect
    assert np.array_equal(pipe.fuse_scan(scan, batch_size=5), whole)
    assert np.array_equal(pipe.fuse_scan(scan), whole)  # the batch measured on its first slices
    for i in (0, 3):
        s = scan.slice(i)
        alone = pipe.fuse_triplet(as_triplet(s.t1, s.t2, s.func))
        assert np.abs((alone * 255 + 0.5).to(torch.uint8).numpy().astype(int) - whole[i]).max() <= 1


def test_fuse_cli_on_volumes_writes_an_rgb_volume_and_a_montage(tmp_path, volumes, tiny_run):
    out = tmp_path / "out" / "case.nii.gz"
    out.parent.mkdir()
    res = run("fuse", *volumes, "--model", tiny_run, "--out", out, "--steps", 2, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "5 slices" in res.stdout and (tmp_path / "out" / "case_montage.png").is_file()
    img = nib.load(out)
    assert img.shape == (64, 54, 5) and img.get_data_dtype().names == ("R", "G", "B")
    # the output covers the input's field of view: 48 x 40 voxels of 2 mm became 64 x 54
    assert np.allclose(np.abs(np.diag(img.affine))[:3], [2.0 * 48 / 64, 2.0 * 40 / 54, 2.5], atol=1e-3)


def test_a_cpu_scan_runs_at_the_batch_it_measured_on_its_first_slices(volumes, pipe, monkeypatch):
    scan = open_scan(*volumes)
    batches, real = [], pipe._fuse
    monkeypatch.setattr(pipe, "_fuse", lambda cond01, *a, **k: batches.append(len(cond01)) or real(cond01, *a, **k))
    choices = []
    pipe.fuse_scan(scan, on_choice=choices.append)
    [choice] = choices
    assert choice.how == "measured" and list(choice.per_slice_s)[:1] == [1] and choice.batch in choice.per_slice_s
    measured = [1, *choice.per_slice_s]  # an untimed slice, then 1, 2, ... up to the first slower one
    rest = len(scan) - sum(measured)
    tail = [choice.batch] * (rest // choice.batch) + ([rest % choice.batch] if rest % choice.batch else [])
    assert batches == measured + tail
    assert re.fullmatch(r"measured: \d+\.\d\d s a slice at batch 1(, \d+\.\d\d s at \d)*", choice.describe())


def test_the_fuse_line_says_how_the_batch_was_chosen(tmp_path, volumes, tiny_run):
    base = ["fuse", *volumes, "--model", tiny_run, "--steps", 1, "--no-progress", "--out"]
    res = run(*base, tmp_path / "a.nii.gz", "--batch-size", 2)
    assert res.exit_code == 0, res.output
    assert "fusing 5 slices of 48x40 in batches of 2 (set; x4, " in res.stderr
    res = run(*base, tmp_path / "b.nii.gz")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stderr.splitlines() if x.startswith("fusing 5 slices"))
    assert re.match(r"fusing 5 slices of 48x40 in batches of [12] \(measured: \d+\.\d\d s a slice at batch 1, ", line)


def test_a_cpu_scan_long_enough_for_an_export_to_pay_says_so(tmp_path, volumes, tiny_run, monkeypatch):
    from tfsdeploy import config

    monkeypatch.setattr(config, "ONNX_PAYS_AFTER_CALLS", 10)  # 5 slices x 2 steps
    base = ["fuse", *volumes, "--model", tiny_run, "--steps", 2, "--no-progress", "--batch-size", 5, "--out"]
    res = run(*base, tmp_path / "a.nii.gz")
    assert res.exit_code == 0, res.output
    assert f"note: this scan makes 10 denoiser calls, and on a CPU an ONNX export pays for itself after about 10: " \
           f"`tfsdeploy export {tiny_run}` once" in res.stderr
    res = run(*base, tmp_path / "b.nii.gz", "--engine", "torch")  # asked for torch: nothing to say
    assert res.exit_code == 0 and "note:" not in res.stderr
    monkeypatch.setattr(config, "ONNX_PAYS_AFTER_CALLS", 11)
    res = run(*base, tmp_path / "c.nii.gz")
    assert res.exit_code == 0 and "note:" not in res.stderr


def test_fuse_cli_on_folders_writes_a_folder_of_pngs(tmp_path, tiny_run):
    rng = np.random.default_rng(1)
    for m in ("t1", "t2", "func"):
        (tmp_path / m).mkdir()
        for name in ("a", "b", "c"):
            Image.fromarray((smooth_image(rng, 32) * 255).astype(np.uint8)).save(tmp_path / m / f"{name}.png")
    res = run("fuse", tmp_path / "t1", tmp_path / "t2", tmp_path / "func", "--model", tiny_run, "--steps", 1,
              "--out", tmp_path / "fused", "--no-progress")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == ["a.png", "b.png", "c.png"]
    assert Image.open(tmp_path / "fused" / "b.png").size == (64, 64)
    assert (tmp_path / "fused_montage.png").is_file()


def test_bad_scans_are_one_line_errors_and_leave_nothing(tmp_path, volumes, tiny_run):
    far = AFFINE.copy()
    far[2, 3] = 400.0  # another grid is resampled onto the T1's, but not one that misses it
    nib.save(nib.Nifti1Image(np.zeros((48, 40, 6), np.float32), far), tmp_path / "far.nii.gz")
    out = tmp_path / "o.nii.gz"
    assert "do not overlap" in one_error_line(run("fuse", volumes[0], volumes[1], tmp_path / "far.nii.gz",
                                                  "--model", tiny_run, "--out", out))
    nib.save(nib.Nifti1Image(np.zeros((48, 40, 5), np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "m.nii.gz")
    assert "covers only" in one_error_line(run("fuse", volumes[0], volumes[1], tmp_path / "m.nii.gz", "--model",
                                               tiny_run, "--out", out))
    # Beside volumes, a folder without slice images is read as a DICOM series.
    assert "no DICOM images" in one_error_line(run("fuse", volumes[0], volumes[1], tmp_path, "--model", tiny_run))
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    assert "not a mix" in one_error_line(run("fuse", volumes[0], volumes[1], tmp_path, "--model", tiny_run))
    assert "not a NIfTI volume" in one_error_line(run("fuse", png, volumes[1], volumes[2], "--model", tiny_run))
    assert "--method applies to single images" in one_error_line(run("fuse", *volumes, "--method", "guided"))
    assert "--batch-size" in one_error_line(run("fuse", *volumes, "--model", tiny_run, "--batch-size", -1))
    assert not out.exists() and not (tmp_path / "o_montage.png").exists()


def test_a_size_the_device_cannot_hold_is_refused_before_any_work(pipe, monkeypatch):
    import tfsdeploy.pipeline as pipeline

    need = pipe.slice_bytes(64)
    monkeypatch.setattr(pipeline, "free_memory", lambda device: 10 * need)
    assert pipe.max_batch(64) == 4  # the CPU cap; half of the memory would hold 5
    assert pipe.max_batch(64, cap=64) == 5
    monkeypatch.setattr(pipeline, "free_memory", lambda device: need)
    with pytest.raises(UserError, match="use a smaller --size"):
        pipe.fuse_triplet(as_triplet(torch.rand(1, 64, 64), torch.rand(1, 64, 64), torch.rand(1, 64, 64)))


def test_activation_estimate_grows_with_size_and_covers_attention():
    from tfsdeploy.config import PRESETS
    from tfsdeploy.model import activation_bytes

    paper = PRESETS["paper"]
    small, big = activation_bytes(paper, 256), activation_bytes(paper, 1024)
    assert 10 * small < big  # 16x the pixels, and the 16x16 attention level now attends over 64x64
    assert activation_bytes(paper, 4096) > 2**36  # (256*256)^2 fp32 attention scores alone are 16 GiB


def test_a_batch_beyond_the_exports_range_is_refused_before_any_denoiser_call(volumes, exported, monkeypatch):
    from engines.onnx_engine import OnnxDenoiser

    calls = []
    real = OnnxDenoiser.__call__
    monkeypatch.setattr(OnnxDenoiser, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    onnx_path = exported["fp32"][0]
    pipe = FusionPipeline.load(onnx_path, 4, SampleConfig(steps=2), EngineConfig(engine="onnx"))
    scan = open_scan(*volumes)
    with pytest.raises(UserError, match="batch 5 is outside the exported range 1..3"):
        pipe.fuse_scan(scan, size=64, batch_size=8)  # 5 slices: the first call would hold all of them
    assert calls == []
    assert pipe.fuse_scan(scan, size=64, batch_size=3).shape[0] == 5 and len(calls) == 2 * 2


def test_adapt_on_an_exported_artifact_names_the_artifact(tmp_path, volumes, exported):
    line = one_error_line(run("fuse", *volumes, "--model", exported["fp32"][0], "--adapt", 2, "--out",
                              tmp_path / "o.nii.gz"))
    assert "--adapt" in line and "exported artifact" in line and "engine torch" not in line
