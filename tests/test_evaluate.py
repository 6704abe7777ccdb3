"""Evaluation metrics against independent implementations and hand-worked values, and `evaluate`."""

import json
import math

import numpy as np
import pytest
import torch
from sewar.full_ref import vifp
from typer.testing import CliRunner

from conftest import write_folder
from tfsdeploy.cli import app
from tfsdeploy.config import EngineConfig
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import METHODS, fuse_trimodal
from tfsdeploy.lpips import LPIPS, load_lpips
from tfsdeploy.report_metrics import (average_gradient, entropy, qabf, reference_metrics, spatial_frequency, std_dev,
                                      vif)
from tfsdeploy.tools.evaluate import EvalConfig, evaluation_inputs
from tfsdeploy.tools.evaluate import evaluate as evaluate_entries


def test_vif_matches_sewar_and_is_one_for_identical_images():
    rng = np.random.default_rng(0)
    t = rng.random((3, 48, 40))
    p = np.clip(t + rng.normal(0, 0.05, t.shape), 0, 1)
    ours = vif(torch.from_numpy(p), torch.from_numpy(t))
    ref = vifp((t * 255).transpose(1, 2, 0), (p * 255).transpose(1, 2, 0), sigma_nsq=2)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert vif(torch.from_numpy(t), torch.from_numpy(t)) == pytest.approx(1.0, abs=1e-6)


def test_reference_metrics_by_hand():
    t = torch.zeros(3, 16, 16)
    p = torch.full((3, 16, 16), 10 / 255)
    m = reference_metrics(p, t)
    assert m["MSE"] == pytest.approx(100.0) and m["RMSE"] == pytest.approx(10.0) and m["MAE"] == pytest.approx(10.0)
    assert m["PSNR"] == pytest.approx(10 * math.log10(255**2 / 100))
    assert math.isnan(m["LPIPS"])


def test_average_gradient_by_hand():
    # a horizontal ramp of 3 grey levels per pixel: Gx = 3, Gy = 0 -> sqrt(9 / 2)
    ramp = (torch.arange(16).float() * 3 / 255).expand(3, 16, 16)
    assert average_gradient(ramp) == pytest.approx(math.sqrt(4.5))
    assert average_gradient(torch.full((3, 8, 8), 0.5)) == 0.0


def test_entropy_sd_sf_by_hand():
    half = torch.zeros(1, 8, 8)
    half[:, :, 4:] = 1.0  # two grey levels, equally likely: 1 bit; SD 127.5
    assert entropy(half) == pytest.approx(1.0)
    assert std_dev(half) == pytest.approx(127.5)
    # one vertical edge of 255 across 8 rows: RF = sqrt(8 * 255^2 / 56), CF = 0
    assert spatial_frequency(half) == pytest.approx(math.sqrt(8 * 255**2 / 56))


def test_qabf_prefers_the_image_that_keeps_edges():
    rng = np.random.default_rng(1)
    src = torch.from_numpy(rng.random((1, 32, 32)))
    blurred = torch.nn.functional.avg_pool2d(src[None], 5, 1, 2, count_include_pad=False)[0]
    assert qabf(src, [src]) == pytest.approx(0.9994 / (1 + math.exp(-7.5)) * 0.9879 / (1 + math.exp(-4.4)), rel=1e-6)
    assert qabf(src, [src]) > qabf(blurred, [src])


def test_lpips_from_local_files(tmp_path, monkeypatch):
    net = LPIPS()
    backbone = {f"features.{i}.weight": c.weight.detach() for i, c in zip((0, 3, 6, 8, 10), net.convs)}
    backbone |= {f"features.{i}.bias": c.bias.detach() for i, c in zip((0, 3, 6, 8, 10), net.convs)}
    lin = {f"lin{i}.model.1.weight": torch.rand_like(c.weight) for i, c in enumerate(net.lins)}
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "alex.pth")
    fn, reason = load_lpips(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    assert fn is not None and reason == ""
    a, b = torch.rand(3, 64, 64), torch.rand(3, 64, 64)
    assert fn(a, a) == pytest.approx(0.0, abs=1e-7)
    assert fn(a, b) > 0 and fn(a, b) == pytest.approx(fn(b, a), rel=1e-5)
    # Files named explicitly must be usable: asking for LPIPS and not getting it is an error ...
    with pytest.raises(UserError, match="not found"):
        load_lpips(tmp_path / "missing.pth", tmp_path / "alex.pth")
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="wrong layout"):
        load_lpips(tmp_path / "bad.pth", tmp_path / "alex.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="unreadable"):
        load_lpips(tmp_path / "alexnet.pth", tmp_path / "junk.pth")
    # ... while default locations that hold nothing only leave LPIPS out, with the reason.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    fn4, reason4 = load_lpips()
    assert fn4 is None and "not found" in reason4


def evaluate(models, root, out, cfg, log=lambda s: None):
    """What `tfsdeploy evaluate` runs: the CLI's wiring, then the tool."""
    entries, samples = evaluation_inputs(models, root, cfg, EngineConfig(engine=cfg.engine))
    return evaluate_entries(entries, samples, out, cfg, log=log)


def test_every_baseline_method_fuses():
    t1, t2, f = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), torch.rand(1, 3, 32, 32)
    outs = {m: fuse_trimodal(t1, t2, f, method=m) for m in METHODS}
    for m, o in outs.items():
        assert o.shape == (1, 3, 32, 32) and 0 <= float(o.min()) and float(o.max()) <= 1, m
    assert not torch.allclose(outs["classical"], outs["laplacian"])


