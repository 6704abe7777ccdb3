"""Test-time adaptation (`fuse --adapt N`): fine-tune a copy of the model on the input alone.

Internal learning, as in zero-shot super-resolution (Shocher et al. 2018): with no training set,
the low-resolution input is its own. Its sources (T1, T2 and the functional RGB image at
size/scale pixels, exactly as `make_condition` cuts them) are degraded once more by bicubic down
and up (`inputs.degrade_as_seen`, as training degrades), then back-projected at the strength the
member's own inputs get (`inputs.upsample`), and a copy of the model learns to map that back
to the classical fusion of the sources it has, as training maps degraded high-resolution sources
to their classical fusion. The extra degradation is x2 at every scale unless told otherwise:
degrading a 64 px (x4) or 32 px (x8) input again by the full scale leaves 16 or 4 px and teaches
corrections far larger than the real input needs, which the study measured as harmful.
The pairs are the eight flips and 90-degree rotations of each input (the fusion rule commutes with
them), optionally cut into random crops; the loss is the training loss (`Diffusion.training_losses`
with the checkpoint's PSF weights and gradient clip), under Adam at a constant rate. The original
input is then fused by the adapted copy.

    res = adapt(pipe, trip, size, AdaptConfig(steps=RECOMMENDED_STEPS))
    img = res.pipeline.fuse_triplet(trip, size)

What it buys (benchmarks/reports/adapt/adapt.md; defaults, 10 steps, one slice at a time): at x4
+0.29 to +0.38 dB PSNR over the unadapted model on unseen anatomy, on a blurrier degradation and
on the training distribution alike, about 10 s on a 2-core CPU. More steps drift: at 25 and 50
steps it lost 0.6 to 2.1 dB (mean) on the training distribution, which it already fused well. At x8
it gains nothing (-0.12 to +0.05 dB at 10 steps); x2 was not measured. So it stays off unless
asked for.

Only the torch engine can be adapted (an exported ONNX or TensorRT engine has no gradients). The
copy trains in fp32 on the pipeline's device and then runs as the original did (precision,
channels-last, CUDA graphs, compile). A run is a pure function of its inputs and `seed`: on a CPU
the same seed gives bit-identical weights.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from tfsdeploy.checkpoint import build_from_checkpoint
from tfsdeploy.config import artifact_engine
from tfsdeploy.diffusion import PairBatch, train_step
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.inputs import Triplet, degrade_as_seen, low_resolution
from tfsdeploy.pipeline import FusionPipeline, Progress

# The smallest low-resolution side (and crop) that adaptation trains on: the PSF loss's SSIM
# window is 11 px, and below this there is hardly an image left to learn from.
MIN_SIDE = 16
# The step count benchmarks/adapt_study.py recommends: at x4 it gained 0.3 to 0.4 dB on three kinds of
# input (unseen anatomy, a blurrier degradation, and the training distribution itself), while 25 or
# more steps lost 0.6 to 1.6 dB on the last. At x8 no setting helped reliably.
RECOMMENDED_STEPS = 10


@dataclass(frozen=True)
class AdaptConfig:
    """How a copy of the model is fine-tuned on internal pairs (see the module docstring)."""

    steps: int = 0  # optimiser steps; 0 = no adaptation
    lr: float = 1e-5  # Adam, constant
    batch_size: int = 4  # pairs per step, drawn from the 8 flips / rotations of each input
    extra_scale: int = 2  # the extra degradation of the LR sources (x2 measured best; the scale itself hurt)
    crop: int = 0  # random square crops of the LR pairs; 0 = the whole LR image
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise UserError(f"--adapt takes a number of steps >= 0, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"the adaptation learning rate must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"the adaptation batch size must be at least 1, got {self.batch_size}")
        if self.extra_scale < 2:
            raise UserError(f"the extra degradation must be at least 2, got {self.extra_scale}")
        if self.crop < 0:
            raise UserError(f"the adaptation crop must be >= 0, got {self.crop}")


@dataclass
class AdaptResult:
    """The adapted pipeline and what it cost. `seconds` covers copying the model, making the pairs
    and every step (not `on_snapshot`); `step_seconds` the optimiser steps alone."""

    pipeline: FusionPipeline
    steps: int
    seconds: float
    step_seconds: float
    losses: list[float] = field(default_factory=list)  # the total training loss at each step
    pairs: int = 0  # distinct internal pairs (inputs x 8 flips / rotations)
    lr_side: int = 0  # the LR side the pairs are made at
    extra_scale: int = 0

    @property
    def seconds_per_step(self) -> float:
        return self.step_seconds / self.steps if self.steps else 0.0


@dataclass
class Pairs:
    """Internal training pairs in [0, 1] on one device: cond01 [P,5,h,w] (the LR sources degraded
    again), base01 [P,3,h,w] (its upsample-then-fuse baseline), gt01 [P,3,h,w] (the classical
    fusion of the LR sources)."""

    cond01: torch.Tensor
    base01: torch.Tensor
    gt01: torch.Tensor

    def __len__(self) -> int:
        return self.cond01.shape[0]

    def draw(self, rng: np.random.Generator, batch_size: int, crop: int = 0) -> PairBatch:
        """`batch_size` pairs picked by `rng` (repeating one only when there are fewer pairs), each
        cut to a `crop`-pixel square at a corner `rng` picks (0: whole), with no sample weights."""
        idx = torch.from_numpy(rng.choice(len(self), size=batch_size, replace=batch_size > len(self)))
        cond01, base01, gt01 = (t[idx.to(t.device)] for t in (self.cond01, self.base01, self.gt01))
        if crop:
            corners = rng.integers(0, cond01.shape[-1] - crop + 1, size=(batch_size, 2))
            cond01, base01, gt01 = (torch.stack([t[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(corners)])
                                    for t in (cond01, base01, gt01))
        return cond01, base01, gt01, None


def lr_sources(trip: Triplet, scale: int, size: int) -> torch.Tensor:
    """The low-resolution sources [1,5,size/scale,size/scale] that `make_condition` upsamples."""
    return low_resolution(trip, scale, size)[0]


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) of the eight flips and 90-degree rotations of [..., H, W]."""
    x = x.flip(-1) if k >= 4 else x
    return torch.rot90(x, k % 4, dims=(-2, -1))


