"""pytest-benchmark: per-step denoiser latency of each engine.

    pytest benchmarks/ --benchmark-only                      # small preset, 256x256
    BENCH_PRESET=tiny BENCH_SIZE=64 pytest benchmarks/ --benchmark-only

Not part of the default test run (that collects tests/ only).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_latency import make_engines  # noqa: E402

PRESET = os.environ.get("BENCH_PRESET", "small")
SIZE = int(os.environ.get("BENCH_SIZE", "256"))
BATCH = int(os.environ.get("BENCH_BATCH", "1"))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    torch.set_num_threads(os.cpu_count() or 1)
    _, engs = make_engines(PRESET, SIZE, BATCH, tmp_path_factory.mktemp("bench"), os.cpu_count() or 1)
    return engs


@pytest.mark.parametrize("name", ["torch eager fp32", "onnxruntime fp32", "onnxruntime fp16"])
def test_denoiser_step(benchmark, engines, name):
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randn(BATCH, 5, SIZE, SIZE, generator=g),
              torch.rand(BATCH, generator=g))
    benchmark.group = f"denoiser step {PRESET} {SIZE}px b{BATCH}"
    out = benchmark(engines[name], *inputs)
    assert out.shape == inputs[0].shape
