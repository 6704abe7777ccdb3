import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_configs
from tfsdeploy.checkpoint import load_checkpoint
from tfsdeploy.config import PRESETS
from tfsdeploy.errors import UserError
from training.train import Trainer, resolve_configs, train

QUIET = dict(show_progress=False, log=lambda s: None)


def weights(run):
    return load_checkpoint(run, training=True)


def test_resume_continues_exactly(tmp_path, synth_dataset):
    straight = tmp_path / "straight"
    train(straight, tiny_configs(steps=4, ckpt_every=0), data_root=synth_dataset, **QUIET)
    split = tmp_path / "split"
    train(split, tiny_configs(steps=2, ckpt_every=0), data_root=synth_dataset, **QUIET)
    assert load_checkpoint(split).step == 2
    cfg = resolve_configs(split, PRESETS["tiny"], {"train": {"steps": 4}})
    assert cfg.train.steps == 4 and cfg.model.image_size == 64  # the checkpoint's own configs
    train(split, cfg, data_root=synth_dataset, **QUIET)
    a, b = weights(straight), weights(split)
    assert a.step == b.step == 4
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
    for k in a.meta["training"]:
        assert torch.equal(a.meta["training"][k], b.meta["training"][k]), k


def test_resume_refuses_to_change_the_model(tmp_path, synth_dataset):
    run = tmp_path / "r"
    train(run, tiny_configs(steps=1), data_root=synth_dataset, **QUIET)
    with pytest.raises(UserError, match="resuming cannot change"):
        resolve_configs(run, PRESETS["tiny"], {"model": {"tmfa": "none"}})
    with pytest.raises(UserError, match="resuming cannot change"):
        resolve_configs(run, PRESETS["tiny"], {"diffusion": {"prediction": "eps"}})


def test_interrupt_saves_a_checkpoint(tmp_path, synth_dataset, monkeypatch):
    run = tmp_path / "r"
    trainer = Trainer(run, tiny_configs(steps=10, ckpt_every=0), synth_dataset, log=lambda s: None)
    real_step = trainer.train_step

    def step_then_interrupt():
        out = real_step()
        if trainer.step == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    with pytest.raises(UserError, match="interrupted at step 3"):
        trainer.run(show_progress=False)
    assert load_checkpoint(run).step == 3


@pytest.mark.parametrize("prediction,target", [("eps", "fused"), ("v", "fused"), ("x0", "residual"),
                                               ("eps", "residual")])
def test_every_parameterisation_trains_validates_and_samples(tmp_path, synth_dataset, prediction, target):
    run = tmp_path / "r"
    cfg = tiny_configs(steps=2, prediction=prediction, target=target, val_every=2)
    train(run, cfg, data_root=synth_dataset, **QUIET)
    lines = (run / "log.jsonl").read_text().splitlines()
    assert any('"val"' in l for l in lines)
    assert all("NaN" not in l for l in lines)


def test_training_changes_weights_and_lowers_loss(tmp_path, synth_dataset):
    import json

    run = tmp_path / "r"
    train(run, tiny_configs(steps=40, ckpt_every=0, lr=3e-3), data_root=synth_dataset, **QUIET)
    losses = [json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


@pytest.mark.slow
def test_ddp_two_processes_with_gloo(tmp_path, synth_dataset):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tfsdeploy", "train", "--out", str(run), "--preset", "tiny", "--data", str(synth_dataset),
           "--steps", "3", "--batch-size", "2", "--crop", "32", "--val-every", "0", "--no-progress",
           "--prediction", "x0", "--target", "residual", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = load_checkpoint(run)
    assert ckpt.step == 3 and ckpt.meta["world_size"] == 2
    assert "2 process(es)" in res.stdout
