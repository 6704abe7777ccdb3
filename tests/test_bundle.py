"""Bundles (one checkpoint per scale), the packaged default model, and `tfsdeploy demo`."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tfsdeploy import modelref
from tfsdeploy.bundle import DEFAULT_BUNDLE, make_bundle
from tfsdeploy.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from tfsdeploy.cli import app
from tfsdeploy.errors import UserError
from tfsdeploy.imaging import read_image
from tfsdeploy.model import build_model
from tfsdeploy.modelref import default_model, resolve_model

from conftest import randomize_output, tiny_configs

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_checkpoint(path, scales, seed):
    cfg = tiny_configs()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, scales=tuple(scales)))
    torch.manual_seed(seed)
    model = randomize_output(build_model(cfg.model), seed)
    return save_checkpoint(path, cfg, 1, model.state_dict())


@pytest.fixture()
def three(tmp_path):
    return {2: tiny_checkpoint(tmp_path / "a", [2, 4, 8], 1), 4: tiny_checkpoint(tmp_path / "b", [4], 2),
            8: tiny_checkpoint(tmp_path / "c", [8], 3)}


def test_bundle_round_trip_in_fp16_and_fp32(tmp_path, three):
    for fp16 in (True, False):
        out = make_bundle(three, tmp_path / f"bundle-{fp16}", fp16=fp16, notes="n")
        ref = resolve_model(out)
        meta = ref.manifest
        assert ref.kind == "bundle" and sorted(meta["models"]) == ["2", "4", "8"] and ref.notes == "n"
        assert meta["models"]["4"]["trained_scales"] == [4]
        members = resolve_model(out).members()
        for scale, src in three.items():
            raw = load_file(str(members[scale]))
            assert all(v.dtype == (torch.float16 if fp16 else torch.float32) for v in raw.values())
            original, _ = build_from_checkpoint(src)
            packed, ckpt = build_from_checkpoint(members[scale])  # a lone file is a whole checkpoint
            assert ckpt.configs == load_checkpoint(src).configs
            for (k, a), b in zip(original.state_dict().items(), packed.state_dict().values()):
                assert b.dtype == torch.float32
                tol = 1e-3 * a.abs().max().item() + 1e-6 if fp16 else 0
                assert (a - b).abs().max().item() <= tol, k
        assert resolve_model(out).member(4) == members[4]
        assert resolve_model(three[4]).member(2) == three[4]  # a plain checkpoint serves every scale


def test_the_resolver_names_each_kind_and_its_fingerprint(tmp_path, three):
    from tfsdeploy.artifacts import checkpoint_fingerprint
    from tfsdeploy.checkpoint import sha256_file

    run_folder, ckpt = three[4].parent, three[4]
    assert resolve_model(run_folder).kind == "run" and resolve_model(ckpt).kind == "checkpoint"
    assert resolve_model(run_folder).fingerprint() == checkpoint_fingerprint(ckpt)["sha256"]  # its newest
    assert resolve_model(tmp_path / "denoiser-fp32.onnx").kind == "artifact"
    out = make_bundle({4: ckpt}, tmp_path / "bundle")
    assert resolve_model(out).fingerprint() == sha256_file(out / "bundle.json")
    assert resolve_model(out).scales == [4] and resolve_model(ckpt).scales == []
    ref = resolve_model(out)
    assert resolve_model(ref) is ref and ref.member(4) is ref.member(4)  # checked once per resolution


def test_bundle_errors(tmp_path, three):
    with pytest.raises(UserError, match="not x2"):
        make_bundle({2: three[4]}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing half-written
    out = make_bundle({4: three[4]}, tmp_path / "one")
    with pytest.raises(UserError, match=r"no model for x8 \(this bundle has x4\)"):
        resolve_model(out).member(8)
    f = out / "x4.safetensors"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="corrupted"):
        resolve_model(out).member(4)
    (out / "bundle.json").write_text("{}")
    with pytest.raises(UserError, match="not a tfsdeploy bundle"):
        resolve_model(out).members()


def test_cli_bundle_then_fuse_picks_the_member_for_the_scale(tmp_path, three, synth_dataset):
    out = tmp_path / "bundle"
    res = run("bundle", out, "--x2", three[2], "--x4", three[4], "--x8", three[8], "--fp32")
    assert res.exit_code == 0, res.output
    trip = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    imgs = {}
    for scale in (4, 8):
        res = run("fuse", *trip, "--scale", scale, "--model", out, "--out", tmp_path / f"{scale}.png",
                  "--no-progress")
        assert res.exit_code == 0, res.output
        assert f"x{scale}.safetensors" in res.output and "ddim-10" in res.output
        # the same result as fusing with that member's own checkpoint
        res = run("fuse", *trip, "--scale", scale, "--model", three[scale], "--out", tmp_path / f"{scale}-own.png",
                  "--no-progress")
        imgs[scale] = read_image(tmp_path / f"{scale}.png")
        assert torch.equal(imgs[scale], read_image(tmp_path / f"{scale}-own.png"))
    res = run("bundle", tmp_path / "none")
    assert res.exit_code != 0 and "at least one" in res.stderr


def test_a_bundle_recommends_its_ddim_steps_and_an_explicit_steps_wins(tmp_path, three, synth_dataset):
    out = tmp_path / "bundle"
    res = run("bundle", out, "--x4", three[4], "--x8", three[8], "--ddim-steps", "4:3")
    assert res.exit_code == 0, res.output
    ref = resolve_model(out)
    assert ref.ddim_steps(4) == 3 and ref.ddim_steps(8) == 0 and resolve_model(three[4]).ddim_steps(4) == 0
    trip = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    for scale, extra, want in ((4, [], "ddim-3"), (4, ["--steps", 5], "ddim-5"), (8, [], "ddim-10")):
        res = run("fuse", *trip, "--scale", scale, "--model", out, "--out", tmp_path / "f.png", "--no-progress", *extra)
        assert res.exit_code == 0 and want in res.output, res.output
    for bad in ("4:x", "2:3", "4:0"):
        res = run("bundle", tmp_path / "bad", "--x4", three[4], "--ddim-steps", bad)
        assert res.exit_code != 0 and "--ddim-steps" in res.stderr
    with pytest.raises(UserError, match="exceed"):
        make_bundle({4: three[4]}, tmp_path / "huge", ddim_steps={4: 10**6})


def test_evaluate_runs_each_scale_on_its_member(tmp_path, three, synth_dataset):
    from test_evaluate import evaluate
    from tfsdeploy.tools.evaluate import EvalConfig

    out = make_bundle(three, tmp_path / "bundle")
    cfg = EvalConfig(scales=(4, 8), methods=("classical",), limit=1)
    a = evaluate([out], synth_dataset, tmp_path / "e1", cfg, log=lambda s: None)
    b = evaluate([three[8]], synth_dataset, tmp_path / "e2", cfg, log=lambda s: None)
    psnr = {k: a["tables"][k]["reference"]["bundle"]["PSNR"] for k in ("x4", "x8")}
    assert a["methods"]["bundle"]["sampling"] == "x4 ddim-10, x8 ddim-10"
    # at x8 the bundle runs the x8 member, so it matches that checkpoint evaluated alone
    assert psnr["x8"] == pytest.approx(b["tables"]["x8"]["reference"]["c"]["PSNR"], abs=0.05)
    with pytest.raises(UserError, match="no model for x2"):
        evaluate([make_bundle({4: three[4]}, tmp_path / "only4")], synth_dataset, tmp_path / "e3",
                 EvalConfig(scales=(2,), methods=(), limit=1), log=lambda s: None)


def test_export_of_a_bundle_writes_one_folder_per_member(tmp_path, three):
    pytest.importorskip("onnxruntime")
    out = make_bundle({4: three[4], 8: three[8]}, tmp_path / "bundle")
    res = run("export", out, "--no-fp16", "--max-size", 64, "--parity-steps", 2)
    assert res.exit_code == 0, res.output
    for s in (4, 8):
        assert (out / "export" / f"x{s}" / "denoiser-fp32.onnx").is_file()


def test_default_model_is_packaged_small_and_complete():
    ref = resolve_model(None)
    assert ref.kind == "bundle" and ref.path == DEFAULT_BUNDLE
    members = ref.members()  # checks every sha256
    assert sorted(members) == [2, 4, 8]
    assert sum(f.stat().st_size for f in DEFAULT_BUNDLE.iterdir()) <= 25e6
    for scale, path in members.items():
        ckpt = load_checkpoint(path)
        assert scale in ckpt.configs.data.scales
        assert ckpt.configs.diffusion.objective == "diffusion"  # a diffusion model, not the regression bound
        assert sum(v.numel() for v in ckpt.weights.values()) < 4.5e6
    assert default_model() == DEFAULT_BUNDLE and resolve_model("default").path == DEFAULT_BUNDLE
    # DDIM-1 for every member, the residual shrinks and the inputs' back-projection, chosen on the
    # validation split and the out-of-domain proxies (MODEL_CARD.md, benchmarks/reports/proxy-experiments.md)
    models = ref.manifest["models"]
    assert all(m["ddim_steps"] == 1 for m in models.values())
    # (x8 was fine-tuned from its member shrunk by 0.9, so the shrink is in its start, not recorded on it)
    assert {s: m.get("residual_alpha") for s, m in models.items()} == {"2": 0.0, "4": 0.48, "8": None}
    assert {s: m.get("backproject") for s, m in models.items()} == {"2": 3.0, "4": 0.75, "8": 1.5}
    assert {s: m.get("backproject_gate") for s, m in models.items()} == {"2": [0.37, 0.42], "4": None, "8": None}
    assert load_checkpoint(members[8]).configs.data.degradation == "varied"
    assert json.loads((DEFAULT_BUNDLE / "bundle.json").read_text())["format"] == "tfsdeploy-bundle"


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch, synth_dataset):
    monkeypatch.setattr(modelref, "DEFAULT_BUNDLE", tmp_path / "nowhere")
    trip = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    res = run("fuse", *trip, "--out", tmp_path / "f.png")
    assert res.exit_code != 0 and "packaged default model is missing" in res.stderr
    monkeypatch.setenv("TFSDEPLOY_MODEL", str(tmp_path / "elsewhere"))
    assert default_model() == tmp_path / "elsewhere"


def test_demo_with_the_default_model_beats_the_baseline(tmp_path):
    """The shipped x4 model against bicubic + classical fusion on the held-out demo slice."""
    out = tmp_path / "demo"
    res = run("demo", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    for name in ("t1", "t2", "func", "fused", "baseline", "reference", "side_by_side"):
        assert (out / f"{name}.png").is_file()
    assert read_image(out / "t1.png").shape == (1, 64, 64)  # the inputs are the low-resolution images
    fused, base, ref = (read_image(out / f"{n}.png") for n in ("fused", "baseline", "reference"))
    assert fused.shape == base.shape == ref.shape == (3, 256, 256)
    mse = {k: float(((v - ref) ** 2).mean()) for k, v in (("fused", fused), ("base", base))}
    assert mse["fused"] < 0.9 * mse["base"]
    side = read_image(out / "side_by_side.png")
    assert side.shape[-1] > 6 * 256 and side.shape[-2] > 256


def test_demo_bad_inputs(tmp_path):
    res = run("demo", "--scale", 3, "--out", tmp_path / "d")
    assert res.exit_code != 0 and "unsupported scale 3; choose one of 2, 4, 8" in res.stderr
    res = run("demo", "--combo", "t1-ct", "--out", tmp_path / "d")
    assert res.exit_code != 0 and "unknown combination" in res.stderr


def test_blend_stores_the_weighted_mean_of_a_fine_tune_and_its_start(tmp_path, synth_dataset):
    """`bundle --blend A`: each weight is (1 - A) * start + A * fine-tuned, the provenance is recorded,
    and every way it cannot be done is one clear error."""
    from training.train import Trainer

    start = tiny_checkpoint(tmp_path / "start", [2, 4, 8], 5)
    Trainer(tmp_path / "ft", tiny_configs(steps=2), synth_dataset, log=lambda s: None, init_from=start).run()
    res = run("bundle", tmp_path / "b", "--x4", tmp_path / "ft", "--fp32", "--blend", "0.25")
    assert res.exit_code == 0, res.output
    a, b = load_checkpoint(start).weights, load_checkpoint(tmp_path / "ft").weights
    got = load_file(str(tmp_path / "b" / "x4.safetensors"))
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert moved  # the fine-tune changed weights, so the blend is not trivially either end
    for k in a:
        want = 0.75 * a[k].float() + 0.25 * b[k].float() if a[k].is_floating_point() else a[k]
        torch.testing.assert_close(got[k].float(), want.float(), rtol=1e-6, atol=1e-7)
    entry = resolve_model(tmp_path / "b").manifest["models"]["4"]
    assert entry["blend"] == 0.25
    assert load_checkpoint(tmp_path / "b" / "x4.safetensors").meta["blend"]["init"]["step"] == 1

    def error(*args):
        res = run("bundle", tmp_path / "e", *args)
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output
        assert not (tmp_path / "e").exists()
        return lines[0]

    assert "trained from scratch" in error("--x4", start, "--blend", "4:0.5")
    assert "none of the models" in error("--x4", start, "--blend", "0.5")
    # A member that is already a blend is named as such, not as changed since its fine-tune.
    assert "already a blend" in error("--x4", tmp_path / "b" / "x4.safetensors", "--blend", "0.5")
    res = run("bundle", tmp_path / "b2", "--x2", start, "--x4", tmp_path / "ft", "--fp32", "--blend", "0.25")
    assert res.exit_code == 0, res.output  # one A: the fine-tuned members only
    assert "blend" not in resolve_model(tmp_path / "b2").manifest["models"]["2"]
    assert resolve_model(tmp_path / "b2").manifest["models"]["4"]["blend"] == 0.25
    assert "must lie in (0, 1]" in error("--x4", tmp_path / "ft", "--blend", "1.5")
    assert "no --x8 model" in error("--x4", tmp_path / "ft", "--blend", "8:0.3")
    assert "SCALE:A" in error("--x4", tmp_path / "ft", "--blend", "x")
    w = load_file(str(start / "model.safetensors"))  # the start changes after the fine-tune
    from safetensors.torch import save_file

    save_file({k: v + 1 if v.is_floating_point() else v for k, v in w.items()}, str(start / "model.safetensors"))
    assert "has changed" in error("--x4", tmp_path / "ft", "--blend", "0.5")
    shutil.rmtree(start)
    assert "is gone" in error("--x4", tmp_path / "ft", "--blend", "0.5")


def test_a_bundles_own_ddim_steps_beyond_its_schedule_blame_the_bundle(tmp_path, three, synth_dataset):
    out = tmp_path / "bundle"
    assert run("bundle", out, "--x4", three[4]).exit_code == 0
    meta = json.loads((out / "bundle.json").read_text())
    meta["models"]["4"]["ddim_steps"] = 10**6
    (out / "bundle.json").write_text(json.dumps(meta))
    trip = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    res = run("fuse", *trip, "--model", out, "--out", tmp_path / "f.png", "--no-progress")
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "bundle.json" in lines[0] and "ddim_steps" in lines[0] and "--steps 1000000" not in lines[0]
    assert run("fuse", *trip, "--model", out, "--out", tmp_path / "f.png", "--no-progress", "--steps", 2).exit_code == 0


def test_info_flags_a_default_model_that_is_not_a_model(tmp_path, monkeypatch, three):
    junk = tmp_path / "junk"
    junk.mkdir()
    monkeypatch.setenv("TFSDEPLOY_MODEL", str(junk))
    res = run("info")
    assert res.exit_code == 0
    line = next(x for x in res.output.splitlines() if x.startswith("default model:"))
    assert "NOT USABLE" in line and "not a checkpoint" in line
    monkeypatch.setenv("TFSDEPLOY_MODEL", str(three[4]))
    line = next(x for x in run("info").output.splitlines() if x.startswith("default model:"))
    assert "checkpoint, step 1" in line and "NOT USABLE" not in line
