"""The training loop: single process or DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU).

Every batch, every noise draw and every dropout mask is a pure function of (seed, step, rank),
so a run that is killed and resumed from a checkpoint continues exactly as if it had never
stopped. Checkpoints hold EMA weights for inference plus the online weights and Adam state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from tfsdeploy.artifacts import checkpoint_fingerprint
from tfsdeploy.checkpoint import (LATEST_FILE, Configs, load_checkpoint, load_weights, read_meta, resolve,
                                  save_checkpoint)
from tfsdeploy.config import (DataConfig, DiffusionConfig, ModelConfig, SampleConfig, ScheduleConfig, TrainConfig,
                              from_dict, to_dict)
from tfsdeploy.data import Batch, Sample, augment, default_data_dir, make_batch, open_split, stack_samples
from tfsdeploy.diffusion import Diffusion, PairBatch, train_step
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path, write_error
from tfsdeploy.metrics import psnr, ssim
from tfsdeploy.model import FINAL_CONV, build_model, count_parameters

# Train options that may change when a run is resumed; everything else must match the checkpoint.
RESUMABLE = {"train": {"steps", "log_every", "val_every", "val_images", "val_steps", "ckpt_every", "keep_ckpts",
                       "threads"},
             "data": {"root"}}
# What a fine-tune (`train --init`) trains with unless told otherwise, in place of the recipe the
# starting checkpoint was trained with (a GPU's batch of 64 would make each step minutes on a CPU):
# 50-100 steps of batch 8 gained about 1 dB on a new domain (benchmarks/reports/finetune).
FINE_TUNE = {"steps": 100, "batch_size": 8, "lr": 1e-4, "ckpt_every": 50, "log_every": 10, "val_every": 50}
# A fine-tune on one folder of the user's triplets sets this share of them aside (the last by name,
# at least one) and never trains on them: they choose how much of the fine-tune the run keeps.
HOLDOUT_SHARE = 0.2
# The blends (1 - A) * start + A * fine-tuned a finished fine-tune scores on its held-out slices;
# A = 0 is the model it started from, so the choice is never below it there.
BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# At most this many held-out slices (spread evenly) are scored.
HOLDOUT_SCORED = 16
# What a run folder holds (tfsdeploy.checkpoint.save_checkpoint, the log).
RUN_FILES = (LATEST_FILE, "log.jsonl", "ckpt-*/**")
SECTIONS = {"model": ModelConfig, "schedule": ScheduleConfig, "diffusion": DiffusionConfig,
            "data": DataConfig, "train": TrainConfig}


# --------------------------------------------------------------------------- configs


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "latest").is_file()


def resolve_configs(run_dir: str | Path, model: ModelConfig, overrides: dict[str, dict[str, Any]],
                    init: str | Path | None = None) -> Configs:
    """Configs for a new run (preset + overrides), for a fine-tune (`init`: the checkpoint it starts
    from gives the model, schedule and parameterisation; data and training options may change), or
    for resuming a run (the checkpoint's, checked against any override that would change what was
    being trained)."""
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section {section!r}")
    if has_checkpoint(run_dir):
        saved = json.loads((resolve(run_dir) / "config.json").read_text())
        return _merge_checked(saved, overrides, RESUMABLE,
                              lambda what: f"{run_dir} was trained with {what}; resuming cannot change it "
                                           f"(use a new --out for a new run)")
    if init is not None:
        _, saved = read_meta(init)
        saved = {**saved, "data": {**saved.get("data", {}), "root": ""},
                 "train": {**saved.get("train", {}), **FINE_TUNE}}
        return _merge_checked(saved, overrides, {"data": None, "train": None, "diffusion": {"objective"}},
                              lambda what: f"--init {init} was trained with {what}; a fine-tune keeps the "
                                           f"model it starts from (drop that option)")
    merged = {"model": to_dict(model)}
    for section in SECTIONS:
        base = merged.get(section, to_dict(SECTIONS[section]()))
        merged[section] = {**base, **{k: v for k, v in overrides.get(section, {}).items() if v is not None}}
    return Configs.from_json(merged)


def _merge_checked(saved: dict[str, Any], overrides: dict[str, dict[str, Any]],
                   changeable: dict[str, set[str] | None], refuse: Callable[[str], str]) -> Configs:
    """Saved configs with the overrides applied where `changeable` allows (None: the whole section);
    an override that would change anything else is refused with `refuse("section.key=current")`."""
    out = {}
    for section, cls in SECTIONS.items():
        cfg = from_dict(cls, saved.get(section, {}))
        allowed = changeable.get(section, set())
        for k, v in overrides.get(section, {}).items():
            if v is None:
                continue
            if allowed is None or k in allowed:
                cfg = _replace(cfg, k, v)
            elif (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k):
                raise UserError(refuse(f"{section}.{k}={getattr(cfg, k)!r}") + f"; you asked for {v!r}")
        out[section] = cfg
    return Configs(**out)


def started_from(run_dir: str | Path, init: str | Path) -> bool:
    """Whether the run in `run_dir` is a fine-tune that started from checkpoint `init` (by content)."""
    recorded = read_meta(run_dir)[1].get("init") or {}
    return recorded.get("sha256") == checkpoint_fingerprint(init)["sha256"]


def init_checkpoint(init: str | Path, scales: tuple[int, ...] | None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint a fine-tune starts from: a checkpoint or run folder as given, or a bundle's
    member (`default` is the packaged bundle) for the one scale being trained; with what it was
    shipped with, which the fine-tune keeps: the back-projection strength its inputs get
    (`backproject`: the member's, or the strength a run was trained at) and, for a bundle member,
    that strength's noise gate (`backproject_gate`) and its recommended DDIM step count
    (`ddim_steps`)."""
    from tfsdeploy.modelref import resolve_model

    ref = resolve_model(init)
    if not ref.path.exists():
        raise UserError(f"--init {init}: no such checkpoint, run folder or bundle")
    if ref.kind != "bundle":
        data = read_meta(ref.path)[1].get("data", {})
        return ref.path, {"backproject": float(data.get("backproject", 0.0))}
    if not scales or len(scales) != 1:
        raise UserError(f"--init {init} is a bundle, one model per scale: pick its member with --scales N "
                        f"(one of {', '.join(map(str, ref.scales))})")
    entry = ref.manifest["models"][str(scales[0])]
    shipped = {"backproject": float(entry.get("backproject", 0.0))}
    if entry.get("backproject_gate"):
        shipped["backproject_gate"] = [float(v) for v in entry["backproject_gate"]]
    if entry.get("ddim_steps"):
        shipped["ddim_steps"] = int(entry["ddim_steps"])
    return ref.member(scales[0]), shipped


