"""The whole-fuse CUDA graph's logic, on the CPU: a stand-in backend records a fuse once and replays
it by running the recorded function again, which reads only the graph's static buffers. The images
must be exactly those of the per-call sampler, for new inputs as well as the first ones; a failed
capture falls back and says so. Also the eager fast path's native-dtype GroupNorm."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import RecordingGraphs
from engines.torch_engine import TorchDenoiser
from tfsdeploy.checkpoint import build_from_checkpoint, load_checkpoint
from tfsdeploy.config import DiffusionConfig, SampleConfig
from tfsdeploy.pipeline import FusionPipeline


def recordable(ckpt):
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0])
    engine.capturable = True  # as on CUDA
    return engine


def pipes(ckpt, sample, configs=None, **kw):
    configs = configs or load_checkpoint(ckpt).configs
    graphs = RecordingGraphs(**kw)
    notices = []
    looped = FusionPipeline(recordable(ckpt), configs, 4, sample, graphs=graphs, notice=notices.append)
    plain = FusionPipeline(TorchDenoiser(build_from_checkpoint(ckpt)[0]), configs, 4, sample)
    return looped, plain, graphs, notices


def test_one_replay_gives_the_per_call_samplers_images_for_every_new_input(ckpt):
    looped, plain, graphs, _ = pipes(ckpt, SampleConfig(steps=4, seed=3))
    assert plain.loop is None and looped.loop is not None and "one CUDA graph per fuse" in looped.describe()
    for seed in range(3):  # new conditions after the capture: the static buffers must take them
        cond = torch.rand(2, 5, 32, 32, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(looped(cond, seeds=[seed, seed + 10]), plain(cond, seeds=[seed, seed + 10]))
    assert graphs.captures == 1 and graphs.replays == 3


def test_a_slice_comes_out_the_same_alone_or_in_a_batch(ckpt):
    looped, _, graphs, _ = pipes(ckpt, SampleConfig(steps=3))
    cond = torch.rand(3, 5, 64, 64, generator=torch.Generator().manual_seed(3))
    batch = looped(cond, seeds=[7, 8, 9])
    alone = looped(cond[1:2], seeds=[8])
    assert (batch[1:2] - alone).abs().max() <= 1e-5  # the conformance suite's fp32 tolerance
    assert graphs.captures == 2  # one graph per batch shape


def test_each_shape_and_step_count_gets_its_own_graph(ckpt):
    looped, _, graphs, _ = pipes(ckpt, SampleConfig(steps=2))
    for size in (32, 32, 64):
        looped(torch.rand(1, 5, size, size))
    looped.sample = SampleConfig(steps=3)
    looped(torch.rand(1, 5, 32, 32))
    assert graphs.captures == 3


def test_ddpm_keeps_the_per_call_path(ckpt):
    looped, plain, graphs, _ = pipes(ckpt, SampleConfig(sampler="ddpm", steps=4, seed=1))
    cond = torch.rand(1, 5, 32, 32)
    assert torch.equal(looped(cond), plain(cond)) and graphs.captures == 0
    assert "one CUDA graph" not in looped.describe()


def test_the_regression_objective_is_recorded_too(ckpt):
    configs = load_checkpoint(ckpt).configs
    configs = dataclasses.replace(configs, diffusion=DiffusionConfig(prediction="x0", target="residual",
                                                                     objective="regression"))
    looped, plain, graphs, _ = pipes(ckpt, SampleConfig(), configs)
    cond = torch.rand(2, 5, 32, 32)
    assert torch.equal(looped(cond), plain(cond)) and graphs.captures == 1


def test_a_failed_capture_falls_back_to_per_call_replay_and_says_so(ckpt):
    looped, plain, graphs, notices = pipes(ckpt, SampleConfig(steps=3), fail=True)
    cond = torch.rand(1, 5, 32, 32)
    assert torch.equal(looped(cond), plain(cond))
    assert looped.loop is None and len(notices) == 1
    assert notices[0].startswith("warning: recording the whole fuse as one CUDA graph failed") and \
        notices[0].endswith("replaying per call")


def test_while_recording_the_engine_makes_no_per_call_graph_of_its_own(ckpt, monkeypatch):
    engine = recordable(ckpt)
    engine.cuda_graph = True  # as on CUDA: outside a recording, each new shape would be captured

    class NoCapture:
        def capture(self, *a):
            raise AssertionError("a per-call graph was captured while the whole fuse was recorded")

    engine.backend = NoCapture()
    graphs = RecordingGraphs()
    pipe = FusionPipeline(engine, load_checkpoint(ckpt).configs, 4, SampleConfig(steps=2), graphs=graphs)
    pipe(torch.rand(1, 5, 32, 32))
    assert graphs.captures == 1


def test_progress_hears_the_whole_fuse(ckpt):
    looped, _, _, _ = pipes(ckpt, SampleConfig(steps=4))
    seen = []
    looped(torch.rand(1, 5, 32, 32), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4, 4)


def test_engines_that_cannot_be_recorded_never_are(ckpt):
    configs = load_checkpoint(ckpt).configs
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0])  # on the CPU: not capturable
    assert FusionPipeline(engine, configs, 4, SampleConfig()).loop is None
    engine.capturable = True
    assert FusionPipeline(engine, configs, 4, SampleConfig(), whole_loop=False).loop is None


# ------------------------------------------------------------------ the eager fast path


def test_native_groupnorm_runs_in_the_input_dtype_and_stays_close_to_the_fp32_islands(ckpt, monkeypatch):
    seen = []
    real = F.group_norm

    def spy(x, *a, **k):
        seen.append(x.dtype)
        return real(x, *a, **k)

    monkeypatch.setattr(F, "group_norm", spy)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 5, 32, 32, generator=g) * 2 - 1,
            torch.tensor([0.3, 0.8]))
    islands = TorchDenoiser(build_from_checkpoint(ckpt)[0], dtype=torch.bfloat16, upcast_norms=True)
    native = TorchDenoiser(build_from_checkpoint(ckpt)[0], dtype=torch.bfloat16, upcast_norms=False)
    ref = TorchDenoiser(build_from_checkpoint(ckpt)[0])(*args)
    seen.clear()
    a = islands(*args)
    assert set(seen) == {torch.float32}
    seen.clear()
    b = native(*args)
    assert set(seen) == {torch.bfloat16}
    assert "native-dtype GroupNorm" in native.describe() and "native" not in islands.describe()
    err = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
    assert err(b) < 3e-2 and err(a) < 3e-2


def test_the_default_keeps_the_islands_on_a_cpu_and_in_fp32():
    from tfsdeploy.model import GroupNorm32

    for dtype in (torch.float32, torch.bfloat16):
        model = TorchDenoiser(torch.nn.Sequential(GroupNorm32(2, 4)), dtype=dtype).model
        assert model[0].upcast


def test_the_fp16_onnx_module_keeps_its_islands_whatever_a_live_engine_did(ckpt):
    from export.onnx_export import HalfDenoiser
    from tfsdeploy.model import GroupNorm32, set_norm_upcast

    model = set_norm_upcast(build_from_checkpoint(ckpt)[0], False)
    half = HalfDenoiser(model)
    assert all(m.upcast for m in half.modules() if isinstance(m, GroupNorm32))


def test_compile_caches_live_in_the_tfsdeploy_cache(monkeypatch, tmp_path):
    from engines.torch_engine import use_compile_cache

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TFSDEPLOY_CACHE", str(tmp_path))
    use_compile_cache()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TRITON_CACHE_DIR"].startswith(str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # a user's own choice wins
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


@pytest.mark.parametrize("sampler", ["ddim"])
def test_the_whole_loop_path_and_diffusion_fuse_agree_bit_for_bit(ckpt, sampler):
    """Diffusion.fuse itself runs the recorded function eagerly for DDIM: the sampler has one path."""
    from tfsdeploy.diffusion import Diffusion

    configs = load_checkpoint(ckpt).configs
    d = Diffusion.from_configs(configs)
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0])
    cond = torch.rand(2, 5, 32, 32)
    sample = SampleConfig(sampler=sampler, steps=3, seed=5)
    x_T = d.initial_noise(d.generators([5, 6], 2), (2, 3, 32, 32))
    via_sample = d.decode(d.sample(engine, cond * 2 - 1, (2, 3, 32, 32), steps=3, seed=[5, 6],
                                   clip=d.clip_range(_baseline(cond))), _baseline(cond))
    assert torch.equal(d.fuse_from_noise(engine, cond, x_T, sample), via_sample)
    assert torch.equal(d.fuse(engine, cond, sample, seeds=[5, 6]), via_sample)


def _baseline(cond):
    from tfsdeploy.fusion import fuse_condition

    return fuse_condition(cond)
