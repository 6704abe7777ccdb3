"""One conformance suite for every engine behind the Denoiser protocol, and the device contract of the
sampler: its state lives on the engine's device, the condition moves there once, and each slice's
result depends on its own seed alone."""

import pytest
import torch

from conftest import AnalyticDenoiser
from engines.torch_engine import TorchDenoiser
from export.parity import relative_l2
from tfsdeploy.checkpoint import build_from_checkpoint, load_checkpoint
from tfsdeploy.config import SampleConfig
from tfsdeploy.diffusion import Denoiser, Diffusion
from tfsdeploy.errors import UserError
from tfsdeploy.pipeline import FusionPipeline

# engine -> (how to make it from the tiny checkpoint and its exports, tolerance against torch fp32)
TOLERANCE = {"torch": 1e-6, "torch-bf16": 3e-2, "onnx": 1e-4, "onnx-fp16": 1e-2, "trt": 1e-2}


def make_engine(name, ckpt, request):
    from engines.loader import find_artifact, load_artifact
    from engines.trt_engine import tensorrt_status

    if name == "torch":
        return TorchDenoiser(build_from_checkpoint(ckpt)[0])
    if name == "torch-bf16":  # reduced precision on the CPU: the same code path as fp16 on a GPU
        return TorchDenoiser(build_from_checkpoint(ckpt)[0], dtype=torch.bfloat16, channels_last=True)
    exported = request.getfixturevalue("exported")  # skips without the onnx extra
    if name in ("onnx", "onnx-fp16"):
        return load_artifact(exported["fp16" if name == "onnx-fp16" else "fp32"][0])[0]
    trt, reason = tensorrt_status()
    if trt is None:
        pytest.skip(f"trt: {reason}")
    from export.trt_build import build_engine, build_plan

    onnx_path = exported[build_plan(trt.__version__).onnx_precision][0]
    build_engine(onnx_path, onnx_path.parent, ckpt, parity_steps=2, log=lambda s: None)
    return load_artifact(find_artifact(ckpt, "trt"))[0]


def inputs(batch, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, 5, size, size, generator=g) * 2 - 1,
            torch.linspace(0.2, 0.9, batch))


@pytest.fixture(scope="module", params=list(TOLERANCE))
def engine(request, ckpt):
    return request.param, make_engine(request.param, ckpt, request)


def test_engine_declares_device_dtype_and_a_one_line_description(engine):
    name, e = engine
    assert isinstance(e, Denoiser)
    assert isinstance(e.device, torch.device) and isinstance(e.dtype, torch.dtype)
    text = e.describe()
    assert text and "\n" not in text
    expected = {"torch": torch.float32, "torch-bf16": torch.bfloat16, "onnx": torch.float32,
                "onnx-fp16": torch.float16, "trt": torch.float16}[name]
    assert e.dtype == expected


def test_engine_returns_fp32_on_its_device_and_matches_torch(engine, ckpt):
    name, e = engine
    x, c, lvl = inputs(2)
    out = e(x.to(e.device), c.to(e.device), lvl.to(e.device))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == e.device
    assert torch.isfinite(out).all()
    ref = TorchDenoiser(build_from_checkpoint(ckpt)[0])(x, c, lvl)
    assert relative_l2(out.cpu(), ref) <= TOLERANCE[name]


def test_a_slice_comes_out_the_same_alone_and_in_a_batch(engine, ckpt):
    """The same slice with the same seed, fused alone and as the middle of a batch of three."""
    name, e = engine
    configs = load_checkpoint(ckpt).configs
    for sampler in ("ddim", "ddpm"):
        pipe = FusionPipeline(e, configs, 4, SampleConfig(sampler=sampler, steps=3, seed=7))
        cond = torch.rand(3, 5, 64, 64, generator=torch.Generator().manual_seed(3))
        batch = pipe(cond).float().cpu()
        alone = pipe(cond[1:2]).float().cpu()
        tol = 1e-5 if TOLERANCE[name] < 1e-3 else 2e-2
        assert (batch[1:2] - alone).abs().max() <= tol, sampler
        # per-slice seeds: slice 1 with seed 9 differs from seed 7, slice 0 unchanged
        other = pipe(cond, seeds=[7, 9, 7]).float().cpu()
        assert (other[0] - batch[0]).abs().max() <= tol and (other[1] - batch[1]).abs().max() > 10 * tol


