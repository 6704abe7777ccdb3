"""training.shrink: a bundle member's predicted residual scaled by alpha through its last convolution."""

import pytest
import torch
from safetensors.torch import load_file

from tfsdeploy.bundle import make_bundle
from tfsdeploy.modelref import resolve_model
from tfsdeploy.checkpoint import build_from_checkpoint, read_meta, save_checkpoint, sha256_file
from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.model import build_model
from tfsdeploy.pipeline import FusionPipeline
from training.shrink import FINAL_CONV, main, shrink_member

from conftest import randomize_output, tiny_configs


def member(path, seed, **kw):
    cfg = tiny_configs(**kw)
    torch.manual_seed(seed)
    model = randomize_output(build_model(cfg.model), seed)
    with torch.no_grad():
        model.final.conv.bias.copy_(torch.linspace(-0.05, 0.05, 3))
    return save_checkpoint(path, cfg, 1, model.state_dict())


@pytest.fixture()
def bundle(tmp_path):
    return make_bundle({2: member(tmp_path / "a", 1), 4: member(tmp_path / "b", 2)}, tmp_path / "bundle",
                       ddim_steps={2: 2, 4: 2})


def test_shrink_scales_only_the_last_conv_and_records_it(tmp_path, bundle):
    before = {s: load_file(str(p)) for s, p in resolve_model(bundle).members().items()}
    sha4 = sha256_file(bundle / "x4.safetensors")
    out = shrink_member(bundle, 2, 0.5, ddim_steps=1, out=tmp_path / "shrunk")
    after = load_file(str(resolve_model(out).members()[2]))  # members() checks the new sha256
    for k, v in before[2].items():
        want = (v.float() * 0.5).to(v.dtype) if k in FINAL_CONV else v
        assert torch.equal(after[k], want), k
    assert sha256_file(out / "x4.safetensors") == sha4  # the other member is untouched
    entry = resolve_model(out).manifest["models"]["2"]
    assert entry["residual_alpha"] == 0.5 and entry["ddim_steps"] == 1
    assert resolve_model(out).manifest["models"]["4"]["ddim_steps"] == 2
    meta = read_meta(out / "x2.safetensors")[1]
    source = resolve_model(bundle).manifest["models"]["2"]
    assert meta["residual_alpha"] == 0.5 and meta["residual_alpha_of"] == source["sha256"]
    assert source.get("residual_alpha") is None  # the source bundle is unchanged


def test_the_network_output_scales_by_alpha_and_alpha_zero_is_the_baseline(tmp_path, bundle):
    half = shrink_member(bundle, 2, 0.5, out=tmp_path / "half")
    zero = shrink_member(bundle, 2, 0.0, out=tmp_path / "zero")
    full_net, _ = build_from_checkpoint(resolve_model(bundle).members()[2])
    half_net, _ = build_from_checkpoint(resolve_model(half).members()[2])
    g = torch.Generator().manual_seed(0)
    x, cond, level = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 5, 32, 32, generator=g) * 2 - 1, \
        torch.tensor([0.1, 0.9])
    with torch.no_grad():
        full, halved = full_net(x, cond, level), half_net(x, cond, level)
    assert full.abs().mean() > 1e-3
    torch.testing.assert_close(halved, 0.5 * full, atol=2e-4, rtol=2e-3)  # fp16 storage of the weights

    cond01 = torch.rand(1, 5, 64, 64, generator=g)
    engine = EngineConfig(engine="torch", device="cpu")
    gap = {}
    for name, path in (("zero", zero), ("full", bundle)):
        out = FusionPipeline.load(path, 2, SampleConfig(sampler="ddim", steps=2), engine=engine)(cond01)
        gap[name] = float((out - fuse_condition(cond01)).abs().max())
    # alpha 0 leaves only the last DDIM step's sqrt(1 - alpha_bar_0) share of its noise estimate
    assert gap["zero"] < 2e-3 < 0.05 < gap["full"], gap


def test_shrink_errors(tmp_path, bundle, capsys):
    with pytest.raises(UserError, match=r"alpha must lie in \[0, 1\]"):
        shrink_member(bundle, 2, 1.5)
    with pytest.raises(UserError, match="no x8 member"):
        shrink_member(bundle, 8, 0.5)
    once = shrink_member(bundle, 2, 0.5, out=tmp_path / "once")
    with pytest.raises(UserError, match="already shrunk"):
        shrink_member(once, 2, 0.5, out=tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    eps = make_bundle({2: member(tmp_path / "e", 3, prediction="eps", target="fused")}, tmp_path / "eps")
    with pytest.raises(UserError, match="only an x0-prediction model of the residual"):
        shrink_member(eps, 2, 0.5)
    (bundle / "x4.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted"):
        shrink_member(bundle, 4, 0.5)
    with pytest.raises(SystemExit) as e:
        main([str(bundle), "--scale", "2", "--alpha", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: alpha must lie in [0, 1]") and err.count("\n") == 1


def test_without_alpha_only_the_step_count_and_notes_change(tmp_path, bundle):
    out = shrink_member(bundle, 4, None, ddim_steps=1, out=tmp_path / "steps", notes="new notes")
    assert (out / "x4.safetensors").read_bytes() == (bundle / "x4.safetensors").read_bytes()
    manifest = resolve_model(out).manifest
    assert manifest["models"]["4"]["ddim_steps"] == 1 and "residual_alpha" not in manifest["models"]["4"]
    assert manifest["notes"] == "new notes" and manifest["models"]["2"] == resolve_model(bundle).manifest["models"]["2"]
    with pytest.raises(UserError, match="not a step count of this schedule"):
        shrink_member(bundle, 4, None, ddim_steps=10**6)


def test_a_members_back_projection_is_set_kept_and_removed(tmp_path, bundle):
    out = shrink_member(bundle, 4, None, out=tmp_path / "bp", backproject=1.5)
    ref = resolve_model(out)
    assert ref.manifest["models"]["4"]["backproject"] == 1.5
    assert ref.sample_for(4, SampleConfig()).backproject == 1.5 and ref.sample_for(2, SampleConfig()).backproject == 0
    kept = shrink_member(out, 4, None, ddim_steps=1, out=tmp_path / "kept")  # not given: as it was
    assert resolve_model(kept).manifest["models"]["4"]["backproject"] == 1.5
    gone = shrink_member(out, 4, None, out=tmp_path / "gone", backproject=0)
    assert "backproject" not in resolve_model(gone).manifest["models"]["4"]
    with pytest.raises(UserError, match="back-projection strength"):
        shrink_member(bundle, 4, None, out=tmp_path / "bad", backproject=-1)
    assert not (tmp_path / "bad").exists()
