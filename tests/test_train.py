import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import AnalyticDenoiser, randomize_output, tiny_configs
from tfsdeploy.checkpoint import load_checkpoint
from tfsdeploy.config import PRESETS
from tfsdeploy.errors import UserError
from training.train import Trainer, resolve_configs, train

QUIET = dict(show_progress=False, log=lambda s: None)


def weights(run):
    return load_checkpoint(run, training=True)


@pytest.mark.parametrize("objective", ["diffusion", "regression"])
def test_resume_continues_exactly(tmp_path, synth_dataset, objective):
    """4 steps straight and 2 + resume + 2 end with the same EMA, online weights and Adam state, bit
    for bit, for both objectives (a long CPU run goes on over several sessions this way)."""
    def configs(steps):
        cfg = tiny_configs(steps=steps, ckpt_every=0)
        return dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, objective=objective))

    straight = tmp_path / "straight"
    train(straight, configs(4), data_root=synth_dataset, **QUIET)
    split = tmp_path / "split"
    train(split, configs(2), data_root=synth_dataset, **QUIET)
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


def test_a_resumed_run_logs_each_step_once(tmp_path, synth_dataset):
    """Steps taken after the last checkpoint of a killed run are replayed on resume; their log lines
    (and a line cut short by the kill) used to stay, so log.jsonl held a step twice."""
    import json

    run = tmp_path / "r"
    train(run, tiny_configs(steps=2, ckpt_every=0), data_root=synth_dataset, **QUIET)
    with open(run / "log.jsonl", "a") as f:  # what a run killed at step 3, before saving, leaves
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    train(run, resolve_configs(run, PRESETS["tiny"], {"train": {"steps": 4}}), data_root=synth_dataset, **QUIET)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


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
    """Every draw of a step is keyed by (seed, step, rank): holding the step at 0 repeats step 0's
    batch, noise levels, noise and dropout, so the loss is a fixed function of the weights, and each
    small Adam step must lower it. (Averages over many steps with fresh draws compare noise.)"""
    trainer = Trainer(tmp_path / "r", tiny_configs(lr=1e-3), synth_dataset, log=lambda s: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = []
    for _ in range(5):
        trainer.step = 0
        losses.append(trainer.train_step()["loss"])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"final.conv.weight", "init_conv.weight", "tmfa.fc1.weight"} <= changed  # down to the first layer
    assert not torch.equal(trainer.ema.state_dict()["final.conv.weight"], before["final.conv.weight"])


