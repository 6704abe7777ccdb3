"""pytest-benchmark suites: per-call denoiser latency per engine, end-to-end fuse time per sampler, memory."""

import pytest
import torch

from conftest import BATCHES, ENGINES, SIZES
from tfsdeploy.tools.hardware import rss_mib, sync


def _engine(bench_setup, name):
    _, engines, skipped = bench_setup
    if name not in engines:
        pytest.skip(f"{name}: {skipped.get(name, 'not requested')}")
    return engines[name]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ENGINES)
def test_denoiser_call(benchmark, bench_setup, cpu_peak, name, size, batch):
    """On a CPU the fastest call's FLOP/s must stay within the CPU's peak, as `tfsdeploy bench` checks."""
    eng = _engine(bench_setup, name)
    dev = eng.device
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, 3, size, size, generator=g).to(dev), torch.randn(batch, 5, size, size, generator=g).to(dev),
            torch.rand(batch, generator=g).to(dev))
    benchmark.group = f"denoiser call {size}px batch {batch}"

    def call():
        out = eng(*args)
        sync()
        return out

    out = benchmark(call)
    benchmark.extra_info["peak_rss_mib"] = rss_mib()[1]
    if torch.cuda.is_available():
        benchmark.extra_info["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    assert out.shape == args[0].shape
    if dev.type == "cpu" and benchmark.stats is not None:
        from tfsdeploy.checkpoint import build_from_checkpoint
        from tfsdeploy.tools.hardware import count_flops
        from tfsdeploy.tools.projection import check_fraction

        flops = count_flops(build_from_checkpoint(bench_setup[0])[0], batch, size)
        fraction = flops / benchmark.stats.stats.min / 1e9 / cpu_peak["peak"]
        benchmark.extra_info["fraction_of_peak"] = fraction
        check_fraction(fraction, f"{name} at {size}px batch {batch} against {cpu_peak['what']}")


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddpm", 20)])
@pytest.mark.parametrize("name", ["torch-fp32", "torch", "onnx"])
def test_fuse_end_to_end(benchmark, bench_setup, name, sampler, steps):
    """DDPM is timed over 20 respaced levels; the per-level time times T is its full cost
    (recorded as extra_info['ddpm_full_T_seconds_estimate'])."""
    from tfsdeploy.checkpoint import load_checkpoint
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.data import reference_triplet
    from tfsdeploy.pipeline import FusionPipeline

    eng = _engine(bench_setup, name)
    ck = load_checkpoint(bench_setup[0])
    size = max(SIZES)
    trip = reference_triplet(size)
    benchmark.group = f"fuse x4 {size}px"
    pipe = FusionPipeline(eng, ck.configs, 4, SampleConfig(sampler=sampler, steps=steps))
    out = benchmark.pedantic(pipe.fuse_triplet, args=(trip, size), rounds=2, warmup_rounds=1)
    if sampler == "ddpm" and benchmark.stats is not None:
        benchmark.extra_info["ddpm_full_T_seconds_estimate"] = benchmark.stats.stats.median / steps * \
            ck.configs.schedule.num_steps
    assert out.shape == (3, size, size)
