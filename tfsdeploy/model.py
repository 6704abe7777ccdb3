"""The TFS-Diff denoiser: a TMFA block in front of an SR3 U-Net with continuous noise-level conditioning.

Call contract:
    model(x_t [B,3,H,W], cond [B,5,H,W], noise_level [B]) -> prediction [B,3,H,W]
where noise_level is sqrt(gamma) = sqrt(alpha_bar) in [0, 1] and the prediction is eps, x0 or v
as the checkpoint's DiffusionConfig says (eps for the paper's setting). Training calls the network
directly; for sampling an engine (engines/torch_engine.py) wraps it in the Denoiser protocol of
tfsdeploy/diffusion.py, which adds the device, the dtype and describe().

Precision: GroupNorm, the attention's logits and softmax and the noise-level sinusoids run in fp32 by default.
Each casts its input up and its output back, so the casts survive autocast, `.half()` and export.
The CUDA eager engine turns the GroupNorm casts off (`set_norm_upcast(model, False)`): CUDA's
group_norm already accumulates its statistics in fp32, and the casts around ~100 norms cost more
than the norms themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tfsdeploy.config import ModelConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (unless `upcast` is turned off, when it
    runs in the input's dtype)."""

    upcast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.upcast or x.dtype == torch.float32:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class NoiseLevelEncoding(nn.Module):
    """Sinusoidal features of the continuous noise level sqrt(gamma), computed in fp32 (WaveGrad / SR3)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.dim = dim
        self.scale = scale

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, device=noise_level.device, dtype=torch.float32) / half)
        args = self.scale * noise_level.float()[:, None] * freqs[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TMFA(nn.Module):
    """Tri-modal feature attention: squeeze-and-excitation over channels.

    pool -> FC -> ReLU -> FC -> sigmoid -> rescale each channel.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w[:, :, None, None]


