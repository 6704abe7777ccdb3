"""The command line: end to end on a tiny trained model, and every bad-input path."""

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from tfsdeploy.cli import app
from tfsdeploy.imaging import read_image

runner = CliRunner()
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                reason="needs the onnx extra: pip install -e '.[onnx]'")


@pytest.fixture()
def triplet(synth_dataset):
    d = synth_dataset / "test"
    return [str(d / m / "e00.png") for m in ("t1", "t2", "func")]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res):
    assert res.exit_code != 0
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), pytest.param("ddpm", 0, marks=pytest.mark.slow)])
def test_fuse_end_to_end(tmp_path, tiny_run, triplet, sampler, steps):
    out = tmp_path / "fused.png"
    res = run("fuse", *triplet, "--scale", 4, "--model", tiny_run, "--out", out, "--sampler", sampler,
              "--steps", steps, "--no-progress")
    assert res.exit_code == 0, res.output
    img = read_image(out)
    assert img.shape == (3, 64, 64)
    # deterministic for a seed
    out2 = tmp_path / "again.png"
    run("fuse", *triplet, "--scale", 4, "--model", tiny_run, "--out", out2, "--sampler", sampler,
        "--steps", steps, "--no-progress")
    assert (read_image(out2) - img).abs().max() == 0


def test_fuse_accepts_16bit_tiff_jpeg_and_grey_functional_and_keeps_aspect(tmp_path, tiny_run):
    rng = np.random.default_rng(0)
    t1 = (rng.random((48, 32)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "t1.tif", t1)
    Image.fromarray((rng.random((48, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "t2.jpg")
    Image.fromarray((rng.random((48, 32)) * 255).astype(np.uint8)).save(tmp_path / "f.png")
    out = tmp_path / "o.png"
    res = run("fuse", tmp_path / "t1.tif", tmp_path / "t2.jpg", tmp_path / "f.png", "--scale", 8,
              "--model", tiny_run, "--out", out, "--steps", 2, "--no-progress")
    assert res.exit_code == 0, res.output
    img = read_image(out)
    # 48x32 padded to 48x48, fused at 64x64, then the padding (8 px a side -> 10.7) cropped off again
    assert img.shape[:2] == (3, 64) and abs(img.shape[2] - 64 * 32 / 48) < 1.5


def test_different_sizes(tmp_path, tiny_run, triplet):
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(tmp_path / "small.png")
    out = tmp_path / "o.png"
    line = one_error_line(run("fuse", triplet[0], tmp_path / "small.png", triplet[2], "--model", tiny_run,
                              "--out", out))
    assert "different sizes" in line and not out.exists()


def test_unreadable_and_missing_files(tmp_path, tiny_run, triplet):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "o.png"
    assert "cannot read" in one_error_line(run("fuse", bad, *triplet[1:], "--model", tiny_run, "--out", out))
    assert "no such file" in one_error_line(run("fuse", tmp_path / "gone.png", *triplet[1:], "--model", tiny_run,
                                                "--out", out))
    assert not out.exists()


def test_unsupported_scale(tmp_path, tiny_run, triplet):
    out = tmp_path / "o.png"
    assert "unsupported scale 3" in one_error_line(run("fuse", *triplet, "--scale", 3, "--model", tiny_run,
                                                       "--out", out))
    assert not out.exists()


def test_corrupted_and_mismatched_checkpoints(tmp_path, tiny_run, triplet):
    from tfsdeploy.checkpoint import resolve

    out = tmp_path / "o.png"
    broken = tmp_path / "broken"
    shutil.copytree(resolve(tiny_run), broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-5] ^= 0x55
    (broken / "model.safetensors").write_bytes(bytes(data))
    assert "corrupted" in one_error_line(run("fuse", *triplet, "--model", broken, "--out", out))

    mism = tmp_path / "mism"
    shutil.copytree(resolve(tiny_run), mism)
    meta = json.loads((mism / "config.json").read_text())
    meta["model"]["res_blocks"] = 2
    (mism / "config.json").write_text(json.dumps(meta))
    assert "do not match" in one_error_line(run("fuse", *triplet, "--model", mism, "--out", out))

    five = tmp_path / "five"
    shutil.copytree(resolve(tiny_run), five)
    meta["model"]["res_blocks"] = 1
    meta["model"]["cond_channels"] = 2
    (five / "config.json").write_text(json.dumps(meta))
    assert "condition channels" in one_error_line(run("fuse", *triplet, "--model", five, "--out", out))
    assert "no such checkpoint" in one_error_line(run("fuse", *triplet, "--model", tmp_path / "nope", "--out", out))
    assert not out.exists()


def test_unwritable_output(tmp_path, tiny_run, triplet):
    assert "does not exist" in one_error_line(run("fuse", *triplet, "--model", tiny_run,
                                                  "--out", tmp_path / "no" / "o.png"))
    assert "is a directory" in one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", tmp_path))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = run("fuse", *triplet, "--model", tiny_run, "--out", ro / "o.png")
        if res.exit_code == 0:  # root ignores permission bits
            pytest.skip("running as root: a read-only directory is still writable")
        assert "not writable" in one_error_line(res)
    finally:
        ro.chmod(0o755)


def test_bad_options_are_one_line_errors(tmp_path, tiny_run, triplet):
    out = tmp_path / "o.png"
    assert "sampler" in one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", out, "--sampler", "x"))
    assert "exceeds" in one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", out, "--steps", 10**6))
    assert "divisible" in one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", out, "--size", 66))
    assert "unknown preset" in one_error_line(run("train", "--out", tmp_path / "r", "--preset", "huge"))
    assert not out.exists()


def test_cli_as_a_real_process_prints_no_traceback(tmp_path, tiny_run, triplet):
    res = subprocess.run([sys.executable, "-m", "tfsdeploy", "fuse", *triplet, "--scale", "5", "--model",
                          str(tiny_run), "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unsupported scale 5; choose one of 2, 4, 8"


def test_data_build_and_train_resume_from_the_cli(tmp_path, synth_dataset):
    res = run("data", "build", "--out", tmp_path / "ds", "--size", 64, "--combos", "t1-t2-spect")
    assert res.exit_code == 0, res.output
    assert "train" in res.output and (tmp_path / "ds" / "summary.json").is_file()
    args = ["train", "--out", tmp_path / "r", "--preset", "tiny", "--data", synth_dataset, "--crop", 32,
            "--batch-size", 2, "--val-every", 0, "--no-progress"]
    assert run(*args, "--steps", 2).exit_code == 0
    res = run(*args, "--steps", 3)
    assert res.exit_code == 0 and "resumed" in res.output
    assert "cannot change" in one_error_line(run(*args, "--steps", 4, "--tmfa", "none"))


@needs_onnx
@pytest.mark.slow
def test_export_then_fuse_with_each_engine(tmp_path, tiny_run, triplet):
    res = run("export", tiny_run, "--parity-steps", 2, "--min-size", 32, "--max-size", 128)
    assert res.exit_code == 0, res.output
    assert "denoiser-fp32.onnx: parity" in res.output and "denoiser-fp16.onnx: parity" in res.output
    outs = {}
    for engine in ("torch", "onnx", "onnx-fp16", "auto"):
        out = tmp_path / f"{engine}.png"
        res = run("fuse", *triplet, "--model", tiny_run, "--engine", engine, "--out", out, "--steps", 4,
                  "--no-progress")
        assert res.exit_code == 0, res.output
        outs[engine] = read_image(out)
    assert "engine onnx fp32" in res.output  # auto picked ONNX Runtime on this CPU
    from tfsdeploy.metrics import psnr

    assert float(psnr(outs["onnx"][None], outs["torch"][None])) >= 45
    assert float(psnr(outs["onnx-fp16"][None], outs["torch"][None])) >= 35


@needs_onnx
def test_export_trt_without_tensorrt_fails_cleanly_but_keeps_onnx(tmp_path, tiny_run, triplet):
    from export.trt_build import tensorrt_status

    if tensorrt_status()[0] is not None:
        pytest.skip("TensorRT and a GPU are present here")
    out = tmp_path / "exp"
    res = run("export", tiny_run, "--trt", "--out", out, "--no-fp16", "--parity-steps", 2, "--min-size", 32,
              "--max-size", 64)
    line = one_error_line(res)
    assert line.startswith("error: --trt: ") and "ONNX files above were written" in line
    assert sorted(p.name for p in out.iterdir()) == ["denoiser-fp32.onnx", "denoiser-fp32.onnx.json"]
    fused = tmp_path / "o.png"
    assert "engine trt: " in one_error_line(run("fuse", *triplet, "--model", tiny_run, "--engine", "trt",
                                                "--out", fused))
    assert not fused.exists()


@needs_onnx
def test_info_lists_engines():
    res = run("info")
    assert res.exit_code == 0
    assert "engines:" in res.output and "onnx: onnxruntime" in res.output and "trt:" in res.output


def test_an_end_of_input_that_escapes_a_reader_is_one_line_and_exit_2(monkeypatch):
    """The parser turns an EOFError (a truncated file read by a library) into its `Abort`, as it does
    a Ctrl-C: it is one line naming it, exit 2, not a bare "aborted" with exit 1."""
    import tfsdeploy.data

    def truncated():
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(tfsdeploy.data, "default_data_dir", truncated)
    res = run("info")
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == ("error: aborted (EOFError: Compressed file ended before the end-of-stream "
                                   "marker was reached)")


# --------------------------------------------------------------------------- the bad-input sweep's finds


def test_resuming_a_run_without_repeating_its_preset(tmp_path, synth_dataset):
    """`train --out RUN` on a tiny-preset run, with no --preset, resumes with the run's own model
    (it used to crash in the preset check); an explicit, different --preset is one clear line."""
    args = ["train", "--out", tmp_path / "r", "--data", synth_dataset, "--crop", 32, "--batch-size", 2,
            "--val-every", 0, "--no-progress"]
    assert run(*args, "--preset", "tiny", "--steps", 1).exit_code == 0
    res = run(*args, "--steps", 2)
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    assert "different model than preset 'small'" in one_error_line(run(*args, "--steps", 3, "--preset", "small"))


def test_a_size_that_does_not_fit_in_memory_is_refused_before_sampling(tmp_path, tiny_run, triplet, monkeypatch):
    import tfsdeploy.pipeline as pipeline

    monkeypatch.setattr(pipeline, "free_memory", lambda device: 2**20)  # 1 MiB free
    line = one_error_line(run("fuse", *triplet, "--model", tiny_run, "--size", 4096, "--out", tmp_path / "o.png"))
    assert "4096x4096 slice needs about" in line and "smaller --size" in line
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("exc", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                              "549755813888 bytes. Error code 12 (Cannot allocate memory)"),
                                 "cuda"])
def test_allocator_failures_are_one_line(tmp_path, tiny_run, triplet, monkeypatch, exc):
    """The CPU allocator's RuntimeError and torch.OutOfMemoryError used to escape as tracebacks."""
    import torch

    from tfsdeploy.pipeline import FusionPipeline

    if exc == "cuda":
        exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(FusionPipeline, "__call__", fail)
    line = one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", tmp_path / "o.png"))
    assert line == "error: out of memory; try a smaller --size or --batch-size"


def test_other_runtime_errors_are_not_disguised(tmp_path, tiny_run, triplet, monkeypatch):
    from tfsdeploy.pipeline import FusionPipeline

    def fail(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(FusionPipeline, "__call__", fail)
    res = run("fuse", *triplet, "--model", tiny_run, "--out", tmp_path / "o.png")
    assert isinstance(res.exception, RuntimeError)  # a bug stays a bug, with its traceback


def test_files_where_folders_belong_and_parse_errors(tmp_path, tiny_run, triplet):
    a_file = tmp_path / "a"
    a_file.write_text("x")
    line = one_error_line(run("data", "build", "--out", a_file, "--size", 32))
    assert "is a file" in line  # used to be a NotADirectoryError traceback
    assert a_file.read_text() == "x"
    line = one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", a_file / "b.png"))
    assert f"{a_file} is a file" in line
    line = one_error_line(run("fuse", *triplet, "--model", tiny_run, "--steps", "abc"))
    assert "'--steps'" in line  # the parser's own errors are one line too
    assert "Missing argument" in one_error_line(run("fuse", triplet[0]))
    assert "unsupported scale 0" in one_error_line(run("fuse", *triplet, "--model", tiny_run, "--scale", 0))


def test_export_trt_without_onnx_does_not_claim_onnx_files(tmp_path, tiny_run):
    from engines.trt_engine import tensorrt_status

    if tensorrt_status()[0] is not None:
        pytest.skip("TensorRT is installed here")
    line = one_error_line(run("export", tiny_run, "--trt", "--no-onnx", "--no-fp16", "--out", tmp_path / "e"))
    assert "--trt" in line and "ONNX files" not in line
    assert not (tmp_path / "e").exists()


def test_an_output_the_system_refuses_is_refused_before_fusing(tmp_path, tiny_run, triplet, monkeypatch):
    """/proc passes the permission-bit check as root, so the write used to fail only after the fuse."""
    from pathlib import Path

    from tfsdeploy.pipeline import FusionPipeline

    if not Path("/proc").is_dir():
        pytest.skip("needs /proc (Linux)")

    def must_not_run(*a, **k):
        raise AssertionError("fused before checking the output")

    monkeypatch.setattr(FusionPipeline, "fuse_triplet", must_not_run)
    line = one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", "/proc/fused.png"))
    assert "/proc/fused.png" in line


def test_numbers_with_underscores_and_scales_given_twice_are_refused(tmp_path, tiny_run, triplet):
    out = tmp_path / "o.png"
    base = ("fuse", *triplet, "--model", tiny_run, "--out", out)
    line = one_error_line(run(*base, "--backproject", "0_5"))  # Python's float("0_5") is 5.0
    assert "'0_5' is not a number (write it without underscores)" in line and "--backproject" in line
    assert "'1_0' is not a number" in one_error_line(run(*base, "--steps", "1_0"))
    for option, value in (("--backproject", "4:0.5,4:0.7"), ("--ddim-steps", "4:5,4:7")):
        line = one_error_line(run("bundle", tmp_path / "b", "--x4", tiny_run, option, value))
        assert line == f"error: {option} gives scale 4 twice ('{value.split(',')[0]}' and '{value.split(',')[1]}'); " \
                       "give it once"
    assert "takes SCALE:STEPS pairs" in one_error_line(run("bundle", tmp_path / "b", "--x4", tiny_run,
                                                           "--ddim-steps", "4:1_0"))
    assert not out.exists() and not (tmp_path / "b").exists()


def test_options_a_baseline_cannot_honour_are_refused(tmp_path, tiny_run, triplet):
    out = tmp_path / "o.png"
    line = one_error_line(run("fuse", *triplet, "--model", tiny_run, "--out", out, "--method", "classical",
                              "--ensemble"))
    assert "--ensemble averages the model's fused images; the upsample-then-fuse baselines have no model" in line
    assert not out.exists()


def test_registration_options_are_described_and_go_with_register(tmp_path, tiny_run, triplet):
    res = runner.invoke(app, ["fuse", "--help"], env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    assert "needs pip install 'tfsdeploy[scans]'" in text  # not swallowed as markup
    assert "(t2_to_t1.tfm, func_to_t1.tfm, named after the --grid volume)" in text
    for option in ("--max-rotation", "--max-shift"):
        line = one_error_line(run("fuse", *triplet, "--model", tiny_run, option, "25"))
        assert line == f"error: {option} bounds the fit of --register; add --register"
