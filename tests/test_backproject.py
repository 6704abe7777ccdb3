"""Back-projection of the upsampled inputs (tfsdeploy.inputs.upsample) and how a bundle member,
a pipeline and `evaluate` carry its strength."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tfsdeploy.bundle import make_bundle
from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.errors import UserError
from tfsdeploy.imaging import resize
from tfsdeploy.inputs import as_triplet, make_condition, upsample
from tfsdeploy.modelref import resolve_model
from tfsdeploy.pipeline import FusionPipeline

from conftest import smooth_image
from test_bundle import three  # noqa: F401  (fixture)


def sources(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Five smooth source channels [1,5,size,size] in [0, 1] with edges (blobs on a ramp)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([smooth_image(rng, size) for _ in range(5)]))[None].float()


def by_hand(lr: torch.Tensor, size: int, steps: list[float]) -> torch.Tensor:
    """Back-projection written out with plain interpolation calls, one step size per round."""
    x = F.interpolate(lr, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    for step in steps:
        shrunk = F.interpolate(x, size=lr.shape[-2:], mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x + step * F.interpolate(lr - shrunk, size=(size, size), mode="bicubic", align_corners=False)).clamp(0, 1)
    return x


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def test_no_back_projection_is_plain_bicubic():
    lr = resize(sources(), (16, 16))
    assert torch.equal(upsample(lr, 64), resize(lr, (64, 64)))
    trip = as_triplet(lr[0, :1], lr[0, 1:2], lr[0, 2:])
    assert torch.equal(make_condition(trip, 4, 64)[0], resize(lr, (64, 64)))


@pytest.mark.parametrize("strength, steps", [(1, [1.0]), (0.5, [0.5]), (2, [1.0, 1.0]), (1.5, [0.75, 0.75])])
def test_rounds_and_steps_match_a_hand_written_back_projection(strength, steps):
    lr = resize(sources(seed=1), (16, 16))
    assert torch.allclose(upsample(lr, 64, strength), by_hand(lr, 64, steps), atol=1e-6)


def test_back_projection_shrinks_back_to_the_inputs_and_nears_the_original():
    hr = sources(seed=2)
    lr = resize(hr, (16, 16))
    miss, err = [], []
    for strength in (0, 1, 2, 4):
        up = upsample(lr, 64, strength)
        miss.append(float((resize(up, (16, 16)) - lr).abs().mean()))
        err.append(psnr(up, hr))
    assert miss[1] < 0.6 * miss[0] and miss[3] < 0.3 * miss[0]  # consistent with the inputs it was given
    assert all(b > a for a, b in zip(miss[1:], miss[:-1]))
    assert err[1] > err[0] + 0.3 and err[3] > err[1]  # and closer to what they were shrunk from


def test_bad_strengths_are_refused():
    lr = torch.rand(1, 5, 8, 8)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="back-projection"):
            upsample(lr, 32, bad)
    for bad in (-0.5, 9, float("nan")):
        with pytest.raises(UserError, match="back-projection"):
            SampleConfig(backproject=bad)


def test_a_bundle_member_recommends_its_strength_and_an_explicit_one_wins(tmp_path, three):  # noqa: F811
    out = make_bundle(three, tmp_path / "bundle", backproject={4: 1.5})
    models = resolve_model(out).manifest["models"]
    assert models["4"]["backproject"] == 1.5 and "backproject" not in models["8"]
    assert resolve_model(out).sample_for(4, SampleConfig()).backproject == 1.5
    assert resolve_model(out).sample_for(8, SampleConfig()).backproject == 0
    assert resolve_model(out).sample_for(4, SampleConfig(backproject=0)).backproject == 0
    assert resolve_model(three[4]).sample_for(4, SampleConfig()).backproject == 0  # a lone checkpoint: plain bicubic
    with pytest.raises(UserError, match="back-projection"):
        make_bundle(three, tmp_path / "refused", backproject={4: 20})
    meta = json.loads((out / "bundle.json").read_text())
    meta["models"]["4"]["backproject"] = "strong"
    (out / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"models\.4\.backproject"):
        resolve_model(out).sample_for(4, SampleConfig())


def test_a_pipeline_feeds_its_model_the_back_projected_inputs(tmp_path, three):  # noqa: F811
    out = make_bundle(three, tmp_path / "bundle", backproject={4: 1})
    engine = EngineConfig(engine="torch", device="cpu")
    pipe = FusionPipeline.load(out, 4, SampleConfig(steps=2), engine)
    plain = FusionPipeline.load(out, 4, SampleConfig(steps=2, backproject=0), engine)
    assert pipe.backproject == 1 and plain.backproject == 0 and "back-projection 1" in pipe.describe()
    lr = resize(sources(seed=3), (16, 16))
    trip = as_triplet(lr[0, :1], lr[0, 1:2], lr[0, 2:])
    fused = pipe.fuse_triplet(trip, 64)
    assert torch.equal(fused, pipe(upsample(lr, 64, 1))[0].float().cpu())
    assert torch.equal(pipe.upsample(lr, 64), make_condition(trip, 4, 64, 1)[0])
    assert not torch.allclose(fused, plain.fuse_triplet(trip, 64))


def test_evaluate_runs_a_model_on_its_back_projected_inputs_and_keys_its_cache_by_it(tmp_path, three,  # noqa: F811
                                                                                     synth_dataset):
    from test_evaluate import evaluate
    from tfsdeploy.tools.evaluate import EvalConfig

    plain = make_bundle(three, tmp_path / "plain")
    sharp = make_bundle(three, tmp_path / "sharp", backproject={4: 2})
    cfg = EvalConfig(scales=(4,), methods=("classical",), limit=1, sample=SampleConfig(steps=2))
    a = evaluate([plain, sharp], synth_dataset, tmp_path / "e", cfg, log=lambda s: None)["tables"]["x4"]["reference"]
    base, p, s = (a[k]["PSNR"] for k in ("bicubic + classical", "plain", "sharp"))
    assert p != s  # the same weights, fed other inputs
    # the baseline stays plain bicubic: the same number as in a run without any back-projecting model
    b = evaluate([plain], synth_dataset, tmp_path / "e2", cfg, log=lambda s: None)["tables"]["x4"]["reference"]
    assert b["bicubic + classical"]["PSNR"] == base


def test_cli_bundle_records_strengths_and_fuse_takes_and_overrides_them(tmp_path, three, synth_dataset):  # noqa: F811
    from typer.testing import CliRunner

    from tfsdeploy.cli import app
    from tfsdeploy.imaging import read_image

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    out = tmp_path / "bundle"
    res = run("bundle", out, "--x4", three[4], "--x8", three[8], "--backproject", "4:1.5")
    assert res.exit_code == 0, res.output
    models = resolve_model(out).manifest["models"]
    assert models["4"]["backproject"] == 1.5 and "backproject" not in models["8"]
    for bad, why in (("4:x", "SCALE:STRENGTH"), ("2:1", "no --x2"), ("4:9", "from 0 to 8")):
        res = run("bundle", tmp_path / "refused", "--x4", three[4], "--backproject", bad)
        assert res.exit_code == 2 and why in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert not (tmp_path / "refused").exists()
    trip = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    images = {}
    for name, extra in (("bundle", []), ("off", ["--backproject", 0]), ("given", ["--backproject", 1.5])):
        res = run("fuse", *trip, "--scale", 4, "--model", out, "--out", tmp_path / f"{name}.png", "--no-progress",
                  "--steps", 2, *extra)
        assert res.exit_code == 0, res.output
        assert ("back-projection 1.5" in res.output) == (name != "off"), res.output
        images[name] = read_image(tmp_path / f"{name}.png")
    assert torch.equal(images["bundle"], images["given"]) and not torch.equal(images["bundle"], images["off"])
    res = run("fuse", *trip, "--scale", 4, "--model", out, "--out", tmp_path / "x.png", "--backproject", -1)
    assert res.exit_code == 2 and "--backproject" in res.stderr and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- the noise gate


def test_the_noise_ratio_tells_white_noise_from_a_shrunk_image():
    """About 1 for white noise (both bands respond alike), low for an image shrunk bicubically from a
    smooth one, in between for that image with noise added after shrinking; 0 where there is no
    band to measure."""
    from tfsdeploy.inputs import noise_ratio

    g = torch.Generator().manual_seed(0)
    clean = resize(sources(size=128, seed=4), (64, 64))
    noisy = (clean + 0.02 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    white = torch.rand(1, 5, 64, 64, generator=g)
    r = noise_ratio(torch.cat([clean, noisy, white]))
    assert r.shape == (3,)
    assert r[0] < 0.3 and 0.9 < r[2] < 1.1 and r[0] < r[1] < r[2]
    only_func = white.clone()
    only_func[:, :2] = clean[:, :2]  # the ratio is the MR inputs' (T1, T2) alone
    assert torch.allclose(noise_ratio(only_func), r[:1])
    assert torch.equal(noise_ratio(torch.zeros(2, 5, 16, 16)), torch.zeros(2))
    assert torch.equal(noise_ratio(torch.rand(2, 5, 4, 4)), torch.zeros(2))


def test_a_gated_back_projection_spares_noisy_slices_and_ramps_in_between(monkeypatch):
    """Each slice of a batch gets its own strength: all of it below the gate, none above, the same
    rounds with a proportionally smaller step in between."""
    import tfsdeploy.inputs as inputs

    g = torch.Generator().manual_seed(1)
    clean = resize(sources(size=128, seed=5), (32, 32))
    noisy = torch.rand(1, 5, 32, 32, generator=g)
    both = torch.cat([clean, noisy])
    gated = upsample(both, 64, 2, gate=(0.4, 0.6))
    assert torch.equal(gated[:1], upsample(clean, 64, 2))
    assert torch.equal(gated[1:], upsample(noisy, 64, 0))
    assert torch.equal(upsample(both, 64, 2), torch.cat([upsample(clean, 64, 2), upsample(noisy, 64, 2)]))
    monkeypatch.setattr(inputs, "noise_ratio", lambda lr: torch.full((lr.shape[0],), 0.45))
    half = upsample(clean, 64, 2, gate=(0.4, 0.5))  # halfway up the ramp: two rounds of half steps
    assert torch.allclose(half, by_hand(clean, 64, [0.5, 0.5]), atol=1e-6)
    trip = as_triplet(clean[0, :1], clean[0, 1:2], clean[0, 2:])
    assert torch.equal(make_condition(trip, 2, 64, 2, (0.4, 0.5))[0], half)


def test_a_bundle_member_carries_its_noise_gate_and_an_explicit_strength_drops_it(tmp_path, three):  # noqa: F811
    from training.shrink import shrink_member

    out = make_bundle(three, tmp_path / "bundle")
    gated = shrink_member(out, 2, None, backproject=2, gate=(0.37, 0.42), out=tmp_path / "gated")
    ref = resolve_model(gated)
    assert ref.manifest["models"]["2"]["backproject_gate"] == [0.37, 0.42]
    assert ref.sample_for(2, SampleConfig()).backproject_gate == (0.37, 0.42)
    assert ref.sample_for(2, SampleConfig(backproject=1)).backproject_gate is None  # the user's strength as given
    assert ref.sample_for(4, SampleConfig()).backproject_gate is None
    engine = EngineConfig(engine="torch", device="cpu")
    pipe = FusionPipeline.load(gated, 2, SampleConfig(steps=2), engine)
    assert pipe.backproject_gate == (0.37, 0.42) and "none from 0.42" in pipe.describe()
    lr = torch.cat([resize(sources(size=128, seed=6), (32, 32)), torch.rand(1, 5, 32, 32)])
    assert torch.equal(pipe.upsample(lr, 64), upsample(lr, 64, 2, (0.37, 0.42)))
    assert FusionPipeline.load(gated, 2, SampleConfig(steps=2, backproject=2), engine).backproject_gate is None

    removed = shrink_member(gated, 2, None, gate="none", out=tmp_path / "ungated")
    assert "backproject_gate" not in resolve_model(removed).manifest["models"]["2"]
    with pytest.raises(UserError, match="noise gate needs a back-projection strength"):
        shrink_member(out, 4, None, gate=(0.3, 0.4), out=tmp_path / "nothing-to-gate")
    with pytest.raises(UserError, match="two noise ratios"):
        shrink_member(out, 2, None, backproject=1, gate=(0.5, 0.4), out=tmp_path / "backwards")
    for bad in ([0.5, 0.4], [0.3], "0.3,0.4", [0.3, True]):
        meta = json.loads((gated / "bundle.json").read_text())
        meta["models"]["2"]["backproject_gate"] = bad
        (gated / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match=r"models\.2\.backproject_gate"):
            resolve_model(gated).sample_for(2, SampleConfig())
    with pytest.raises(UserError, match="noise gate"):
        SampleConfig(backproject=1, backproject_gate=(0.4, 0.4))


def test_shrink_cli_sets_and_refuses_a_noise_gate(tmp_path, three, capsys):  # noqa: F811
    from training.shrink import main

    out = make_bundle(three, tmp_path / "bundle")
    main([str(out), "--scale", "2", "--backproject", "2", "--backproject-gate", "0.37,0.42", "--out", str(tmp_path / "g")])
    assert resolve_model(tmp_path / "g").manifest["models"]["2"]["backproject_gate"] == [0.37, 0.42]
    with pytest.raises(SystemExit):
        main([str(out), "--scale", "2", "--backproject-gate", "high", "--out", str(tmp_path / "h")])
    assert "give LO,HI" in capsys.readouterr().err and not (tmp_path / "h").exists()


def test_a_run_is_fed_at_the_strength_it_was_trained_at(tmp_path, synth_dataset):
    """A run or checkpoint trained on back-projected inputs (a fine-tune of such a member) is fed
    them by default, as a bundle member with that strength is."""
    import dataclasses

    from conftest import tiny_configs
    from training.train import train

    cfg = tiny_configs(steps=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backproject=1.5))
    train(tmp_path / "run", cfg, data_root=synth_dataset, show_progress=False, log=lambda s: None)
    assert resolve_model(tmp_path / "run").sample_for(4, SampleConfig()).backproject == 1.5
    assert resolve_model(tmp_path / "run").sample_for(4, SampleConfig(backproject=0)).backproject == 0
