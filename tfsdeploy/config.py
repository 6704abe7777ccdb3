"""Frozen configs, one per concept.

Every config is a frozen dataclass that round-trips through JSON, so a checkpoint can
store the exact configs it was trained with and rebuild everything from them
(nanoGPT style). Most fields a command lets you set have an option of the same name
(`ema_decay` is `train --ema-decay`), but not all: `train --timesteps` sets
`ScheduleConfig.num_steps`, the architecture comes from `--preset` (`--tmfa` is the one
field of it an option changes), and some fields (e.g. `TrainConfig.keep_ckpts`) have no option.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tfsdeploy.errors import UserError

T = TypeVar("T")

TMFA_MODES = ("paper", "all", "none")
PREDICTIONS = ("eps", "x0", "v")
OBJECTIVES = ("diffusion", "regression")
TARGETS = ("fused", "residual")
SCALES = (2, 4, 8)
# DDIM's default number of denoiser calls. The sampler study (benchmarks/reports/study-*) found
# DDIM-10 within 0.1 dB of the paper's 4000-step DDPM, and more steps no better.
DEFAULT_DDIM_STEPS = 10
# the strongest back-projection of the upsampled inputs that a run, a bundle or an option may ask for
BACKPROJECT_MAX = 8
# `fuse --register`: a rigid fit that turns (degrees) or shifts the brain's centre (mm) by more is
# refused as implausible for scans of one subject (--max-rotation / --max-shift raise the bounds).
MAX_ROTATION_DEG = 20.0
MAX_SHIFT_MM = 30.0
MAX_SHIFT_LIMIT_MM = 500.0  # the most --max-shift takes: a head's size, and then some
COMBOS = ("t1-t2-spect", "t1-t2-pet", "t1-pd-spect", "t1-pd-pet")
# Where `data build` takes slices from (tfsdeploy.data.build), and what the packaged model trained on.
DATA_SOURCES = ("spm", "synth")
DEFAULT_DATA_SOURCES = ("spm", "synth")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """TMFA + SR3 U-Net denoiser.

    `image_size` is the nominal training resolution. It only decides at which levels
    self-attention sits (`attn_res` are feature-map sizes at that resolution); the
    network itself runs on any size divisible by 2 ** (len(channel_mults) - 1).
    """

    cond_channels: int = 5  # T1 (1) + T2 (1) + functional RGB (3)
    out_channels: int = 3  # fused RGB
    inner_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    res_blocks: int = 2
    attn_res: tuple[int, ...] = (16,)
    dropout: float = 0.2
    norm_groups: int = 32
    image_size: int = 256
    tmfa: str = "paper"  # "paper": SE over the condition only; "all": SE over [cond, x_t]; "none"
    tmfa_reduction: int = 4
    noise_embed_scale: float = 1000.0  # sqrt(gamma) in [0, 1] is stretched before the sinusoids

    def __post_init__(self) -> None:
        _check(self.tmfa in TMFA_MODES, f"tmfa must be one of {TMFA_MODES}, got {self.tmfa!r}")
        _check(self.inner_channels > 0 and self.res_blocks > 0, "inner_channels and res_blocks must be positive")
        _check(len(self.channel_mults) >= 1, "channel_mults must not be empty")
        for m in self.channel_mults:
            _check((self.inner_channels * m) % self.norm_groups == 0,
                   f"every level width ({self.inner_channels}*{m}) must be divisible by norm_groups={self.norm_groups}")
        _check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mults) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear beta schedule (SR3 / the paper): beta from `beta_start` to `beta_end` over T steps."""

    num_steps: int = 4000
    beta_start: float = 1e-6
    beta_end: float = 1e-2

    def __post_init__(self) -> None:
        _check(self.num_steps >= 2, "num_steps must be at least 2")
        _check(0.0 < self.beta_start <= self.beta_end < 1.0, "need 0 < beta_start <= beta_end < 1")


