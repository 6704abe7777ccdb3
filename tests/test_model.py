import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_output
from tfsdeploy.config import PRESETS, ModelConfig, from_dict, to_dict
from tfsdeploy.errors import UserError
from tfsdeploy.model import TMFA, GroupNorm32, NoiseLevelEncoding, SelfAttention, build_model, count_parameters


def test_paper_preset_has_about_98m_parameters():
    n = count_parameters(build_model(PRESETS["paper"]))
    assert 97.0e6 <= n <= 99.0e6, n


def expected_parameters(cfg: ModelConfig) -> int:
    """The U-Net's parameter count from its config, by the architecture's arithmetic (DESIGN.md 1):
    convs and linears with biases, GroupNorms with a scale and a shift per channel."""
    conv = lambda k, i, o: k * k * i * o + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    ch, emb = cfg.inner_channels, cfg.inner_channels

    def res(i, o):
        return lin(emb, o) + norm(i) + conv(3, i, o) + norm(o) + conv(3, o, o) + (conv(1, i, o) if i != o else 0)

    def attn(c):
        return norm(c) + 3 * c * c + conv(1, c, c)  # qkv has no bias

    cond = cfg.cond_channels
    n = {"paper": lin(cond, cond // 4) + lin(cond // 4, cond), "none": 0,
         "all": lin(cond + 3, (cond + 3) // 4) + lin((cond + 3) // 4, cond + 3)}[cfg.tmfa]
    n += lin(ch, 4 * ch) + lin(4 * ch, emb) + conv(3, cond + 3, ch)
    skips, now, r = [ch], ch, cfg.image_size
    for level, mult in enumerate(cfg.channel_mults):
        for _ in range(cfg.res_blocks):
            n += res(now, ch * mult) + (attn(ch * mult) if r in cfg.attn_res else 0)
            now = ch * mult
            skips.append(now)
        if level < len(cfg.channel_mults) - 1:
            n += conv(3, now, now)
            skips.append(now)
            r //= 2
    n += 2 * res(now, now) + attn(now)
    for level, mult in reversed(list(enumerate(cfg.channel_mults))):
        for _ in range(cfg.res_blocks + 1):
            n += res(now + skips.pop(), ch * mult) + (attn(ch * mult) if r in cfg.attn_res else 0)
            now = ch * mult
        if level:
            n += conv(3, now, now)
            r *= 2
    return n + norm(now) + conv(3, now, cfg.out_channels)


@pytest.mark.parametrize("preset", ["paper", "small", "tiny"])
def test_parameter_counts_follow_the_preset_arithmetic(preset):
    assert count_parameters(build_model(PRESETS[preset])) == expected_parameters(PRESETS[preset])


def test_small_preset_has_4_0m_parameters():
    assert round(count_parameters(build_model(PRESETS["small"])) / 1e6, 1) == 4.0


@pytest.mark.parametrize("tmfa", ["paper", "all", "none"])
def test_forward_shapes_for_every_tmfa_placement(tmfa):
    cfg = dataclasses.replace(PRESETS["tiny"], tmfa=tmfa)
    m = build_model(cfg).eval()
    x, c, lvl = torch.randn(2, 3, 32, 48), torch.randn(2, 5, 32, 48), torch.rand(2)
    y = randomize_output(m)(x, c, lvl)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() > 0


def test_tmfa_placements_differ_in_what_they_attend_to():
    paper = build_model(dataclasses.replace(PRESETS["tiny"], tmfa="paper"))
    allc = build_model(dataclasses.replace(PRESETS["tiny"], tmfa="all"))
    none = build_model(dataclasses.replace(PRESETS["tiny"], tmfa="none"))
    assert paper.tmfa.fc1.in_features == 5  # condition only
    assert allc.tmfa.fc1.in_features == 8  # condition + noisy image (the authors' code)
    assert allc.tmfa.fc1.out_features == 2  # reduction 4
    assert none.tmfa is None


def test_tmfa_is_squeeze_excitation():
    # Weights chosen so the answer is known: the hidden unit is ReLU(mean of channel 0), and every
    # channel's gate is sigmoid(hidden * k) with k = 0, 1, 2, 3, 4 for the five channels.
    se = TMFA(5, 4)
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0]]))
        se.fc1.bias.zero_()
        se.fc2.weight.copy_(torch.arange(5.0)[:, None])
        se.fc2.bias.zero_()
    x = torch.ones(2, 5, 4, 4)
    x[0, 0] = torch.tensor([1.0, 3.0]).repeat(8).view(4, 4)  # mean 2, not constant: the pool is a mean
    x[1, 0] = -1.0  # negative mean: ReLU gives 0, every gate is sigmoid(0) = 1/2
    y = se(x)
    gates0 = 1 / (1 + torch.exp(-2.0 * torch.arange(5.0)))
    torch.testing.assert_close(y[0], x[0] * gates0[:, None, None])
    torch.testing.assert_close(y[1], x[1] * 0.5)