class OnDevice:
    """An engine on another device than its inputs (torch's meta device: shapes without data). It
    refuses inputs that are not on its device and records the condition tensor of every call."""

    capturable = False

    def __init__(self, device="meta"):
        self.device, self.dtype, self.conds = torch.device(device), torch.float32, []

    def describe(self):
        return f"a stand-in on {self.device.type}"

    def __call__(self, x_t, cond, noise_level):
        for t in (x_t, cond, noise_level):
            assert t.device == self.device, f"the engine on {self.device} got a tensor on {t.device}"
        self.conds.append(cond)
        return torch.empty_like(x_t)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_sampler_runs_on_the_engines_device_and_moves_the_condition_once(sampler, ckpt):
    engine = OnDevice()
    configs = load_checkpoint(ckpt).configs
    pipe = FusionPipeline(engine, configs, 4, SampleConfig(sampler=sampler, steps=4))
    cond01 = torch.rand(2, 5, 32, 32)  # made on the CPU, as read from files
    out = pipe(cond01)
    assert out.device.type == "meta" and out.shape == (2, 3, 32, 32)
    assert len(engine.conds) == 4 and all(c is engine.conds[0] for c in engine.conds)
    # the diffusion object on its own keeps the same contract
    x0 = Diffusion.from_configs(configs).sample(OnDevice(), cond01 * 2 - 1, (2, 3, 32, 32), steps=2)
    assert x0.device.type == "meta"


def test_the_regression_objective_also_runs_on_the_engines_device(ckpt):
    import dataclasses

    from tfsdeploy.config import DiffusionConfig

    configs = dataclasses.replace(load_checkpoint(ckpt).configs,
                                  diffusion=DiffusionConfig(prediction="x0", target="residual", objective="regression"))
    out = FusionPipeline(OnDevice(), configs, 4, SampleConfig())(torch.rand(1, 5, 32, 32))
    assert out.device.type == "meta"


def test_seeds_must_match_the_batch():
    d = Diffusion.from_configs(load_checkpoint_configs())
    with pytest.raises(UserError, match="2 seeds for a batch of 3"):
        d.sample(AnalyticDenoiser(lambda x, c, l: x), torch.zeros(3, 5, 8, 8), (3, 3, 8, 8), steps=2, seed=[1, 2])


def load_checkpoint_configs():
    from tfsdeploy.checkpoint import Configs
    from tfsdeploy.config import PRESETS

    return Configs(model=PRESETS["tiny"])


def test_a_cuda_request_without_a_gpu_is_one_clear_error(ckpt):
    from tfsdeploy.config import EngineConfig

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present here")
    with pytest.raises(UserError, match="no CUDA GPU"):
        FusionPipeline.load(ckpt, 4, engine=EngineConfig(device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_fast_path_matches_the_cpu(ckpt):
    """fp16, channels-last, CUDA graphs on the GPU against fp32 on the CPU, through the pipeline."""
    from tfsdeploy.config import EngineConfig

    cond = torch.rand(2, 5, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = FusionPipeline.load(ckpt, 4, SampleConfig(steps=4), EngineConfig(engine="torch", device="cpu"))
    gpu = FusionPipeline.load(ckpt, 4, SampleConfig(steps=4), EngineConfig(engine="torch"))
    assert "CUDA graph" in gpu.describe() and gpu.denoiser.dtype == torch.float16
    a, b = cpu(cond).cpu(), gpu(cond).cpu()
    b2 = gpu(cond).cpu()  # replayed from the captured graph
    assert torch.equal(b, b2)
    assert float(((a - b) ** 2).mean()) < 1e-4


def test_a_failed_graph_capture_falls_back_to_eager_and_says_so(ckpt):
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0])
    engine.cuda_graph = True  # as on CUDA; here the capture is made to fail the way a driver would

    class Failing:
        def capture(self, fn, device):
            raise RuntimeError("operation not permitted when stream is capturing")

    engine.backend = Failing()
    x, c, lvl = inputs(1)
    out = engine(x, c, lvl)
    assert torch.equal(out, TorchDenoiser(build_from_checkpoint(ckpt)[0])(x, c, lvl))
    assert not engine.cuda_graph and "capturing" in engine.graph_error and "CUDA graph" not in engine.describe()
