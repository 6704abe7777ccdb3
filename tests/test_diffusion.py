"""Sampler and schedule contract tests against analytic denoisers (diffusers style)."""

import numpy as np
import pytest
import torch

from tfsdeploy.config import DiffusionConfig, ScheduleConfig
from tfsdeploy.diffusion import Diffusion, NoiseSchedule
from tfsdeploy.errors import UserError

from conftest import AnalyticDenoiser


def test_linear_schedule_matches_closed_form():
    s = NoiseSchedule(ScheduleConfig())
    betas = np.linspace(1e-6, 1e-2, 4000)
    assert s.num_steps == 4000
    assert s.alphas_cumprod[0] == 1.0
    np.testing.assert_allclose(s.alphas_cumprod[1], 1 - 1e-6)
    np.testing.assert_allclose(s.alphas_cumprod[-1], np.prod(1 - betas), rtol=1e-10)
    assert np.all(np.diff(s.alphas_cumprod) < 0)


def test_training_noise_levels_lie_between_neighbouring_steps():
    s = NoiseSchedule(ScheduleConfig(num_steps=50))
    g = torch.Generator().manual_seed(0)
    lv = s.sample_noise_levels(20000, g).double().numpy()
    assert lv.min() >= s.sqrt_alphas_cumprod[-1] - 1e-7 and lv.max() <= 1.0
    # Every level must sit inside one [sqrt(a_t), sqrt(a_{t-1})] interval: it's continuous, not on the grid.
    # (Near 1 the float32 grid is coarser than the intervals, so look below 0.999.)
    low = lv[lv < 0.999]
    on_grid = np.isclose(low[:, None], s.sqrt_alphas_cumprod[None, :], atol=1e-9, rtol=0).any(axis=1)
    assert on_grid.mean() < 0.01
    # and each interval is hit about equally often (t is uniform)
    idx = np.searchsorted(-s.sqrt_alphas_cumprod, -lv)
    counts = np.bincount(idx, minlength=51)[1:]
    assert counts.min() > 0.6 * counts.mean()


def test_timesteps():
    s = NoiseSchedule(ScheduleConfig(num_steps=1000))
    ts = s.timesteps(10)
    assert ts[0] == 1000 and ts[-1] == 1 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert s.timesteps(1000) == list(range(1000, 0, -1))
    q = s.timesteps(10, "quadratic")
    assert q[0] == 1000 and q[-1] == 1 and (q[-2] - q[-1]) < (q[0] - q[1])
    with pytest.raises(UserError):
        s.timesteps(0)
    with pytest.raises(UserError):
        s.timesteps(5, "cubic")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_split_inverts_target_for(prediction):
    d = Diffusion(NoiseSchedule(), DiffusionConfig(prediction=prediction))
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    lvl = torch.tensor([0.1, 0.5, 0.9, 0.999])
    x_t = d.q_sample(x0, lvl, eps)
    p = d.split(d.target_for(x0, lvl, eps), x_t, lvl)
    torch.testing.assert_close(p.x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(p.eps, eps, atol=2e-3, rtol=1e-3)


class GaussianOracle(AnalyticDenoiser):
    """The exact MMSE denoiser for data x0 ~ N(mu, sigma^2), elementwise, in any parameterisation."""

    def __init__(self, diffusion, mu, sigma):
        super().__init__(None)
        self.d, self.mu, self.var = diffusion, mu, sigma**2

    def __call__(self, x_t, cond, lvl):
        a = lvl.view(-1, 1, 1, 1).double()
        x = x_t.double()
        x0 = self.mu + a * self.var / (a * a * self.var + 1 - a * a) * (x - a * self.mu)
        eps = (x - a * x0) / (1 - a * a).clamp(min=1e-20).sqrt()
        return self.d.target_for(x0, lvl.double(), eps).float()


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 100), ("ddim", 50)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_samplers_reproduce_the_data_distribution(sampler, steps, prediction):
    d = Diffusion(NoiseSchedule(ScheduleConfig(num_steps=1000)), DiffusionConfig(prediction=prediction))
    mu, sigma = 0.3, 0.5
    oracle = GaussianOracle(d, mu, sigma)
    cond = torch.zeros(1)
    x = d.sample(oracle, cond, (1, 3, 64, 64), sampler=sampler, steps=steps, seed=1)
    assert abs(float(x.mean()) - mu) < 0.03
    assert abs(float(x.std()) - sigma) < 0.03