def _pairs(n: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tfsdeploy.fusion import fuse_condition
    from tfsdeploy.imaging import degrade

    g = torch.Generator().manual_seed(7)
    hr = torch.rand(n, 8, size, size, generator=g)
    cond01 = degrade(hr[:, :5], 2)
    return cond01, fuse_condition(cond01), hr[:, 5:]


def test_the_shared_training_step_matches_a_hand_written_one():
    """`diffusion.train_step` (training and adaptation) against the step written out by hand: the
    same losses and weights, bit for bit, with dropout on and a gradient clip that binds."""
    from tfsdeploy.config import TrainConfig
    from tfsdeploy.diffusion import Diffusion, train_step
    from tfsdeploy.model import build_model

    cfg = tiny_configs()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.2))
    tc = TrainConfig(grad_clip=0.05, psf_mse=1.0, psf_ssim=0.1)
    diffusion = Diffusion.from_configs(cfg)
    torch.manual_seed(0)
    model = randomize_output(build_model(cfg.model))
    ref = copy.deepcopy(model)
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, ref))
    cond01, base01, gt01 = _pairs()
    weight = torch.tensor([0.5, 1.0, 2.0])

    def draw(rng):
        idx = torch.from_numpy(rng.choice(3, size=2, replace=False))
        return cond01[idx], base01[idx], gt01[idx], weight[idx]

    norms = []
    for step in range(3):
        got = train_step(diffusion, model, opt, tc, (5, step, 0), draw, lambda loss: "diverged")
        rng = np.random.default_rng([5, step, 0])
        torch.manual_seed(int(rng.integers(2**62)))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        c, b, g, w = draw(rng)
        ref.train()
        want = diffusion.pair_losses(ref, c, b, g, gen, 1.0, 0.1, sample_weight=w)
        ref_opt.zero_grad()
        want["loss"].backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        ref_opt.step()
        assert got == {k: float(v.detach()) for k, v in want.items()}, step
        for (k, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (step, k)
    assert min(norms) > 0.05  # the clip bound each step
    assert len(set(norms)) == 3  # each key drew its own batch and noise


def test_the_training_step_refuses_a_loss_that_is_not_finite():
    from tfsdeploy.config import TrainConfig
    from tfsdeploy.diffusion import Diffusion, train_step
    from tfsdeploy.model import build_model

    cfg = tiny_configs()
    model = build_model(cfg.model)
    cond01, base01, gt01 = _pairs()
    cond01 = cond01.clone()
    cond01[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"^loss nan at step 3$"):
        train_step(Diffusion.from_configs(cfg), model, torch.optim.Adam(model.parameters()), TrainConfig(), (0, 2),
                   lambda rng: (cond01, base01, gt01, None), lambda loss: f"loss {loss} at step 3")


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


def test_scale_weights_are_inverse_baseline_mse_with_mean_one(tmp_path, synth_dataset):
    from tfsdeploy.fusion import fuse_condition
    from tfsdeploy.imaging import degrade

    trainer = Trainer(tmp_path / "r", tiny_configs(scale_balance=True), synth_dataset, log=lambda s: None)
    w = trainer.scale_weights
    assert sorted(w) == [2, 4, 8] and sum(w.values()) / 3 == pytest.approx(1.0)
    # independent reference: the baseline's MSE per scale, image by image
    mse = {}
    for s in (2, 4, 8):
        errs = []
        for smp in trainer.train_set:
            hr = smp.hr.float()[None] / 255
            errs.append(float(((fuse_condition(degrade(hr[:, :5], s)) - hr[:, 5:]) ** 2).mean()))
        mse[s] = sum(errs) / len(errs)
    for a in (2, 4, 8):
        for b in (2, 4, 8):
            assert w[a] / w[b] == pytest.approx(mse[b] / mse[a], rel=1e-4)


def test_scale_balance_weights_each_sample_loss(tmp_path, synth_dataset, monkeypatch):
    from tfsdeploy.diffusion import Diffusion

    seen = {}
    real = Diffusion.training_losses

    def spy(self, *a, **kw):
        seen["w"] = kw.get("sample_weight")
        return real(self, *a, **kw)

    monkeypatch.setattr(Diffusion, "training_losses", spy)
    trainer = Trainer(tmp_path / "r", tiny_configs(scale_balance=True, batch_size=4), synth_dataset, log=lambda s: None)
    trainer.train_step()
    assert seen["w"].shape == (4,)
    assert all(any(abs(x - v) < 1e-6 for v in trainer.scale_weights.values()) for x in seen["w"].tolist())
    off = Trainer(tmp_path / "o", tiny_configs(), synth_dataset, log=lambda s: None)
    off.train_step()
    assert seen["w"] is None and off.scale_weights == {}


def test_regression_objective_trains_and_samples_in_one_call(tmp_path, synth_dataset):
    from tfsdeploy.config import DiffusionConfig
    from tfsdeploy.diffusion import Diffusion

    cfg = dataclasses.replace(tiny_configs(steps=2, val_every=2),
                              diffusion=DiffusionConfig(prediction="x0", target="residual", objective="regression"))
    train(tmp_path / "r", cfg, data_root=synth_dataset, **QUIET)
    assert load_checkpoint(tmp_path / "r").configs.diffusion.objective == "regression"
    calls = []

    def net(x, c, level):
        calls.append((x.abs().max().item(), level.abs().max().item()))
        return torch.full_like(x, 0.25)

    d = Diffusion.from_configs(cfg)
    out = d.sample(AnalyticDenoiser(net), torch.zeros(1, 5, 8, 8), (1, 3, 8, 8), steps=10)
    assert calls == [(0.0, 0.0)] and torch.all(out == 0.25)  # one call on x_t = 0 at level 0
    with pytest.raises(UserError, match="regression needs prediction x0"):
        DiffusionConfig(prediction="eps", objective="regression")


def test_time_limit_stops_cleanly_and_the_same_command_resumes(tmp_path, synth_dataset):
    run = tmp_path / "r"
    msgs = []
    train(run, tiny_configs(steps=50, ckpt_every=0), data_root=synth_dataset, show_progress=False,
          log=msgs.append, time_limit_s=0.0)
    assert load_checkpoint(run).step == 1  # at least one step, then a clean stop with a checkpoint
    assert any("time limit" in m for m in msgs)
    train(run, tiny_configs(steps=3, ckpt_every=0), data_root=synth_dataset, **QUIET)
    assert load_checkpoint(run).step == 3


def test_init_starts_a_new_run_from_other_weights(tmp_path, synth_dataset):
    src = tmp_path / "src"
    train(src, tiny_configs(steps=2), data_root=synth_dataset, **QUIET)
    trainer = Trainer(tmp_path / "ft", tiny_configs(steps=2), synth_dataset, log=lambda s: None, init_from=src)
    ref = load_checkpoint(src).weights
    assert trainer.step == 0
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    trainer.run(show_progress=False)
    assert load_checkpoint(tmp_path / "ft").meta["init"]["step"] == 2  # provenance is recorded
    other = tiny_configs()
    other = dataclasses.replace(other, model=dataclasses.replace(other.model, tmfa="none"))
    with pytest.raises(UserError, match="model config differs"):
        Trainer(tmp_path / "ft2", other, synth_dataset, log=lambda s: None, init_from=src)


def test_fine_tune_a_bundle_member_from_the_cli_and_bundle_the_result(tmp_path, synth_dataset, monkeypatch):
    """`train --init BUNDLE --data FOLDER --scales 4`: the x4 member's model, schedule and
    parameterisation (no --preset needed), the user's folder (ground truth made by the classical
    fusion when it has none), and a result that `bundle` packs and `fuse --model` runs."""
    import json

    from typer.testing import CliRunner

    from conftest import write_folder
    from tfsdeploy.bundle import make_bundle
    from tfsdeploy.cli import app
    from training.shrink import shrink_member

    src = tmp_path / "src"
    cfg = dataclasses.replace(tiny_configs(steps=2), diffusion=dataclasses.replace(
        tiny_configs().diffusion, residual_scale=3.0))
    train(src, cfg, data_root=synth_dataset, **QUIET)
    packaged = make_bundle({4: src, 8: src}, tmp_path / "bundle", ddim_steps={4: 1}, backproject={4: 0.75})
    packaged = shrink_member(packaged, 4, None, gate=(0.3, 0.5), out=tmp_path / "gated")
    monkeypatch.setenv("TFSDEPLOY_MODEL", str(packaged))  # what `--init default` resolves to
    mine = write_folder(tmp_path / "mine", ["a", "b", "c", "d", "e"], gt=False)  # full resolution, no gt
    cli = CliRunner()
    base = ["train", "--out", str(tmp_path / "ft"), "--data", str(mine), "--steps", "3", "--batch-size", "2",
            "--crop", "32", "--val-every", "0", "--no-progress"]

    res = cli.invoke(app, base + ["--init", "default"])
    assert res.exit_code == 2 and "pick its member with --scales N (one of 4, 8)" in res.stderr
    res = cli.invoke(app, base + ["--init", "default", "--scales", "4", "--target", "fused"])
    assert res.exit_code == 2 and "a fine-tune keeps the model" in res.stderr
    res = cli.invoke(app, base + ["--init", "default", "--scales", "4", "--preset", "small"])
    assert res.exit_code == 2 and "different model than preset 'small'" in res.stderr
    assert not (tmp_path / "ft").exists()

    res = cli.invoke(app, base + ["--init", "default", "--scales", "4"])
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(tmp_path / "ft")
    assert ck.step == 3 and ck.configs.model == cfg.model and ck.configs.diffusion == cfg.diffusion
    assert ck.configs.data.scales == (4,) and ck.configs.data.root == str(mine)
    assert ck.meta["init"]["path"].endswith("x4.safetensors")
    assert any(not torch.equal(v, load_checkpoint(src).weights[k]) for k, v in ck.weights.items())
    # It trained on the inputs the member is fed, and kept what the member was shipped with.
    assert ck.configs.data.backproject == 0.75 and ck.meta["init"]["ddim_steps"] == 1
    assert ck.configs.train.val_steps == 1  # validated with the member's sampler
    assert "back-projected at strength 0.75" in res.output
    # It held the last of the five triplets out and chose its blend there, the start's score beside it.
    choice = ck.meta["blend_choice"]
    assert choice["slices"] == 1 and choice["ddim_steps"] == 1 and choice["alpha"] in (0, 0.25, 0.5, 0.75, 1)
    assert set(choice["scores"]) == {"0", "0.25", "0.5", "0.75", "1"}
    fair = [v for v in choice["scores"].values() if v["ssim"] >= choice["scores"]["0"]["ssim"]]
    assert choice["scores"][f"{choice['alpha']:g}"]["psnr"] == max(v["psnr"] for v in fair)
    assert "held-out: 1 slice(s)" in res.output and "the starting model" in res.output
    res = cli.invoke(app, ["bundle", str(tmp_path / "mybundle"), "--x4", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    entry = json.loads((tmp_path / "mybundle" / "bundle.json").read_text())["models"]["4"]
    assert entry["backproject"] == 0.75 and entry["ddim_steps"] == 1 and entry["backproject_gate"] == [0.3, 0.5]
    assert entry.get("blend", 1) == choice["alpha"]
    d = synth_dataset / "test"
    res = cli.invoke(app, ["fuse", *(str(d / m / "e00.png") for m in ("t1", "t2", "func")), "--model",
                           str(tmp_path / "mybundle"), "--steps", "2", "--out", str(tmp_path / "o.png"),
                           "--no-progress"])
    assert res.exit_code == 0 and (tmp_path / "o.png").is_file(), res.output
    # The same command resumes the fine-tune (with or without --init); another --init is refused.
    res = cli.invoke(app, base[:6] + ["4", *base[7:]] + ["--init", "default", "--scales", "4"])
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    res = cli.invoke(app, base[:6] + ["5", *base[7:]])
    assert res.exit_code == 0 and "resumed" in res.output, res.output
    assert load_checkpoint(tmp_path / "ft").step == 5
    res = cli.invoke(app, base[:6] + ["6", *base[7:]] + ["--init", str(src)])
    assert res.exit_code == 2 and "did not start from" in res.stderr


def test_a_fine_tune_that_ruins_the_model_ships_the_model_it_started_from(tmp_path, synth_dataset):
    """A fine-tune scores its blends on the triplets it held out (never trained on); when the
    fine-tune only does harm there, it chooses A = 0 and `bundle` stores the starting weights
    exactly. The starting model's score is the PSNR of fusing the held-out slice as `fuse` would."""
    from conftest import write_folder
    from engines.torch_engine import TorchDenoiser
    from tfsdeploy.bundle import make_bundle
    from tfsdeploy.checkpoint import build_from_checkpoint
    from tfsdeploy.data import open_split
    from tfsdeploy.diffusion import Diffusion
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.inputs import as_triplet, make_condition
    from tfsdeploy.metrics import psnr
    from training.train import held_out

    src = tmp_path / "src"
    train(src, tiny_configs(steps=2), data_root=synth_dataset, **QUIET)
    mine = write_folder(tmp_path / "mine", [f"n{i}" for i in range(5)], seed=9, gt=False)
    ruin = resolve_configs(tmp_path / "ft", PRESETS["tiny"],
                           {"train": {"steps": 3, "lr": 0.5, "val_every": 0, "batch_size": 2},
                            "data": {"root": str(mine), "crop": 32, "backproject": 1.0}}, init=src)
    msgs = []
    train(tmp_path / "ft", ruin, data_root=mine, log=msgs.append, show_progress=False, init_from=src,
          shipped={"backproject": 1.0, "ddim_steps": 2})
    choice = load_checkpoint(tmp_path / "ft").meta["blend_choice"]
    assert choice["alpha"] == 0, choice
    assert choice["scores"]["1"]["psnr"] < choice["scores"]["0"]["psnr"] - 1
    assert any("chose A = 0" in m for m in msgs)

    # the starting model's score, fused independently from the held-out triplet's files
    samples = open_split(mine, "train", 64).load()
    train_part, held = held_out(samples, mine)
    assert [s.name for s in held] == ["n4"] and len(train_part) == 4
    hr = held[0].hr.float() / 255
    model, ckpt = build_from_checkpoint(src, "cpu")
    configs = ckpt.configs
    scores = []
    for scale in (2, 4, 8):  # the fine-tune's scales: each is scored
        cond, _ = make_condition(as_triplet(hr[0:1], hr[1:2], hr[2:5]), scale, 64, 1.0)
        fused = Diffusion.from_configs(configs).fuse(TorchDenoiser(model, torch.device("cpu")), cond,
                                                     SampleConfig(steps=2))
        scores.append(float(psnr(fused, hr[None, 5:]).mean()))
    assert abs(np.mean(scores) - choice["scores"]["0"]["psnr"]) < 1e-3

    out = make_bundle({4: tmp_path / "ft"}, tmp_path / "b", fp16=False)
    entry = json.loads((out / "bundle.json").read_text())["models"]["4"]
    assert entry["blend"] == 0 and entry["backproject"] == 1.0 and entry["ddim_steps"] == 2
    stored, start = load_checkpoint(out / "x4.safetensors").weights, load_checkpoint(src).weights
    for k, v in start.items():
        assert torch.equal(stored[k], v), k


def test_a_fine_tune_holds_out_from_a_split_without_val_and_uses_a_val_split_as_it_is(tmp_path, synth_dataset):
    from conftest import write_folder

    src = tmp_path / "src"
    train(src, tiny_configs(steps=1), data_root=synth_dataset, **QUIET)
    split = tmp_path / "split"
    write_folder(split / "train", [f"t{i}" for i in range(10)], seed=4)
    write_folder(split / "test", ["x"], seed=5)
    t = Trainer(tmp_path / "ft", tiny_configs(), split, log=lambda s: None, init_from=src)
    assert [s.name for s in t.train_set] == [f"t{i}" for i in range(8)]
    assert [s.name for s in t.val_set] == ["t8", "t9"]
    t = Trainer(tmp_path / "ft2", tiny_configs(), synth_dataset, log=lambda s: None, init_from=src)
    assert len(t.train_set) == 6 and [s.name for s in t.val_set] == ["v00", "v01"]
    t = Trainer(tmp_path / "scratch", tiny_configs(), split, log=lambda s: None)  # not a fine-tune: as before
    assert len(t.train_set) == 10


def test_a_one_triplet_folder_cannot_be_fine_tuned_on(tmp_path, synth_dataset):
    from conftest import write_folder

    src = tmp_path / "src"
    train(src, tiny_configs(steps=1), data_root=synth_dataset, **QUIET)
    mine = write_folder(tmp_path / "mine", ["only"], gt=False)
    cfg = resolve_configs(tmp_path / "ft", PRESETS["tiny"], {"data": {"root": str(mine)}}, init=src)
    with pytest.raises(UserError, match="at least 2 triplets"):
        train(tmp_path / "ft", cfg, data_root=mine, init_from=src, **QUIET)
    assert not (tmp_path / "ft").exists()


def test_a_fine_tune_trains_with_its_own_recipe_not_the_starting_checkpoints(tmp_path, synth_dataset):
    from training.train import FINE_TUNE

    src = tmp_path / "src"
    gpu_recipe = tiny_configs(steps=1, batch_size=64, lr=2e-4, ckpt_every=1000)
    train(src, gpu_recipe, data_root=synth_dataset, **QUIET)
    cfg = resolve_configs(tmp_path / "ft", PRESETS["tiny"], {"train": {"lr": 5e-5}, "data": {"root": "x"}},
                          init=src)
    assert cfg.model == gpu_recipe.model and cfg.diffusion == gpu_recipe.diffusion
    assert cfg.train.batch_size == FINE_TUNE["batch_size"] and cfg.train.steps == FINE_TUNE["steps"]
    assert cfg.train.lr == 5e-5 and cfg.data.root == "x"  # options given on the command line win
    assert cfg.train.psf_ssim == gpu_recipe.train.psf_ssim  # the loss is the one the model learnt with


def test_a_member_shrunk_to_the_baseline_can_be_fine_tuned_as_a_regression_model(tmp_path, synth_dataset):
    """A member that predicts no residual (alpha 0) is the baseline under either objective, so a
    fine-tune may retrain it as a regression model: it starts exactly at the baseline (its held-out
    A = 0 scores the baseline) and bundles as a regression member. A member that predicts something
    keeps its objective."""
    from tfsdeploy.bundle import make_bundle
    from training.shrink import shrink_member

    src = tmp_path / "src"
    train(src, tiny_configs(steps=2), data_root=synth_dataset, **QUIET)
    bundle = make_bundle({2: src}, tmp_path / "b", fp16=False)
    zero = shrink_member(bundle, 2, 0.0, out=tmp_path / "b0") / "x2.safetensors"
    reg = resolve_configs(tmp_path / "ft", PRESETS["tiny"],
                          {"diffusion": {"objective": "regression"}, "data": {"scales": (2,), "crop": 32},
                           "train": {"steps": 3, "val_every": 0, "batch_size": 2}}, init=zero)
    assert reg.diffusion.objective == "regression" and reg.diffusion.prediction == "x0"
    with pytest.raises(UserError, match="change the objective only of a model that predicts no residual"):
        Trainer(tmp_path / "bad", reg, synth_dataset, log=lambda s: None, init_from=bundle / "x2.safetensors")
    msgs = []
    train(tmp_path / "ft", reg, data_root=synth_dataset, log=msgs.append, show_progress=False, init_from=zero)
    ckpt = load_checkpoint(tmp_path / "ft")
    choice = ckpt.meta["blend_choice"]
    assert ckpt.configs.diffusion.objective == "regression"
    assert abs(choice["scores"]["0"]["psnr"] - choice["baseline"]["psnr"]) < 1e-4
    assert abs(choice["scores"]["0"]["ssim"] - choice["baseline"]["ssim"]) < 1e-6
    out = make_bundle({2: tmp_path / "ft"}, tmp_path / "b2", fp16=False)
    assert load_checkpoint(out / "x2.safetensors").configs.diffusion.objective == "regression"