def test_evaluate_writes_tables_json_montage_and_resumes(tmp_path, tiny_run, synth_dataset):
    out = tmp_path / "ev"
    cfg = EvalConfig(scales=(4, 8), sample=EvalConfig().sample.__class__(steps=2), engine="torch")
    summary = evaluate([tiny_run, tiny_run], synth_dataset, out, cfg, log=lambda s: None)
    for s in (4, 8):
        assert (out / f"table1_x{s}.md").is_file()
        rows = (out / f"table1_x{s}.csv").read_text().splitlines()
        assert rows[0] == "method,AG,MSE,VIF,SSIM,PSNR,LPIPS,MAE,RMSE"
        assert len(rows) == 1 + 3 + 2 + 1  # 3 baselines, 2 models, best row
    report = (out / "report.md").read_text()
    assert "## Ablation" in report and "LPIPS unavailable" in report and "**" in report
    values = json.loads((out / "values.json").read_text())
    assert set(values["per_image"]["x4"]["bicubic + classical"]) == {"e00", "e01"}
    assert (out / "montage.png").is_file()
    lines = (out / "values.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 4  # scales x images x (3 baselines + 1 model hash; both labels share it)
    # PSNR recomputed independently for one image
    from skimage.metrics import peak_signal_noise_ratio

    from tfsdeploy.fusion import fuse_condition
    from tfsdeploy.imaging import degrade, read_image
    src = torch.cat([read_image(synth_dataset / "test" / d / "e01.png") for d in ("t1", "t2")])
    from tfsdeploy.imaging import apply_colormap
    func = apply_colormap(read_image(synth_dataset / "test" / "func" / "e01.png"))
    gt = read_image(synth_dataset / "test" / "gt" / "e01.png")
    base = fuse_condition(degrade(torch.cat([src, func])[None], 4))[0]
    ref = peak_signal_noise_ratio((gt.numpy() * 255), (base.numpy() * 255), data_range=255)
    got = values["per_image"]["x4"]["bicubic + classical"]["e01"]["PSNR"]
    assert got == pytest.approx(ref, abs=0.05)  # the dataset stores 8-bit images
    # a second run reuses every cached value
    evaluate([tiny_run], synth_dataset, out, cfg, log=lambda s: None)
    assert len((out / "values.jsonl").read_text().splitlines()) == len(lines)
    assert summary["tables"]["x4"]["reference"]["bicubic + classical"]["PSNR"] == pytest.approx(
        np.mean([v["PSNR"] for v in values["per_image"]["x4"]["bicubic + classical"].values()]))


def test_evaluate_folder_without_gt_and_bad_inputs(tmp_path, tiny_run):
    root = write_folder(tmp_path / "nogt", ["a", "b"], size=64, gt=False)
    notes = []
    evaluate([tiny_run], root, tmp_path / "o", EvalConfig(scales=(4,), engine="torch",
                                                          sample=EvalConfig().sample.__class__(steps=1)),
             log=notes.append)
    assert any("made with the classical" in n for n in notes)
    two = tmp_path / "two"
    for d in ("t1", "t2"):
        (two / d).mkdir(parents=True)
    with pytest.raises(UserError, match="missing modality"):
        evaluate([tiny_run], two, tmp_path / "o2", EvalConfig(scales=(4,)), log=lambda s: None)
    empty = tmp_path / "empty"
    for d in ("t1", "t2", "func"):
        (empty / d).mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        evaluate([tiny_run], empty, tmp_path / "o3", EvalConfig(scales=(4,)), log=lambda s: None)
    with pytest.raises(UserError, match="scales"):
        EvalConfig(scales=(3,))


def test_cli_evaluate_and_fuse_method(tmp_path, tiny_run, synth_dataset):
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "-m", str(tiny_run), "--data", str(synth_dataset), "--scales", "8",
                              "--steps", "1", "--engine", "torch", "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "x8:" in res.output and (tmp_path / "r" / "montage.png").is_file()
    d = synth_dataset / "test"
    out = tmp_path / "b.png"
    res = runner.invoke(app, ["fuse", *(str(d / m / "e00.png") for m in ("t1", "t2", "func")), "--method",
                              "guided", "--out", str(out), "--size", "64"])
    assert res.exit_code == 0, res.output
    assert out.is_file()
