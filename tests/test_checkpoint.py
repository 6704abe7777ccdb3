import json

import pytest
import torch

from conftest import randomize_output
from tfsdeploy.checkpoint import (Configs, build_from_checkpoint, load_checkpoint, read_meta, resolve,
                                  save_checkpoint)
from tfsdeploy.config import PRESETS, DiffusionConfig, ModelConfig, from_dict
from tfsdeploy.errors import UserError
from tfsdeploy.model import build_model


@pytest.fixture()
def saved(tmp_path):
    cfg = Configs(model=PRESETS["tiny"], diffusion=DiffusionConfig(prediction="v", target="residual"))
    model = randomize_output(build_model(cfg.model))
    path = save_checkpoint(tmp_path / "run", cfg, 7, model.state_dict(), {"online.w": torch.ones(3)})
    return tmp_path / "run", path, model, cfg


def test_round_trip(saved):
    run, path, model, cfg = saved
    assert resolve(run) == path
    ckpt = load_checkpoint(run)
    assert ckpt.step == 7 and ckpt.configs == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.weights[k], v)
    net, _ = build_from_checkpoint(path)
    x, c, l = torch.randn(1, 3, 16, 16), torch.randn(1, 5, 16, 16), torch.rand(1)
    y = net(x, c, l)
    assert y.abs().max() > 0
    torch.testing.assert_close(y, model.eval()(x, c, l))


def test_json_alone_rebuilds_the_model(saved):
    _, path, model, _ = saved
    meta = json.loads((path / "config.json").read_text())
    rebuilt = build_model(from_dict(ModelConfig, meta["model"]))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_lone_safetensors_file_is_self_describing(saved):
    _, path, model, cfg = saved
    ckpt = load_checkpoint(path / "model.safetensors")
    assert ckpt.configs == cfg and set(ckpt.weights) == set(model.state_dict())


def test_corrupted_weights_are_refused(saved):
    _, path, _, _ = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_checkpoint(path)


def test_mismatched_config_is_refused(saved):
    _, path, _, _ = saved
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["inner_channels"] = 16
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not match the model config"):
        build_from_checkpoint(path)


def test_garbage_json_and_foreign_files_are_refused(saved, tmp_path):
    _, path, _, _ = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupted JSON"):
        read_meta(path)
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_a_failed_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    run, path, model, cfg = saved
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(run, cfg, 8, model.state_dict())
    assert resolve(run) == path
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000007", "latest"]


def test_training_state_is_required_to_resume(tmp_path):
    cfg = Configs(model=PRESETS["tiny"])
    save_checkpoint(tmp_path, cfg, 1, build_model(cfg.model).state_dict())
    with pytest.raises(UserError, match="no training state"):
        load_checkpoint(tmp_path, training=True)


def test_keep_prunes_old_checkpoints(tmp_path):
    cfg = Configs(model=PRESETS["tiny"])
    w = build_model(cfg.model).state_dict()
    for s in range(1, 5):
        save_checkpoint(tmp_path, cfg, s, w, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000003", "ckpt-0000004"]