def test_ddim_converges_as_steps_grow():
    # Few DDIM steps shrink the spread of the samples; the error must fall as steps are added.
    d = Diffusion(NoiseSchedule(ScheduleConfig(num_steps=1000)), DiffusionConfig(prediction="eps"))
    oracle = GaussianOracle(d, 0.3, 0.5)
    errs = [abs(float(d.sample(oracle, torch.zeros(1), (1, 3, 64, 64), steps=n, seed=1).std()) - 0.5)
            for n in (5, 10, 25, 100)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.02


def test_sampling_is_seeded():
    d = Diffusion(NoiseSchedule(ScheduleConfig(num_steps=100)), DiffusionConfig(prediction="x0"))
    oracle = GaussianOracle(d, 0.0, 1.0)
    a = d.sample(oracle, torch.zeros(1), (1, 3, 8, 8), sampler="ddpm", seed=3)
    b = d.sample(oracle, torch.zeros(1), (1, 3, 8, 8), sampler="ddpm", seed=3)
    c = d.sample(oracle, torch.zeros(1), (1, 3, 8, 8), sampler="ddpm", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_bounds_the_estimate():
    d = Diffusion(NoiseSchedule(ScheduleConfig(num_steps=100)), DiffusionConfig(prediction="x0"))
    big = AnalyticDenoiser(lambda x, c, l: torch.full_like(x, 5.0))
    lo, hi = -torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4) * 0.5
    x = d.sample(big, torch.zeros(1), (1, 3, 4, 4), steps=5, clip=(lo, hi))
    torch.testing.assert_close(x, hi)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_is_zero_for_a_perfect_model(prediction):
    d = Diffusion(NoiseSchedule(ScheduleConfig(num_steps=100)), DiffusionConfig(prediction=prediction))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    state = {}

    def perfect(x_t, cond, lvl):
        # Recover eps from x_t and the known x0, then answer in the model's parameterisation.
        a = lvl.view(-1, 1, 1, 1)
        eps = (x_t - a * x0) / (1 - a * a).sqrt()
        state["called"] = True
        return d.target_for(x0, lvl, eps)

    losses = d.training_losses(perfect, x0, torch.zeros(2, 5, 16, 16), torch.Generator().manual_seed(0),
                               psf_mse=1.0, psf_ssim=1.0)
    assert state["called"]
    assert float(losses["main"]) < 1e-8
    assert float(losses["psf_mse"]) < 1e-6 and float(losses["psf_ssim"]) < 1e-4


def test_psf_loss_reacts_to_errors():
    d = Diffusion(NoiseSchedule(ScheduleConfig(num_steps=100)), DiffusionConfig(prediction="x0"))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    wrong = lambda x_t, c, l: torch.zeros_like(x_t)  # noqa: E731
    with_psf = d.training_losses(wrong, x0, None, torch.Generator().manual_seed(0), psf_mse=1.0, psf_ssim=1.0)
    without = d.training_losses(wrong, x0, None, torch.Generator().manual_seed(0))
    assert float(with_psf["loss"]) > float(without["loss"]) > 0
    assert "psf_mse" not in without


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_residual_target_encodes_decodes_and_bounds(scale):
    d = Diffusion(NoiseSchedule(), DiffusionConfig(prediction="x0", target="residual", residual_scale=scale))
    gt, base = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    x0 = d.encode(gt, base)
    torch.testing.assert_close(x0, 2 * scale * (gt - base))
    torch.testing.assert_close(d.decode(x0, base), gt)
    lo, hi = d.clip_range(base)
    torch.testing.assert_close(d.decode(lo, base), torch.zeros_like(gt))
    torch.testing.assert_close(d.decode(hi, base), torch.ones_like(gt))


def test_fused_target_is_the_image_and_takes_no_residual_scale():
    gt, base = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    fused = Diffusion(NoiseSchedule(), DiffusionConfig(target="fused"))
    torch.testing.assert_close(fused.encode(gt, base), gt * 2 - 1)
    with pytest.raises(UserError):
        DiffusionConfig(target="fused", residual_scale=2.0)


# ------------------------------------------------------------------ the initial noise of a deterministic fuse


def _diffusion():
    return Diffusion(NoiseSchedule(ScheduleConfig(num_steps=50)))


def test_fuse_noise_draws_each_seed_once_and_keeps_it_on_the_device(monkeypatch):
    from tfsdeploy.config import SampleConfig

    d = _diffusion()
    drawn = []
    real = Diffusion.initial_noise

    def counting(gens, shape):
        drawn.append(len(gens))
        return real(gens, shape)

    monkeypatch.setattr(Diffusion, "initial_noise", staticmethod(counting))
    cond = torch.rand(4, 5, 16, 16)
    a = d.fuse_noise(cond, SampleConfig(seed=3), [7, 7, 8, 7], device="meta")
    assert a.shape == (4, 3, 16, 16) and a.device.type == "meta"
    b = d.fuse_noise(cond, SampleConfig(seed=3), None)  # all slices from the sampler's seed
    c = d.fuse_noise(cond, SampleConfig(seed=3), [8, 7, 7, 8])
    d.fuse_noise(cond, SampleConfig(seed=3), [8, 7, 7, 8])  # seen before: nothing drawn
    assert sum(drawn) == 5  # (7, 8) on meta, 3 on the CPU, (8, 7) on the CPU: once each
    assert torch.equal(b[0], b[3]) and torch.equal(c[0], c[3]) and torch.equal(c[1], c[2])


def test_fuse_noise_is_each_seeds_own_draw_so_a_slice_is_the_same_alone_or_in_a_batch():
    from tfsdeploy.config import SampleConfig

    d = _diffusion()
    cond = torch.rand(3, 5, 16, 16)
    batch = d.fuse_noise(cond, SampleConfig(), [5, 6, 9])
    alone = _diffusion().fuse_noise(cond[1:2], SampleConfig(), [6])
    assert torch.equal(batch[1:2], alone)
    assert torch.equal(alone[0], Diffusion.initial_noise([torch.Generator().manual_seed(6)], (1, 3, 16, 16))[0])
    with pytest.raises(UserError, match="2 seeds for a batch of 3"):
        d.fuse_noise(cond, SampleConfig(), [1, 2])


def test_the_noise_kept_on_the_device_is_bounded(monkeypatch):
    import tfsdeploy.diffusion as diffusion
    from tfsdeploy.config import SampleConfig

    monkeypatch.setattr(diffusion, "NOISE_CACHE_BYTES", 3 * 3 * 16 * 16 * 4)  # three slices' worth
    d = _diffusion()
    for seed in range(10):
        d.fuse_noise(torch.rand(1, 5, 16, 16), SampleConfig(), [seed])
    assert len(d._noise) == 3 and [k[0] for k in d._noise] == [7, 8, 9]
