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
