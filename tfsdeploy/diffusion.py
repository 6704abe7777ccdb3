"""The noise schedule and the diffusion object that owns both the training loss and the samplers.

Notation (SR3 / WaveGrad): gamma = alpha_bar, and the network is conditioned on the continuous
noise level sqrt(gamma). A clean sample x0 is noised as

    x_t = sqrt(gamma) * x0 + sqrt(1 - gamma) * eps.

Training draws sqrt(gamma) uniformly between sqrt(alpha_bar_{t-1}) and sqrt(alpha_bar_t), so the
network sees a continuum of levels and any sub-sequence of the T levels is a valid sampler.

The network's output is eps, x0 or v (v = sqrt(gamma) * eps - sqrt(1 - gamma) * x0), as the
DiffusionConfig says; this module is the only place that converts between them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from tfsdeploy.config import DEFAULT_DDIM_STEPS, DiffusionConfig, SampleConfig, ScheduleConfig, TrainConfig
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.metrics import ssim


@runtime_checkable
class Denoiser(Protocol):
    """What every engine is: `denoiser(x_t, cond, noise_level) -> prediction`.

    x_t [B,3,H,W], cond [B,5,H,W] and noise_level [B] (sqrt(gamma)) are float32 tensors on
    `device`; the prediction [B,3,H,W] comes back float32 on `device`. `dtype` is the precision the
    engine computes in, and `describe()` says in one line what runs (engine, precision, device).
    `capturable` says whether a CUDA graph may record its calls as part of a whole fuse
    (tfsdeploy.loopgraph). The samplers keep their state on `device` and never ask which engine
    they drive.
    """

    device: torch.device
    dtype: torch.dtype
    capturable: bool

    def describe(self) -> str: ...

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor: ...

SAMPLERS = ("ddpm", "ddim")
# Initial noise kept on the device per (seed, shape), at most this much (a batch of 64 slices at
# 512 x 512 with distinct seeds is 192 MiB; a scan, one seed for every slice, needs one draw).
NOISE_CACHE_BYTES = 256 * 2**20
SPACINGS = ("linear", "quadratic", "trailing")


class NoiseSchedule:
    """Linear betas; alphas_cumprod[t] for t = 0..T with alphas_cumprod[0] = 1 (clean)."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        self.cfg = cfg
        betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_steps, dtype=np.float64)
        self.betas = np.concatenate([[0.0], betas])
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)  # index t = 0..T
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)

    @property
    def num_steps(self) -> int:
        return self.cfg.num_steps

    def sample_noise_levels(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """sqrt(gamma) [B] for training: t ~ U{1..T}, then uniform in [sqrt(a_bar_t), sqrt(a_bar_{t-1})]."""
        t = torch.randint(1, self.num_steps + 1, (batch,), generator=generator)
        hi = torch.from_numpy(self.sqrt_alphas_cumprod[t.numpy() - 1])
        lo = torch.from_numpy(self.sqrt_alphas_cumprod[t.numpy()])
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        return (lo + u * (hi - lo)).float()

    def timesteps(self, num: int, spacing: str = "linear") -> list[int]:
        """`num` decreasing timesteps in T..1 for a sampler; num = T gives every step."""
        T = self.num_steps
        if not 1 <= num <= T:
            raise UserError(f"steps must be between 1 and {T}, got {num}")
        if spacing == "linear":
            ts = np.linspace(T, 1, num)
        elif spacing == "quadratic":  # denser near the clean end (DDIM paper)
            ts = 1 + (T - 1) * np.linspace(1, 0, num) ** 2
        elif spacing == "trailing":  # evenly spaced, ending at T/num rather than at 1 (Lin et al. 2024):
            # the last denoiser call sees a noisy input, where an x0-predicting network is accurate,
            # instead of an almost clean one that it must copy through exactly
            ts = np.linspace(T, T / num, num)
        else:
            raise UserError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        out = sorted({int(round(t)) for t in ts}, reverse=True)
        return out


@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor


class Diffusion:
    """One object for the training loss and both samplers; the model is just a callable."""

    def __init__(self, schedule: NoiseSchedule, cfg: DiffusionConfig = DiffusionConfig()):
        self.schedule = schedule
        self.cfg = cfg
        self._noise: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # fuse_noise's draws, kept on the device

    @classmethod
    def from_configs(cls, configs: Any) -> "Diffusion":
        """The diffusion object a checkpoint's configs (anything with .schedule and .diffusion) describe."""
        return cls(NoiseSchedule(configs.schedule), configs.diffusion)

    # ------------------------------------------------------------------ conversions
    def q_sample(self, x0: torch.Tensor, noise_level: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = noise_level.view(-1, 1, 1, 1)
        return a * x0 + (1 - a * a).clamp(min=0).sqrt() * eps

    def target_for(self, x0: torch.Tensor, noise_level: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network should output for this (x0, level, eps)."""
        a = noise_level.view(-1, 1, 1, 1)
        s = (1 - a * a).clamp(min=0).sqrt()
        if self.cfg.prediction == "eps":
            return eps
        if self.cfg.prediction == "x0":
            return x0
        return a * eps - s * x0

    def split(self, out: torch.Tensor, x_t: torch.Tensor, noise_level: torch.Tensor,
              clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> Prediction:
        """Network output -> (x0_hat, eps_hat). With `clip`, x0_hat is clamped to [lo, hi] and
        eps_hat recomputed from it, so the sampler stays consistent with the clamped estimate."""
        out = out.float()
        a = noise_level.float().view(-1, 1, 1, 1)
        s = (1 - a * a).clamp(min=1e-12).sqrt()
        if self.cfg.prediction == "eps":
            x0 = (x_t - s * out) / a.clamp(min=1e-12)
        elif self.cfg.prediction == "x0":
            x0 = out
        else:
            x0 = a * x_t - s * out
        if clip is not None:
            x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
        return Prediction(x0=x0, eps=(x_t - a * x0) / s)

    # ------------------------------------------------------------------ what is diffused
    # Images are in [0, 1] outside and in [-1, 1] ("network units") inside. With target
    # "residual" the diffused x0 is the fused image minus the upsample-then-fuse baseline.
    def encode(self, gt01: torch.Tensor, base01: torch.Tensor) -> torch.Tensor:
        """Ground truth [B,3,H,W] in [0, 1] -> the diffused x0 in network units."""
        return ((gt01 * 2 - 1) - self.offset(base01)) * self._scale

    def offset(self, base01: torch.Tensor) -> torch.Tensor:
        """What is added to x0 / residual_scale to give the fused image in network units."""
        if self.cfg.target == "residual":
            return base01 * 2 - 1
        return torch.zeros_like(base01)

    def decode(self, x0: torch.Tensor, base01: torch.Tensor) -> torch.Tensor:
        """Diffused x0 -> fused image [B,3,H,W] in [0, 1]."""
        return ((x0 / self._scale + self.offset(base01) + 1) / 2).clamp(0, 1)

    def clip_range(self, base01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on x0 that keep the fused image inside [-1, 1]."""
        off = self.offset(base01)
        return (-1 - off) * self._scale, (1 - off) * self._scale

    @property
    def _scale(self) -> float:
        return self.cfg.residual_scale if self.cfg.target == "residual" else 1.0

    # ------------------------------------------------------------------ training
    def training_losses(self, model: Denoiser, x0: torch.Tensor, cond: torch.Tensor,
                        generator: torch.Generator | None = None, psf_mse: float = 0.0,
                        psf_ssim: float = 0.0, x0_offset: torch.Tensor | None = None,
                        sample_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss for one batch.

        x0 [B,3,H,W] is the diffused quantity (fused image, or residual over the baseline) in
        network units. The main term is the MSE between the network output and its target (eps,
        x0 or v). The PSF term, lambda1 * MSE + lambda2 * (1 - SSIM), compares the predicted clean
        fused image (x0_hat + x0_offset) with the ground truth (x0 + x0_offset). It is weighted per
        sample by min(1, SNR): at SNR >= 1 that is the paper's loss exactly, and at high noise it
        keeps the term bounded, where an eps-derived x0_hat would otherwise blow up as 1/sqrt(gamma).
        `sample_weight` [B] scales each sample's whole loss (per-scale balancing).
        """
        b = x0.shape[0]
        regression = self.cfg.objective == "regression"
        if regression:  # no noise: the network sees x_t = 0 at level 0 and must output x0 itself
            level = torch.zeros(b, device=x0.device)
            eps = torch.zeros_like(x0)
        else:
            level = self.schedule.sample_noise_levels(b, generator).to(x0.device)
            eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = self.q_sample(x0, level, eps)
        out = model(x_t, cond, level)
        main = ((out.float() - self.target_for(x0, level, eps)) ** 2).mean(dim=(1, 2, 3))
        losses = {"main": main.mean()}
        total = main
        if psf_mse > 0 or psf_ssim > 0:
            x0_hat = self.split(out, x_t, level).x0
            snr = level.float() ** 2 / (1 - level.float() ** 2).clamp(min=1e-12)
            w = torch.ones_like(snr) if regression else snr.clamp(max=1.0)
            offset = 0 if x0_offset is None else x0_offset
            pred_img, true_img = x0_hat / self._scale + offset, x0 / self._scale + offset
            psf_m = ((pred_img - true_img) ** 2).mean(dim=(1, 2, 3))
            psf_s = 1 - ssim((pred_img.clamp(-1, 1) + 1) / 2, (true_img + 1) / 2)
            total = total + w * (psf_mse * psf_m + psf_ssim * psf_s)
            losses["psf_mse"] = psf_m.mean()
            losses["psf_ssim"] = psf_s.mean()
        if sample_weight is not None:
            total = total * sample_weight.to(total)
        losses["loss"] = total.mean()
        return losses

    def pair_losses(self, model: Denoiser, cond01: torch.Tensor, base01: torch.Tensor, gt01: torch.Tensor,
                    generator: torch.Generator | None = None, psf_mse: float = 0.0, psf_ssim: float = 0.0,
                    sample_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`training_losses` for a batch of pairs in [0, 1] (condition, its baseline, the ground
        truth), moved into network units the way `fuse` moves its inputs."""
        return self.training_losses(model, self.encode(gt01, base01), cond01 * 2 - 1, generator, psf_mse, psf_ssim,
                                    x0_offset=self.offset(base01), sample_weight=sample_weight)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model: Denoiser, cond: torch.Tensor, shape: tuple[int, ...], *, sampler: str = "ddim",
               steps: int | None = None, spacing: str = "linear", seed: int | Sequence[int] = 0,
               clip: tuple[torch.Tensor, torch.Tensor] | None = None,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Draw x0 [B,3,H,W] given cond [B,5,H,W]; the result lives on `model.device`.

        sampler "ddpm": ancestral sampling over `steps` levels (default: all T, the paper's sampler);
        a sub-sequence uses the respaced posterior. sampler "ddim": deterministic DDIM (eta = 0)
        over `steps` levels (default DEFAULT_DDIM_STEPS).

        `seed` is one seed for every slice or one per slice. Each slice draws its noise from its own
        generator, on the CPU, so a slice's result depends on its seed alone: not on its batch-mates,
        its place in the batch, or the device.
        """
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if steps is None:
            steps = self.schedule.num_steps if sampler == "ddpm" else DEFAULT_DDIM_STEPS
        device = model.device
        b = shape[0]
        cond = cond.to(device)  # once, not at every step
        if clip is not None:
            clip = (clip[0].to(device), clip[1].to(device))
        if self.cfg.objective == "regression":  # one deterministic call; sampler settings do not apply
            out = self.denoise(model, torch.zeros(shape, device=device), cond, [], clip=clip)
            if progress is not None:
                progress(1, 1)
            return out
        gens = self.generators(seed, b)

        def noise() -> torch.Tensor:
            return self.initial_noise(gens, shape).to(device)

        return self.denoise(model, noise(), cond, self.schedule.timesteps(steps, spacing), sampler, clip, noise,
                            progress)

    def generators(self, seed: int | Sequence[int], batch: int) -> list[torch.Generator]:
        """One CPU generator per slice: `seed` for every slice, or one seed each."""
        return [torch.Generator().manual_seed(s) for s in self.seeds(seed, batch)]

    @staticmethod
    def seeds(seed: int | Sequence[int], batch: int) -> list[int]:
        """Each slice's seed: `seed` for every slice, or one seed each."""
        seeds = [int(seed)] * batch if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise UserError(f"{len(seeds)} seeds for a batch of {batch}")
        return seeds

    @staticmethod
    def initial_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """A [B,...] draw of standard noise on the CPU, slice i from generator i."""
        return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])

    def denoise(self, model: Denoiser, x: torch.Tensor, cond: torch.Tensor, ts: Sequence[int], sampler: str = "ddim",
                clip: tuple[torch.Tensor, torch.Tensor] | None = None,
                noise: Callable[[], torch.Tensor] | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The sampler's loop from x = x_T over the timesteps `ts` (all on `model.device`) -> x0.
        No host synchronisation: with DDIM (or the regression objective, `ts` empty) it is a fixed
        sequence of kernels that a CUDA graph can record whole (tfsdeploy.loopgraph). DDPM draws
        fresh noise from `noise()` at every step but the last."""
        device = model.device
        b = x.shape[0]
        if self.cfg.objective == "regression":  # the network sees x_t = 0 at level 0, as in training
            zero, x = torch.zeros(b, device=device), torch.zeros_like(x)
            return self.split(model(x, cond, zero), x, zero, clip).x0
        abar = self.schedule.alphas_cumprod
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else 0
            a_t, a_prev = float(abar[t]), float(abar[t_prev])
            level = torch.full((b,), a_t**0.5, device=device, dtype=torch.float32)
            pred = self.split(model(x, cond, level), x, level, clip)
            if sampler == "ddim":
                x = a_prev**0.5 * pred.x0 + (1 - a_prev) ** 0.5 * pred.eps
            else:
                beta = 1 - a_t / a_prev
                mean = (a_prev**0.5 * beta / (1 - a_t)) * pred.x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
                if t_prev > 0:
                    assert noise is not None, "DDPM needs a noise source"
                    var = beta * (1 - a_prev) / (1 - a_t)
                    x = mean + var**0.5 * noise()
                else:
                    x = mean
            if progress is not None:
                progress(i + 1, len(ts))
        return x

    def fuse(self, model: Denoiser, cond01: torch.Tensor, sample: SampleConfig = SampleConfig(),
             seeds: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Condition [B,5,H,W] in [0, 1] -> fused RGB [B,3,H,W] in [0, 1], on `model.device`.

        The condition moves to the model's device once; the baseline, the clip range and the
        sampler state are made there. `seeds` (one per slice) replaces `sample.seed`."""
        cond01 = cond01.to(model.device)
        if self.deterministic(sample):  # the path a whole-fuse CUDA graph records, run eagerly
            x_T = self.fuse_noise(cond01, sample, seeds, model.device)
            return self.fuse_from_noise(model, cond01, x_T, sample, progress)
        base01 = fuse_condition(cond01)
        x0 = self.sample(model, cond01 * 2 - 1, (cond01.shape[0], 3, *cond01.shape[-2:]),
                         sampler=sample.sampler, steps=sample.steps or None, spacing=sample.spacing,
                         seed=sample.seed if seeds is None else seeds, clip=self.clip_range(base01),
                         progress=progress)
        return self.decode(x0, base01)

    def fuse_noise(self, cond01: torch.Tensor, sample: SampleConfig, seeds: Sequence[int] | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The initial noise x_T [B,3,H,W] of a deterministic fuse of `cond01`, on `device` (default:
        the condition's): slice i is the standard noise of seeds[i] (or `sample.seed`), drawn once
        per seed, shape and device from that seed's own CPU generator (the same draw as
        `initial_noise`) and kept on the device (the NOISE_CACHE_BYTES most recent). Slices with the
        same seed share it, a slice comes out the same alone or in a batch, and a fuse whose seeds
        were seen before draws nothing and copies nothing from the host."""
        b, _, h, w = cond01.shape
        device = torch.device(device) if device is not None else cond01.device
        seeds = self.seeds(sample.seed if seeds is None else seeds, b)
        slices = {s: self._seed_noise(s, (3, h, w), device) for s in dict.fromkeys(seeds)}
        if len(slices) == 1:
            return slices[seeds[0]].expand(b, 3, h, w)
        return torch.stack([slices[s] for s in seeds])

    def _seed_noise(self, seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        cache = self._noise
        key = (seed, shape, device)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        noise = self.initial_noise([torch.Generator().manual_seed(seed)], (1, *shape))[0].to(device)
        cache[key] = noise
        while len(cache) > 1 and sum(t.numel() * t.element_size() for t in cache.values()) > NOISE_CACHE_BYTES:
            cache.popitem(last=False)
        return noise

    def deterministic(self, sample: SampleConfig) -> bool:
        """Whether a fuse is a fixed function of the condition and the initial noise (DDIM, or the
        regression objective): then the whole of it can be recorded as one CUDA graph."""
        return self.cfg.objective == "regression" or sample.sampler == "ddim"

    @torch.no_grad()
    def fuse_from_noise(self, model: Denoiser, cond01: torch.Tensor, x_T: torch.Tensor,
                        sample: SampleConfig = SampleConfig(),
                        progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """A deterministic fuse from its initial noise x_T [B,3,H,W]: baseline, DDIM loop (or the one
        regression call), decode. Every tensor is on `model.device` and nothing syncs with the host."""
        if not self.deterministic(sample):
            raise UserError("a fuse from given noise needs DDIM (DDPM draws new noise at every step)")
        base01 = fuse_condition(cond01)
        ts = [] if self.cfg.objective == "regression" else \
            self.schedule.timesteps(sample.steps or DEFAULT_DDIM_STEPS, sample.spacing)
        x0 = self.denoise(model, x_T, cond01 * 2 - 1, ts, "ddim", self.clip_range(base01), progress=progress)
        if progress is not None and not ts:
            progress(1, 1)
        return self.decode(x0, base01)


# ------------------------------------------------------------------ one training step

# A batch of pairs in [0, 1] to train on: cond01 [B,5,H,W], base01 [B,3,H,W] (its upsample-then-fuse
# baseline), gt01 [B,3,H,W], and a per-sample loss weight [B] or None.
PairBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def train_step(diffusion: Diffusion, model: torch.nn.Module, opt: torch.optim.Optimizer, train: TrainConfig,
               key: Sequence[int], draw: Callable[[np.random.Generator], PairBatch],
               diverged: Callable[[float], str]) -> dict[str, float]:
    """One optimiser step on `Diffusion.pair_losses`: the step that training and test-time
    adaptation share.

    Every draw is a pure function of `key` (e.g. seed, step, rank), so a run repeats, and resumes,
    exactly: a generator seeded by `key` draws the seed of torch's global generator (dropout), then
    the seed of the noise levels and noise, then the batch, through `draw(rng)`. The loss takes
    `train`'s PSF weights and its gradients are clipped to `train.grad_clip` (0: not clipped).
    A loss that is not finite raises UserError(diverged(loss)), after the update. Returns each loss
    term (before the update) as a float."""
    rng = np.random.default_rng(list(key))
    torch.manual_seed(int(rng.integers(2**62)))  # dropout
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    cond01, base01, gt01, weight = draw(rng)
    model.train()
    losses = diffusion.pair_losses(model, cond01, base01, gt01, gen, train.psf_mse, train.psf_ssim,
                                   sample_weight=weight)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    opt.step()
    out = {k: float(v.detach()) for k, v in losses.items()}
    if not math.isfinite(out["loss"]):
        raise UserError(diverged(out["loss"]))
    return out
