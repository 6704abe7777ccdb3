"""Test-time adaptation (`fuse --adapt N`): internal pairs, determinism, isolation, refusals, CLI."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tfsdeploy.cli import app
from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import degrade
from tfsdeploy.inputs import read_triplet
from tfsdeploy.pipeline import FusionPipeline
from tfsdeploy.tools.adapt import AdaptConfig, adapt, dihedral, internal_pairs, lr_sources

runner = CliRunner()


@pytest.fixture()
def trip(synth_dataset):
    d = synth_dataset / "test"
    return read_triplet(*(d / m / "e00.png" for m in ("t1", "t2", "func")))


def pipeline(tiny_run, steps=2):
    return FusionPipeline.load(tiny_run, 4, SampleConfig(steps=steps), EngineConfig(engine="torch"))


def test_the_eight_flips_and_rotations_are_distinct_and_invertible():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    assert torch.equal(dihedral(dihedral(x, 1), 3), x)  # a quarter turn undone by three more


def test_internal_pairs_degrade_the_input_once_more_and_target_its_own_fusion(trip):
    lr = lr_sources(trip, 4, 64)  # what make_condition upsamples: [1,5,16,16]
    assert lr.shape == (1, 5, 16, 16)
    pairs = internal_pairs(lr, 4)
    assert len(pairs) == 8
    torch.testing.assert_close(pairs.cond01[0:1], degrade(lr, 4))
    torch.testing.assert_close(pairs.gt01[0:1], fuse_condition(lr))
    torch.testing.assert_close(pairs.base01, fuse_condition(pairs.cond01))
    # every pair is a flip / rotation of the first: the fusion rule commutes with them
    torch.testing.assert_close(pairs.gt01[5:6], dihedral(pairs.gt01[0:1], 5), atol=1e-5, rtol=0)


def test_internal_pairs_are_back_projected_as_the_members_inputs_are(trip, tiny_run, monkeypatch):
    """A member fed back-projected inputs adapts on pairs back-projected at its strength: the pair's
    condition is the degraded sources upsampled as `make_condition` upsamples them for that member."""
    import tfsdeploy.tools.adapt as adapt_mod
    from tfsdeploy.imaging import resize
    from tfsdeploy.inputs import upsample

    lr = lr_sources(trip, 4, 64)
    pairs = internal_pairs(lr, 2, 0.75)
    want = upsample(resize(lr, (8, 8)), 16, 0.75)
    torch.testing.assert_close(pairs.cond01[0:1], want, atol=1e-6, rtol=0)
    assert not torch.allclose(pairs.cond01[0:1], degrade(lr, 2), atol=1e-3)
    torch.testing.assert_close(pairs.base01, fuse_condition(pairs.cond01))
    torch.testing.assert_close(pairs.gt01, internal_pairs(lr, 2).gt01)  # the target does not change
    # adapt() makes them at the pipeline's strength (the bundle's, or --backproject)
    seen = []
    real = adapt_mod.internal_pairs
    monkeypatch.setattr(adapt_mod, "internal_pairs", lambda lr01, extra, bp=0.0: seen.append(bp) or real(lr01, extra, bp))
    pipe = FusionPipeline.load(tiny_run, 4, SampleConfig(steps=2, backproject=1.5), EngineConfig(engine="torch"))
    adapt(pipe, trip, 64, AdaptConfig(steps=1))
    assert seen == [1.5]


def test_adaptation_is_deterministic_changes_only_a_copy_and_zero_steps_is_a_no_op(tiny_run, trip):
    pipe = pipeline(tiny_run)
    before = {k: v.clone() for k, v in pipe.denoiser.model.state_dict().items()}
    plain = pipe.fuse_triplet(trip, 64)
    a = adapt(pipe, trip, 64, AdaptConfig(steps=3, lr=1e-3, seed=1))
    b = adapt(pipe, trip, 64, AdaptConfig(steps=3, lr=1e-3, seed=1))
    c = adapt(pipe, trip, 64, AdaptConfig(steps=3, lr=1e-3, seed=2))
    assert a.steps == 3 and len(a.losses) == 3 and all(np.isfinite(a.losses)) and a.seconds > 0
    fa, fb, fc = (r.pipeline.fuse_triplet(trip, 64) for r in (a, b, c))
    assert torch.equal(fa, fb)  # same seed, bit-identical on the CPU
    assert not torch.equal(fa, fc) and not torch.equal(fa, plain)
    for k, v in pipe.denoiser.model.state_dict().items():  # the original pipeline is untouched
        assert torch.equal(v, before[k]), k
    assert torch.equal(pipe.fuse_triplet(trip, 64), plain)
    assert adapt(pipe, trip, 64, AdaptConfig(steps=0)).pipeline is pipe


def test_adaptation_refusals(tiny_run, trip, exported):
    with pytest.raises(UserError, match=">= 0"):
        AdaptConfig(steps=-1)
    with pytest.raises(UserError, match="use a larger --size"):  # 32 / 4 = 8 px: nothing to learn from
        adapt(pipeline(tiny_run), trip, 32, AdaptConfig(steps=1))
    onnx_pipe = FusionPipeline.load(exported["fp32"][0], 4, SampleConfig(steps=2))
    with pytest.raises(UserError, match="needs the torch engine"):
        adapt(onnx_pipe, trip, 64, AdaptConfig(steps=1))


def test_fuse_adapt_from_the_cli(tmp_path, tiny_run, synth_dataset):
    d = synth_dataset / "test"
    files = [str(d / m / "e00.png") for m in ("t1", "t2", "func")]
    out = tmp_path / "o.png"
    res = runner.invoke(app, ["fuse", *files, "--model", str(tiny_run), "--steps", "2", "--adapt", "2",
                              "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "adapted to the input in" in res.stderr
    res = runner.invoke(app, ["fuse", *files, "--model", str(tiny_run), "--adapt", "2", "--method", "classical",
                              "--out", str(tmp_path / "b.png")])
    assert res.exit_code == 2 and res.stderr.startswith("error: --adapt adapts the model")