def test_output_starts_at_zero():
    m = build_model(PRESETS["tiny"]).eval()
    assert torch.equal(m(torch.randn(1, 3, 16, 16), torch.randn(1, 5, 16, 16), torch.rand(1)),
                       torch.zeros(1, 3, 16, 16))


def test_noise_level_changes_the_output():
    m = randomize_output(build_model(PRESETS["tiny"])).eval()
    x, c = torch.randn(1, 3, 16, 16), torch.randn(1, 5, 16, 16)
    a = m(x, c, torch.tensor([0.2]))
    b = m(x, c, torch.tensor([0.9]))
    assert (a - b).abs().max() > 1e-4


def test_size_must_be_divisible():
    from engines.torch_engine import TorchDenoiser
    from tfsdeploy.checkpoint import Configs
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.pipeline import FusionPipeline

    cfg = PRESETS["tiny"]
    pipe = FusionPipeline(TorchDenoiser(build_model(cfg)), Configs(model=cfg), 2, SampleConfig(steps=2))
    with pytest.raises(UserError, match=f"30x30 is not a multiple of {cfg.size_multiple}"):
        pipe(torch.rand(1, 5, 30, 30))
    assert pipe(torch.rand(1, 5, 32, 32)).shape == (1, 3, 32, 32)


def test_groupnorm_computes_in_fp32_for_half_inputs():
    gn = GroupNorm32(2, 8).to(torch.bfloat16)
    x = (torch.randn(2, 8, 4, 4) * 30 + 100).to(torch.bfloat16)
    y = gn(x)
    assert y.dtype == torch.bfloat16
    ref = F.group_norm(x.float(), 2, gn.weight.float(), gn.bias.float()).to(torch.bfloat16)
    assert torch.equal(y, ref)


def test_attention_softmax_is_fp32_and_noise_encoding_is_fp32():
    att = SelfAttention(8, 2)
    x = torch.randn(1, 8, 4, 4)
    ref = att(x)
    y = att.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.1
    enc = NoiseLevelEncoding(16, 1000.0)
    assert enc(torch.tensor([0.5], dtype=torch.bfloat16)).dtype == torch.float32


def test_whole_model_runs_in_bfloat16():
    m = randomize_output(build_model(PRESETS["tiny"])).eval()
    x, c, lvl = torch.randn(1, 3, 16, 16), torch.randn(1, 5, 16, 16), torch.rand(1)
    ref = m(x, c, lvl)
    y = m.to(torch.bfloat16)(x.bfloat16(), c.bfloat16(), lvl)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_config_round_trip_and_validation():
    cfg = PRESETS["paper"]
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(UserError, match="unknown field"):
        from_dict(ModelConfig, {**to_dict(cfg), "bogus": 1})
    with pytest.raises(UserError, match="tmfa"):
        dataclasses.replace(cfg, tmfa="sideways")
    with pytest.raises(UserError, match="norm_groups"):
        dataclasses.replace(cfg, inner_channels=20)


@pytest.mark.slow
def test_paper_preset_trains_one_step_and_denoises_at_256():
    from tfsdeploy.checkpoint import Configs
    from tfsdeploy.diffusion import Diffusion

    torch.manual_seed(0)
    m = build_model(PRESETS["paper"])
    diff = Diffusion.from_configs(Configs(model=PRESETS["paper"]))
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x0, cond = torch.rand(1, 3, 256, 256) * 2 - 1, torch.rand(1, 5, 256, 256) * 2 - 1
    before = m.final.conv.weight.detach().clone()
    losses = diff.training_losses(m, x0, cond, torch.Generator().manual_seed(0), psf_mse=1.0, psf_ssim=0.1)
    losses["loss"].backward()
    opt.step()
    assert torch.isfinite(losses["loss"])
    assert not torch.equal(before, m.final.conv.weight)  # the zero-initialised output layer learns first
    m.eval()
    with torch.no_grad():
        eps = m(torch.randn(1, 3, 256, 256), cond, torch.tensor([0.5]))
    assert eps.shape == (1, 3, 256, 256) and torch.isfinite(eps).all()


def test_fp16_attention_with_activations_of_300_stays_finite_and_close_to_fp32():
    """At c = 512, q and k of about 300 make q.k overflow fp16 (65504): the logits must not."""
    import math

    torch.manual_seed(0)
    c = 512
    attn = SelfAttention(c, 32)
    with torch.no_grad():
        attn.qkv.weight.normal_(0, 1 / math.sqrt(c))
        attn.qkv.weight[:2 * c] *= 375  # q and k: mean |.| about 300 on normalised inputs
    x = torch.randn(2, c, 8, 8)
    half = SelfAttention(c, 32)
    half.load_state_dict(attn.state_dict())
    with torch.no_grad():
        q = attn.qkv(attn.norm(x))[:, :2 * c]
        reference = attn(x)
        out = half.half()(x.half()).float()
    assert 250 < float(q.abs().mean()) < 350
    assert torch.isfinite(out).all()
    assert float((out - reference).norm() / reference.norm()) < 1e-2