class Block(nn.Module):
    """GroupNorm -> SiLU -> (dropout) -> conv3x3."""

    def __init__(self, dim: int, dim_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm = GroupNorm32(groups, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(dim, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(F.silu(self.norm(x))))


class ResBlock(nn.Module):
    """BigGAN-style residual block with an additive noise-level embedding."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.emb = nn.Linear(emb_dim, dim_out)
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups, dropout)
        self.skip = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.emb(emb)[:, :, None, None]
        return self.block2(h) + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection; the logits and the softmax in
    fp32. In fp16, q.k over c = 512 channels overflows (65504) once q and k reach a few tens, and
    the softmax then gives NaN: q is scaled by 1/sqrt(c) before the product, and the product that
    needs the range is a small fp32 island (exported graphs keep it: Cast, Mul, MatMul, Softmax)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        scores = torch.einsum("bci,bcj->bij", q.float() * (1 / math.sqrt(c)), k.float())
        attn = torch.softmax(scores, dim=-1).to(v.dtype)
        y = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.out(y)


class ResAttnBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, groups: int, dropout: float, with_attn: bool):
        super().__init__()
        self.res = ResBlock(dim, dim_out, emb_dim, groups, dropout)
        self.attn = SelfAttention(dim_out, groups) if with_attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# The last layer's parameters: a plain convolution with nothing after it, so scaling them scales the output.
FINAL_CONV = ("final.conv.weight", "final.conv.bias")


class TFSDiffUNet(nn.Module):
    """TMFA + SR3 U-Net. See the module docstring for the call contract."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch, g, emb_dim = cfg.inner_channels, cfg.norm_groups, cfg.inner_channels
        in_ch = cfg.cond_channels + cfg.out_channels

        self.tmfa = None
        if cfg.tmfa == "paper":
            self.tmfa = TMFA(cfg.cond_channels, cfg.tmfa_reduction)
        elif cfg.tmfa == "all":
            self.tmfa = TMFA(in_ch, cfg.tmfa_reduction)

        self.noise_enc = NoiseLevelEncoding(ch, cfg.noise_embed_scale)
        self.noise_mlp = nn.Sequential(nn.Linear(ch, ch * 4), nn.SiLU(), nn.Linear(ch * 4, emb_dim))

        self.init_conv = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        now_ch, res = ch, cfg.image_size
        n_levels = len(cfg.channel_mults)
        for level, mult in enumerate(cfg.channel_mults):
            out_ch = ch * mult
            for _ in range(cfg.res_blocks):
                self.down.append(ResAttnBlock(now_ch, out_ch, emb_dim, g, cfg.dropout, res in cfg.attn_res))
                now_ch = out_ch
                skip_channels.append(now_ch)
            if level != n_levels - 1:
                self.down.append(nn.Conv2d(now_ch, now_ch, 3, stride=2, padding=1))
                skip_channels.append(now_ch)
                res //= 2

        self.mid = nn.ModuleList([
            ResAttnBlock(now_ch, now_ch, emb_dim, g, cfg.dropout, True),
            ResAttnBlock(now_ch, now_ch, emb_dim, g, cfg.dropout, False),
        ])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            out_ch = ch * mult
            for _ in range(cfg.res_blocks + 1):
                self.up.append(ResAttnBlock(now_ch + skip_channels.pop(), out_ch, emb_dim, g, cfg.dropout,
                                            res in cfg.attn_res))
                now_ch = out_ch
            if level != 0:
                self.up.append(Upsample(now_ch))
                res *= 2

        self.final = Block(now_ch, cfg.out_channels, g)
        # Zero-init the output conv (as guided-diffusion does): training starts from a prediction
        # of 0, which for a residual target is exactly the upsample-then-fuse baseline.
        nn.init.zeros_(self.final.conv.weight)
        nn.init.zeros_(self.final.conv.bias)

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """x_t [B,3,H,W], cond [B,5,H,W], noise_level [B] (sqrt(gamma)) -> prediction [B,3,H,W]."""
        if self.cfg.tmfa == "paper":
            h = torch.cat([self.tmfa(cond), x_t], dim=1)
        elif self.cfg.tmfa == "all":
            h = self.tmfa(torch.cat([cond, x_t], dim=1))
        else:
            h = torch.cat([cond, x_t], dim=1)
        # The sinusoids are computed in fp32 and cast once to the weights' dtype.
        emb = self.noise_mlp(self.noise_enc(noise_level).to(self.init_conv.weight.dtype))

        h = self.init_conv(h)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResAttnBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResAttnBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.final(h)


class Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def set_norm_upcast(model: nn.Module, upcast: bool) -> nn.Module:
    """Keep (True, the default and what exports use) or drop the fp32 casts around every GroupNorm."""
    for m in model.modules():
        if isinstance(m, GroupNorm32):
            m.upcast = upcast
    return model


def build_model(cfg: ModelConfig) -> TFSDiffUNet:
    return TFSDiffUNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def activation_bytes(cfg: ModelConfig, size: int, dtype_bytes: int = 4) -> int:
    """An upper estimate of the memory one slice of `size` x `size` needs in one no-grad forward
    pass: every skip tensor the U-Net keeps for its decoder, plus room for the largest block's
    temporaries, plus the attention scores (fp32, (h*w)^2 per attention layer's resolution)."""
    ch, n_levels = cfg.inner_channels, len(cfg.channel_mults)
    skips, largest, attn, res, feat = ch * size * size, ch * size * size, 0, cfg.image_size, size
    for level, mult in enumerate(cfg.channel_mults):
        c = ch * mult
        skips += cfg.res_blocks * c * feat * feat
        largest = max(largest, 2 * c * feat * feat)  # a decoder block's input: itself plus its skip
        if res in cfg.attn_res:
            attn = max(attn, 2 * 4 * (feat * feat) ** 2)
        if level != n_levels - 1:
            skips += c * feat * feat
            res, feat = res // 2, feat // 2
    attn = max(attn, 2 * 4 * (feat * feat) ** 2)  # the middle block always attends
    return skips * dtype_bytes + 6 * largest * dtype_bytes + attn