@dataclass(frozen=True)
class DiffusionConfig:
    """What the network predicts, and over what.

    prediction: "eps" (the paper), "x0" or "v".
    target: "fused" (the paper: diffuse the fused image itself) or "residual" (diffuse the
    fused image minus the bicubic-then-classical-fusion baseline).
    """

    prediction: str = "eps"
    target: str = "fused"
    # With target "residual": the residual is multiplied by this before diffusion. The residual over
    # the baseline is small (a few percent of the range), so without scaling almost the whole noise
    # schedule drowns it; scaling it up gives the sampler's steps something to resolve.
    residual_scale: float = 1.0
    # "regression" trains the same network deterministically (no noise: x_t = 0 at noise level 0)
    # and samples it with one call. It is not a diffusion model; it measures what the network can
    # learn, the upper bound a diffusion sample's PSNR is compared with.
    objective: str = "diffusion"

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _check(self.objective == "diffusion" or self.prediction == "x0", "objective regression needs prediction x0")
        _check(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        _check(self.target in TARGETS, f"target must be one of {TARGETS}, got {self.target!r}")
        _check(self.residual_scale > 0, "residual_scale must be positive")
        _check(self.target == "residual" or self.residual_scale == 1.0, "residual_scale applies to target residual only")


DEGRADATIONS = ("bicubic", "varied")  # DataConfig.degradation


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from and how it is degraded and cut."""

    root: str = ""  # a dataset folder (ROOT/{train,val,test}/{t1,t2,func,gt}/NAME.png); "" = built-in SPM set
    scales: tuple[int, ...] = (2, 4, 8)
    crop: int = 64  # random square crop for training; 0 = whole image
    augment: bool = True
    # strength of the back-projection the training inputs get after the bicubic upsampling
    # (tfsdeploy.inputs.upsample), so that a model learns on the inputs it will be fed; 0 = none.
    # A fine-tune of a bundle member takes the member's strength.
    backproject: float = 0.0
    # how the low-resolution training inputs are made: "bicubic" (the paper's bicubic down), or
    # "varied" (half of them so, the other half blurred, shrunk by another kernel, noisy and 8-bit;
    # tfsdeploy.data.batches.degrade_varied)
    degradation: str = "bicubic"

    def __post_init__(self) -> None:
        _check(len(self.scales) > 0 and all(s in SCALES for s in self.scales), f"scales must be drawn from {SCALES}")
        _check(self.degradation in DEGRADATIONS,
               f"degradation must be one of {', '.join(DEGRADATIONS)}, got {self.degradation!r}")
        _check(self.crop >= 0, "crop must be >= 0")
        _check(isinstance(self.backproject, (int, float)) and not isinstance(self.backproject, bool)
               and 0 <= self.backproject <= BACKPROJECT_MAX,
               f"back-projection strength must be between 0 and {BACKPROJECT_MAX}, got {self.backproject}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = 2000
    batch_size: int = 8  # per process
    lr: float = 1e-4
    ema_decay: float = 0.999
    psf_mse: float = 1.0  # lambda1 of the PSF loss on x0_hat
    psf_ssim: float = 0.1  # lambda2: weight of (1 - SSIM) on x0_hat
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    val_images: int = 4
    val_steps: int = 10  # DDIM steps for validation samples
    ckpt_every: int = 250
    keep_ckpts: int = 3
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # Weight each sample's loss by 1 / (the training set's baseline MSE at its scale), so that x2, x4
    # and x8 count alike: without it the large x8 residuals dominate a mixed-scale run. This is the
    # gradient of the mean PSNR (in dB) over the scales, taken at the baseline.
    scale_balance: bool = False

    def __post_init__(self) -> None:
        _check(self.steps > 0 and self.batch_size > 0, "steps and batch_size must be positive")
        _check(self.lr > 0, "lr must be positive")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        _check(self.psf_mse >= 0 and self.psf_ssim >= 0, "PSF weights must be >= 0")


@dataclass(frozen=True)
class SampleConfig:
    """How `fuse` runs a model: the upsampling of its inputs, the sampler, its number of denoiser
    calls, their spacing and the seed."""

    sampler: str = "ddim"  # "ddim" (deterministic) or "ddpm" (the paper's ancestral sampler)
    steps: int = 0  # 0 = the sampler's default: DEFAULT_DDIM_STEPS for DDIM, all T for DDPM
    spacing: str = "linear"  # where the steps sit among the T levels: "linear", "quadratic" or "trailing"
    seed: int = 0
    # strength of the back-projection that sharpens the upsampled inputs (tfsdeploy.inputs.upsample);
    # None = the bundle's recommendation for the scale, else 0 (plain bicubic)
    backproject: float | None = None
    # a noise gate (lo, hi) on that strength: each slice gets all of it up to a noise ratio of lo, none
    # from hi on (tfsdeploy.inputs.noise_ratio); None = the bundle's with its strength, else no gate
    backproject_gate: tuple[float, float] | None = None
    # average the fused images of the 8 flips and quarter turns of the inputs (tfsdeploy.ensemble):
    # 8 network calls per step instead of 1
    ensemble: bool = False

    def __post_init__(self) -> None:
        _check(self.sampler in ("ddim", "ddpm"), f"sampler must be ddim or ddpm, got {self.sampler!r}")
        _check(self.steps >= 0, "steps must be >= 0")
        _check(self.spacing in ("linear", "quadratic", "trailing"),
               f"spacing must be linear, quadratic or trailing, got {self.spacing!r}")
        _check(self.backproject is None or 0 <= self.backproject <= BACKPROJECT_MAX,
               f"back-projection strength must be between 0 and {BACKPROJECT_MAX}, got {self.backproject}")
        _check(self.backproject_gate is None or valid_gate(self.backproject_gate),
               f"a back-projection noise gate must be two noise ratios 0 <= lo < hi, got {self.backproject_gate}")


def valid_gate(gate: Any) -> bool:
    """Whether `gate` is a back-projection noise gate: two numbers 0 <= lo < hi."""
    return (isinstance(gate, (list, tuple)) and len(gate) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in gate)
            and 0 <= gate[0] < gate[1])


DEVICES = ("auto", "cpu", "cuda")
# The engines, named once. `auto` picks among them. Each compiled engine runs one exported file
# (the TensorRT and AOTInductor names carry their cache keys, hence the globs), and a file's suffix
# says which engine runs it when it is handed over directly.
ENGINES = ("torch", "onnx", "onnx-fp16", "trt", "aoti")
ARTIFACT_FILES = {"onnx": "denoiser-fp32.onnx", "onnx-fp16": "denoiser-fp16.onnx", "trt": "denoiser-fp16-*.plan",
                  "aoti": "denoiser-aoti-*.pt2"}
ARTIFACT_SUFFIXES = {".onnx": "onnx", ".plan": "trt", ".engine": "trt", ".pt2": "aoti"}
# What `auto` tries, in order, before the torch engine. On CUDA: a TensorRT engine, then an
# AOTInductor package (both compiled, one graph per call). On a CPU: the fp32 ONNX, which ran ahead
# of eager torch and of an AOTInductor package in benchmarks/reports/cpu-engines.md.
AUTO_ORDER = {"cuda": ("trt", "aoti"), "cpu": ("onnx",)}
# The largest batch a scan runs at: a GPU keeps gaining throughput up to large batches and takes as
# many as its memory holds; a CPU measures batches up to this cap on the scan's first slices and
# keeps the fastest (tfsdeploy.batching). Compiled artifacts for a GPU accept the GPU's cap.
MAX_BATCH = {"cuda": 64, "cpu": 4}
# Denoiser calls (slices x steps) after which exporting the fp32 ONNX wins back its own time on a
# CPU, as `tfsdeploy bench` measured it (README, *Scans on a CPU*). `auto` runs an export that
# exists, since its cost is paid and it was faster per slice at every batch measured, and builds
# none on a CPU: a scan longer than this says that an export would pay.
ONNX_PAYS_AFTER_CALLS = 200
# The precisions, named once: the torch engine runs in any of them ("auto" picks one for the
# device); an exported ONNX graph is in fp32 or fp16 (export.onnx_export.ONNX_PRECISIONS).
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EngineConfig:
    """How the denoiser runs: which engine, on which device, in which precision, and whether its
    calls are compiled or replayed from CUDA graphs. "auto" (and None) pick the fast path for the
    device: on CUDA a compiled engine when one is valid, else the torch engine in fp16 with native
    GroupNorm; a whole DDIM fuse replayed from one CUDA graph; on a CPU, fp32."""

    engine: str = "auto"  # auto, torch, onnx, onnx-fp16, trt or aoti
    device: str = "auto"  # auto (CUDA when present), cpu or cuda
    precision: str = "auto"  # torch engine: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16
    cuda_graph: bool | None = None  # None: on for torch and AOTInductor on CUDA, off for TensorRT
    channels_last: bool | None = None  # None: off (NCHW measured faster for the eager engine on an H200)
    compile: bool = False  # torch.compile the model first (cached on disk, so paid once per machine)
    threads: int = 0  # CPU threads for torch and ONNX Runtime (0 = their default)
    export_dir: str | None = None  # where exported engines live (None: beside the checkpoint)
    # With CUDA graphs on: capture a whole DDIM fuse (every denoiser call and the update arithmetic
    # between them) into one graph, for engines that can be recorded (torch, AOTInductor). False
    # keeps one graph per denoiser call.
    whole_loop: bool = True
    # Long jobs on CUDA: build the AOTInductor package on first use when none is valid (into the
    # cache), so the next process only loads it. One-image fuses never build.
    build_missing: bool = False

    def __post_init__(self) -> None:
        _check(self.engine in ("auto", *ENGINES), f"engine must be auto or one of {', '.join(ENGINES)}, "
                                                   f"got {self.engine!r}")
        _check(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _check(self.precision in ("auto", *PRECISIONS),
               f"precision must be one of {', '.join(('auto', *PRECISIONS))}, got {self.precision!r}")
        _check(self.threads >= 0, "threads must be >= 0")


PRESETS: dict[str, ModelConfig] = {
    # The authors' 128->256 SR3 configuration: about 98 M parameters.
    "paper": ModelConfig(),
    # Trainable on a 2-core CPU.
    "small": ModelConfig(inner_channels=32, channel_mults=(1, 2, 4, 4), res_blocks=1, dropout=0.0),
    # For tests only: a few thousand parameters, runs in milliseconds.
    "tiny": ModelConfig(inner_channels=8, channel_mults=(1, 2, 2), res_blocks=1, attn_res=(),
                        dropout=0.0, norm_groups=4),
}


def artifact_engine(path: Any) -> str | None:
    """The engine family that runs an exported file ("onnx", "trt" or "aoti"), or None for a checkpoint."""
    name = str(path)
    return next((e for suffix, e in ARTIFACT_SUFFIXES.items() if name.endswith(suffix)), None)


def model_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from JSON data, refusing unknown or ill-typed fields."""
    if not isinstance(data, dict):
        raise UserError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls(), k) if k in names else None  # type: ignore[call-arg]
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{cls.__name__}: {e}") from None


def replace(cfg: T, **changes: Any) -> T:
    """dataclasses.replace that drops None values (unset CLI options)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


__all__ = [
    "ModelConfig", "ScheduleConfig", "DiffusionConfig", "DataConfig", "TrainConfig",
    "PRESETS", "model_preset", "to_dict", "from_dict", "replace", "field",
]