def internal_pairs(lr01: torch.Tensor, extra_scale: int, backproject: float = 0.0) -> Pairs:
    """LR sources [N,5,h,w] -> the 8N pairs (each flip / rotation of each input), degraded by
    `extra_scale` and fused as training degrades and fuses; with `backproject`, the degraded
    sources are back-projected at that strength, as the member's inputs are (`inputs.upsample`)."""
    src = torch.cat([dihedral(lr01, k) for k in range(8)])
    cond01 = degrade_as_seen(src, extra_scale, backproject)
    return Pairs(cond01, fuse_condition(cond01), fuse_condition(src))


def check_adaptable(pipe: FusionPipeline, size: int, cfg: AdaptConfig) -> tuple[int, int]:
    """Refuse what cannot be adapted; returns (the LR side, the extra degradation)."""
    from engines.torch_engine import TorchDenoiser

    if not isinstance(pipe.denoiser, TorchDenoiser):
        raise UserError(f"--adapt fine-tunes the model, which needs the torch engine; this runs "
                        f"{pipe.denoiser.describe()} (use --engine torch with a checkpoint or bundle)")
    size = pipe.check_size(size)
    side, extra, mult = size // pipe.scale, cfg.extra_scale, pipe.size_multiple
    where = f"the low-resolution input is {side}x{side} px (size {size} / x{pipe.scale})"
    if side < MIN_SIDE or side % mult:
        raise UserError(f"{where}; --adapt needs at least {MIN_SIDE} px and a multiple of {mult}: "
                        f"use a larger --size")
    if side % extra or side // extra < 2:
        raise UserError(f"{where}; it cannot be degraded again by {extra} (it must divide the side, "
                        f"leaving at least 2 px)")
    crop = cfg.crop or side
    if crop > side or crop < MIN_SIDE or crop % mult:
        raise UserError(f"adaptation crop {cfg.crop}: it must be between {MIN_SIDE} and {side} px and a "
                        f"multiple of {mult}")
    return side, extra


def trainable_copy(pipe: FusionPipeline) -> torch.nn.Module:
    """An fp32 copy of the pipeline's network on its device: rebuilt from the checkpoint when the
    pipeline knows it (exact weights even when the engine runs fp16), else copied from the engine."""
    device = pipe.device
    if pipe.source is not None and pipe.source.exists() and artifact_engine(pipe.source) is None:
        model, _ = build_from_checkpoint(pipe.source, device)
    else:
        model = copy.deepcopy(pipe.denoiser.model)
    return model.to(device, torch.float32).to(memory_format=torch.contiguous_format)