def _predicts_nothing(weights: dict[str, torch.Tensor]) -> bool:
    """Whether a TFS-Diff network's last convolution is all zero: it then outputs 0 whatever it is
    given, which with target "residual" is the upsample-then-fuse baseline under any objective."""
    return all(weights.get(k) is not None and not bool(weights[k].any()) for k in FINAL_CONV)


def _replace(cfg, k, v):
    import dataclasses

    return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v})


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


# --------------------------------------------------------------------------- state <-> tensors


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, run_dir: str | Path, configs: Configs, data_root: str | Path | None = None,
                 log: Callable[[str], None] = print, init_from: str | Path | None = None,
                 shipped: dict[str, Any] | None = None):
        """`init_from`: start a fine-tune from this checkpoint; `shipped`: what it was shipped with
        (`init_checkpoint`), recorded with the run."""
        self.run_dir = Path(run_dir)
        self.cfg = configs
        self.log = log
        self.dist = setup_distributed()
        tc = configs.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for convolutions and matmuls
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        if configs.model.cond_channels != 5 or configs.model.out_channels != 3:
            raise UserError("training data has 5 condition channels and 3 output channels; the model config differs")
        if configs.data.crop and configs.data.crop % configs.model.size_multiple:
            raise UserError(f"crop {configs.data.crop} must be a multiple of {configs.model.size_multiple} for this model")

        root = Path(data_root or configs.data.root or default_data_dir())
        self.train_set: list[Sample] = open_split(root, "train", configs.model.image_size).load()
        try:
            self.val_set: list[Sample] = open_split(root, "val", configs.model.image_size).load()
        except UserError:
            self.val_set = []
        if not self.train_set:
            raise UserError(f"{root}: the training split is empty")
        fine_tune = init_from is not None or bool(has_checkpoint(self.run_dir)
                                                  and read_meta(self.run_dir)[1].get("init"))
        if fine_tune and not ((root / "train").is_dir() and (root / "val").is_dir()):
            # one folder (its validation split is itself), or a split one without a validation split
            self.train_set, self.val_set = held_out(self.train_set, root)
        # Batches are cut, degraded and fused where the model runs: on a GPU that keeps it fed.
        self.train_hr = stack_samples(self.train_set, self.device)
        self.val_hr = stack_samples(self.val_set, self.device) if self.val_set else None
        self.scale_weights = self._scale_weights() if tc.scale_balance else {}

        self.diffusion = Diffusion.from_configs(configs)
        torch.manual_seed(tc.seed)  # the same seed gives the same initial weights on every rank
        self.model = build_model(configs.model).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=tc.lr)
        self.step = 0
        self.elapsed = 0.0
        self.init_info: dict[str, Any] | None = None  # where a fine-tuning run started from
        self.blend_choice: dict[str, Any] | None = None  # the blend a finished fine-tune chose
        if has_checkpoint(self.run_dir):
            self._restore()
        elif init_from is not None:
            self._init_from(init_from, shipped or {})
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

    # ---------------------------------------------------------------- checkpoints
    def _restore(self) -> None:
        ckpt = load_checkpoint(self.run_dir, training=True)
        tensors = ckpt.meta["training"]
        load_weights(self.ema, ckpt.weights, ckpt.path)
        online = {k[len("online."):]: v for k, v in tensors.items() if k.startswith("online.")}
        load_weights(self.model, online, ckpt.path)
        optimizer_from_tensors(self.opt, tensors, ckpt.meta["optim_param_groups"])
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.train.lr
        self.step = ckpt.step
        self.elapsed = float(ckpt.meta.get("elapsed_s", 0.0))
        self.init_info = ckpt.meta.get("init")
        self.blend_choice = ckpt.meta.get("blend_choice")
        if self.dist.main:
            self._trim_log()
            self.log(f"resumed {ckpt.path} at step {self.step}")

    def _trim_log(self) -> None:
        """Drop log lines past the restored step (steps a killed run took after its last checkpoint,
        which this run replays) and a line cut short by the kill: one line per step survives."""
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if int(entry.get("step", 0)) <= self.step:
                keep.append(line)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in keep))

    def _init_from(self, path: str | Path, shipped: dict[str, Any]) -> None:
        """Start a new run from another checkpoint's (EMA) weights, with a fresh optimizer: fine-tuning."""
        ckpt = load_checkpoint(path)
        if ckpt.configs.model != self.cfg.model:
            raise UserError(f"{path}: its model config differs from this run's; --init needs the same preset")
        was = ckpt.configs.diffusion.objective
        if was != self.cfg.diffusion.objective and not _predicts_nothing(ckpt.weights):
            # the same weights would mean another model under the other objective; one that predicts
            # no residual (a member shrunk to alpha 0) is the upsample-then-fuse baseline under both
            raise UserError(f"--init {path} was trained with objective {was}; a fine-tune can change the "
                            f"objective only of a model that predicts no residual (a member shrunk to alpha 0)")
        for m in (self.model, self.ema):
            load_weights(m, ckpt.weights, ckpt.path)
        self.init_info = {"path": str(ckpt.path), "step": ckpt.step,
                          "sha256": checkpoint_fingerprint(ckpt.path)["sha256"], **shipped}
        if self.dist.main:
            bp = self.cfg.data.backproject
            self.log(f"initialised from {ckpt.path} (step {ckpt.step})"
                     + (f"; inputs back-projected at strength {bp:g}, as it was shipped" if bp else ""))

    @torch.no_grad()
    def _scale_weights(self) -> dict[int, float]:
        """Per-scale loss weights 1 / baseline MSE, normalised to a mean of 1 over the scales."""
        inv = {}
        for s in self.cfg.data.scales:
            errs = []
            for i in range(0, len(self.train_set), 32):
                b = make_batch(self.train_hr, range(i, min(i + 32, len(self.train_set))), [s], 0,
                               np.random.default_rng(0), backproject=self.cfg.data.backproject)
                errs.append(((b.base01 - b.gt01) ** 2).mean(dim=(1, 2, 3)))
            inv[s] = 1.0 / max(float(torch.cat(errs).mean()), 1e-10)
        mean = sum(inv.values()) / len(inv)
        weights = {s: v / mean for s, v in inv.items()}
        if self.dist.main:
            self.log("scale weights: " + ", ".join(f"x{s} {w:.3f}" for s, w in weights.items()))
        return weights

    def save(self) -> Path | None:
        if not self.dist.main:
            return None
        opt_tensors, groups = optimizer_to_tensors(self.opt)
        online = {f"online.{k}": v for k, v in self.model.state_dict().items()}
        return save_checkpoint(
            self.run_dir, self.cfg, self.step, self.ema.state_dict(), {**online, **opt_tensors},
            extra={"optim_param_groups": groups, "elapsed_s": round(self.elapsed, 1), "world_size": self.dist.world,
                   "parameters": count_parameters(self.model),
                   **({"init": self.init_info} if self.init_info else {}),
                   **({"blend_choice": self.blend_choice} if self.blend_choice else {})},
            keep=self.cfg.train.keep_ckpts)

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        """One step (`diffusion.train_step`), its draws keyed by (seed, step, rank), then the EMA."""
        tc = self.cfg.train
        losses = train_step(self.diffusion, self.ddp_model, self.opt, tc, (tc.seed, self.step, self.dist.rank),
                            self._draw_batch, lambda loss: f"loss became {loss} at step {self.step + 1}; "
                                                           f"lower --lr or check the data")
        self._update_ema()
        self.step += 1
        return losses

    def _draw_batch(self, rng: np.random.Generator) -> PairBatch:
        dc = self.cfg.data
        idx = rng.integers(0, len(self.train_set), size=self.cfg.train.batch_size)
        b = make_batch(self.train_hr, idx, list(dc.scales), dc.crop, rng, augment if dc.augment else None,
                       dc.backproject, dc.degradation)
        weight = (torch.tensor([self.scale_weights[s] for s in b.scales], device=self.device)
                  if self.scale_weights else None)
        return b.cond01, b.base01, b.gt01, weight

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up (as in many diffusion codebases) so that short runs get a useful EMA.
        decay = min(self.cfg.train.ema_decay, (1 + self.step) / (10 + self.step))
        for pe, p in zip(self.ema.parameters(), self.model.parameters()):
            pe.lerp_(p.detach(), 1 - decay)
        for be, b in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(b)

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from engines.torch_engine import TorchDenoiser

        tc = self.cfg.train
        n = min(tc.val_images, len(self.val_set))
        if n == 0:
            return {}
        picks = np.linspace(0, len(self.val_set) - 1, n).round().astype(int)
        denoiser = TorchDenoiser(self.ema, self.device)
        out: dict[str, float] = {}
        for scale in self.cfg.data.scales:
            b: Batch = make_batch(self.val_hr, picks, [scale], 0, np.random.default_rng(0),
                                  backproject=self.cfg.data.backproject)
            fused = self.diffusion.fuse(denoiser, b.cond01, SampleConfig(sampler="ddim", steps=tc.val_steps, seed=0))
            out[f"x{scale}/psnr"] = float(psnr(fused, b.gt01).mean())
            out[f"x{scale}/ssim"] = float(ssim(fused, b.gt01).mean())
            out[f"x{scale}/baseline_psnr"] = float(psnr(b.base01, b.gt01).mean())
            out[f"x{scale}/baseline_ssim"] = float(ssim(b.base01, b.gt01).mean())
        return out

    @torch.no_grad()
    def choose_blend(self) -> dict[str, Any] | None:
        """Score the blends (1 - A) * start + A * fine-tuned (BLEND_GRID) of a fine-tune on its
        held-out slices, as the member runs (its back-projection and DDIM step count), and pick, among
        the A whose mean SSIM is not below the start's, the one of the highest mean PSNR, the smaller
        A on a tie: A = 0 is the model the fine-tune started from, so the choice is never below it
        there on either. `bundle` stores the choice. None (and a line
        saying so) when there is no held-out slice."""
        from types import SimpleNamespace

        from engines.torch_engine import TorchDenoiser
        from tfsdeploy.bundle import blend_weights

        if not self.val_set:
            self.log("no held-out slices: the fine-tune keeps all of itself (bundle --blend A pulls it back)")
            return None
        n = min(HOLDOUT_SCORED, len(self.val_set))
        picks = np.linspace(0, len(self.val_set) - 1, n).round().astype(int)
        steps = int(self.init_info.get("ddim_steps") or self.cfg.train.val_steps)
        sample = SampleConfig(sampler="ddim", steps=steps, seed=0)
        batches = [make_batch(self.val_hr, picks, [s], 0, np.random.default_rng(0),
                              backproject=self.cfg.data.backproject) for s in self.cfg.data.scales]
        net = copy.deepcopy(self.ema)
        tuned = SimpleNamespace(weights={k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
                                meta={"init": self.init_info})
        scores: dict[str, dict[str, float]] = {}
        for alpha in BLEND_GRID:
            weights, _ = blend_weights(tuned, alpha, self.run_dir)
            load_weights(net, weights, self.run_dir)
            fused = [self.diffusion.fuse(TorchDenoiser(net, self.device), b.cond01, sample) for b in batches]
            scores[f"{alpha:g}"] = {"psnr": float(torch.cat([psnr(f, b.gt01) for f, b in zip(fused, batches)]).mean()),
                                    "ssim": float(torch.cat([ssim(f, b.gt01) for f, b in zip(fused, batches)]).mean())}
        start = scores["0"]
        fair = [a for a in BLEND_GRID if scores[f"{a:g}"]["ssim"] >= start["ssim"]]  # A = 0 always is
        best = max(fair, key=lambda a: (round(scores[f"{a:g}"]["psnr"], 6), -a))
        baseline = {"psnr": float(torch.cat([psnr(b.base01, b.gt01) for b in batches]).mean()),
                    "ssim": float(torch.cat([ssim(b.base01, b.gt01) for b in batches]).mean())}
        choice = {"alpha": best, "slices": int(n), "scales": list(self.cfg.data.scales), "ddim_steps": steps,
                  "baseline": baseline, "scores": scores}
        pick = scores[f"{best:g}"]
        self.log(f"held-out: {n} slice(s), x{'/x'.join(map(str, self.cfg.data.scales))}, PSNR / SSIM: baseline "
                 f"{baseline['psnr']:.2f} dB / {baseline['ssim']:.4f}, the starting model {start['psnr']:.2f} / "
                 f"{start['ssim']:.4f}, " + ", ".join(f"A {a} {v['psnr']:.2f}" for a, v in scores.items() if a != "0"))
        self.log(f"chose A = {best:g} ({pick['psnr']:.2f} dB, {pick['psnr'] - start['psnr']:+.2f} against the "
                 f"starting model): `bundle` stores (1 - A) * start + A * fine-tuned" if best else
                 "chose A = 0: no blend beat the starting model on the held-out slices, so `bundle` stores "
                 "the starting model")
        return choice

    def _record(self, entry: dict[str, Any]) -> None:
        if self.dist.main:
            path = self.run_dir / "log.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError as e:  # a full disk: name the file
                raise write_error(path, e) from None

    # ---------------------------------------------------------------- run
    def run(self, show_progress: bool = True, time_limit_s: float | None = None) -> Path | None:
        """Train up to `train.steps`. With `time_limit_s`, stop cleanly (and save) once this call has
        run that long; the same command resumes."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        tc = self.cfg.train
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log(f"training {count_parameters(self.model) / 1e6:.2f} M parameters, "
                     f"{len(self.train_set)} training triplets, {self.dist.world} process(es), "
                     f"prediction={self.cfg.diffusion.prediction} target={self.cfg.diffusion.target}, "
                     f"step {self.step} -> {tc.steps}")
        if self.step >= tc.steps:
            if self.dist.main:
                self.log(f"nothing to do: the run is already at step {self.step} (raise --steps to continue)")
            return resolve(self.run_dir) if has_checkpoint(self.run_dir) else None

        stop = {"flag": False}
        old_handler = None
        if self.dist.main or self.dist.world == 1:
            def _on_term(signum, frame):  # noqa: ARG001
                stop["flag"] = True
            try:
                old_handler = signal.signal(signal.SIGTERM, _on_term)
            except ValueError:  # not the main thread
                old_handler = None

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            disable=not (show_progress and self.dist.main))
        last = None
        timed_out = False
        t_start = t_window = time.perf_counter()
        n_window = 0
        try:
            with progress:
                task = progress.add_task("train", total=tc.steps, completed=self.step, info="")
                while self.step < tc.steps:
                    t0 = time.perf_counter()
                    losses = self.train_step()
                    self.elapsed += time.perf_counter() - t0
                    n_window += 1
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        rate = n_window * tc.batch_size * self.dist.world / (time.perf_counter() - t_window)
                        t_window, n_window = time.perf_counter(), 0
                        progress.update(task, completed=self.step,
                                        info=f"loss {losses['loss']:.4f}  {rate:.1f} img/s")
                        self._record({"step": self.step, **losses, "img_per_s": round(rate, 2)})
                    else:
                        progress.update(task, completed=self.step)
                    if self.dist.main and tc.val_every and self.step % tc.val_every == 0:
                        val = self.validate()
                        t_window = time.perf_counter()  # keep validation out of the throughput
                        if val:
                            self._record({"step": self.step, "val": val})
                            progress.console.print(f"step {self.step} val: " + "  ".join(
                                f"x{s} {val[f'x{s}/psnr']:.2f} dB / {val[f'x{s}/ssim']:.3f} "
                                f"(baseline {val[f'x{s}/baseline_psnr']:.2f})" for s in self.cfg.data.scales))
                    if tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                        last = self.save()
                    if stop["flag"]:
                        raise KeyboardInterrupt
                    if time_limit_s is not None and self._time_up(t_start, time_limit_s):
                        timed_out = True
                        break
        except KeyboardInterrupt:
            saved = self.save()
            self._barrier()
            where = f"; saved {saved}" if saved else ""
            raise UserError(f"interrupted at step {self.step}{where}; run the same command again to resume") from None
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if self.init_info and self.dist.main and not timed_out:
            try:
                self.blend_choice = self.choose_blend()
            except UserError as e:  # the start has gone or changed: keep the steps, say why there is no choice
                self.log(f"warning: no blend chosen: {e}")
        last = self.save()
        self._check_in_sync()
        if self.dist.main:
            self.log(f"saved {last} (step {self.step}, {self.elapsed / 60:.1f} min of training)")
            if timed_out:
                self.log(f"stopped at the time limit, step {self.step} of {tc.steps}; "
                         f"run the same command again to continue")
        return last

    def _time_up(self, t_start: float, limit_s: float) -> bool:
        """Whether the time limit has passed; under DDP every rank follows rank 0's clock."""
        up = time.perf_counter() - t_start > limit_s
        if self.dist.world == 1:
            return up
        flag = torch.tensor([float(up)], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def _barrier(self) -> None:
        if self.dist.world > 1 and dist.is_initialized():
            dist.barrier()

    def _check_in_sync(self) -> None:
        """All ranks must end with identical weights; anything else is a broken DDP setup."""
        if self.dist.world <= 1:
            return
        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
            gathered = [torch.zeros_like(total) for _ in range(self.dist.world)]
            dist.all_gather(gathered, total)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"ranks ended with different weights: {[float(g) for g in gathered]}")


def held_out(samples: list[Sample], where: str | Path) -> tuple[list[Sample], list[Sample]]:
    """A fine-tune's triplets, when its data has no validation split -> (training, held-out): the
    last HOLDOUT_SHARE of them by name (at least one) are held out, which keeps them apart from the
    training slices when the names run along a scan or by patient."""
    if len(samples) < 2:
        raise UserError(f"{where}: a fine-tune needs at least 2 triplets (one is held out to choose how "
                        f"much of the fine-tune to keep); found {len(samples)}")
    k = max(1, round(len(samples) * HOLDOUT_SHARE))
    return samples[:-k], samples[-k:]


def train(run_dir: str | Path, configs: Configs, data_root: str | Path | None = None, show_progress: bool = True,
          log: Callable[[str], None] = print, init_from: str | Path | None = None,
          time_limit_s: float | None = None, shipped: dict[str, Any] | None = None) -> Path | None:
    existed, fresh = Path(run_dir).exists(), not has_checkpoint(run_dir)
    trainer = Trainer(run_dir, configs, data_root, log, init_from=init_from, shipped=shipped)
    ok = False
    try:
        out = trainer.run(show_progress, time_limit_s)
        ok = True
        return out
    except BaseException:
        if fresh and trainer.dist.main and not has_checkpoint(run_dir):
            _remove_unsaved_run(Path(run_dir), remove_folder=not existed)
        raise
    finally:
        if trainer.dist.world > 1 and dist.is_initialized():
            if ok:
                dist.barrier()  # no rank tears the group down while another still talks to it
            dist.destroy_process_group()



def _remove_unsaved_run(run_dir: Path, remove_folder: bool) -> None:
    """A new run that failed before its first checkpoint (a full disk, an error) leaves nothing: its
    log describes steps that no checkpoint holds, and an empty run folder would look like a run."""
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    if remove_folder:
        with contextlib.suppress(OSError):
            run_dir.rmdir()