def with_model(pipe: FusionPipeline, model: torch.nn.Module) -> FusionPipeline:
    """A pipeline like `pipe` (sampler, scale, configs) whose torch engine runs `model`, with the
    original engine's device, precision, channels-last, CUDA-graph and compile settings."""
    from engines.torch_engine import TorchDenoiser

    old = pipe.denoiser
    assert isinstance(old, TorchDenoiser)
    den = TorchDenoiser(model, old.device, old.dtype, compile=old.compiled, channels_last=old.channels_last,
                        cuda_graph=old.cuda_graph)
    return FusionPipeline(den, pipe.configs, pipe.scale, pipe.sample, pipe.source or "")


def adapt(pipe: FusionPipeline, trips: Triplet | Sequence[Triplet], size: int = 0, cfg: AdaptConfig = AdaptConfig(),
          progress: Progress | None = None, snapshots: Collection[int] = (),
          on_snapshot: Callable[[int, FusionPipeline], None] | None = None) -> AdaptResult:
    """Fine-tune a copy of `pipe`'s model for `cfg.steps` steps on internal pairs from `trips` (one
    input, or several that share a model, e.g. the slices of a scan) at output `size` (0 = the
    model's size), and return a new pipeline that runs it; `pipe` itself is left as it was.
    `cfg.steps == 0` returns `pipe`. After each step in `snapshots`, `on_snapshot(step, pipeline)`
    gets a pipeline on a copy of the weights so far (studies use it; it is not timed)."""
    trips = [trips] if isinstance(trips, Triplet) else list(trips)
    if not trips:
        raise UserError("--adapt needs at least one input")
    side, extra = check_adaptable(pipe, size, cfg)
    size = pipe.check_size(size)
    if cfg.steps == 0:
        return AdaptResult(pipe, 0, 0.0, 0.0, lr_side=side, extra_scale=extra)
    t_start = time.perf_counter()
    device, diffusion, tc = pipe.device, pipe.diffusion, pipe.configs.train
    model = trainable_copy(pipe)
    with torch.no_grad():
        pairs = internal_pairs(torch.cat([lr_sources(t, pipe.scale, size) for t in trips]).to(device), extra,
                               pipe.backproject)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    crop = cfg.crop if cfg.crop and cfg.crop < side else 0
    losses: list[float] = []
    step_seconds = snapshot_seconds = 0.0
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):  # dropout draws from the global generator; keep the caller's
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            losses.append(train_step(
                diffusion, model, opt, tc, (cfg.seed, step), lambda rng: pairs.draw(rng, cfg.batch_size, crop),
                lambda loss, n=step + 1: f"adaptation diverged (loss {loss} at step {n}); lower its learning rate",
            )["loss"])
            step_seconds += time.perf_counter() - t0
            if progress is not None:
                progress(step + 1, cfg.steps)
            if on_snapshot is not None and step + 1 in snapshots:
                t1 = time.perf_counter()
                on_snapshot(step + 1, with_model(pipe, copy.deepcopy(model).eval()))
                snapshot_seconds += time.perf_counter() - t1
    model.eval()
    adapted = with_model(pipe, model)
    seconds = time.perf_counter() - t_start - snapshot_seconds
    return AdaptResult(adapted, cfg.steps, seconds, step_seconds, losses, len(pairs), side, extra)


# A scan adapts one copy of the model, on at most this many of its slices.
SCAN_SLICES = 16


def scan_triplets(scan, limit: int = SCAN_SLICES) -> list[Triplet]:
    """The slices a scan (tfsdeploy.scans) adapts on: up to `limit`, spread evenly from its first
    slice to its last, as triplets."""
    from tfsdeploy.inputs import as_triplet

    k = min(len(scan), limit)
    picks = sorted({round(i * (len(scan) - 1) / max(k - 1, 1)) for i in range(k)})
    return [as_triplet(s.t1, s.t2, s.func) for s in map(scan.slice, picks)]


__all__ = ["AdaptConfig", "AdaptResult", "Pairs", "adapt", "check_adaptable", "dihedral", "internal_pairs",
           "lr_sources", "scan_triplets", "trainable_copy", "with_model", "MIN_SIDE", "RECOMMENDED_STEPS",
           "SCAN_SLICES"]
