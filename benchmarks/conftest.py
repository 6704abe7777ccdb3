"""Shared set-up for the benchmark suites (not part of the default test run).

    pytest benchmarks/ --benchmark-only                                  # small preset
    BENCH_PRESET=tiny BENCH_SIZES=64 BENCH_BATCHES=1 pytest benchmarks/ --benchmark-disable   # CI smoke
"""

import os
from pathlib import Path

import pytest

PRESET = os.environ.get("BENCH_PRESET", "small")
SIZES = tuple(int(s) for s in os.environ.get("BENCH_SIZES", "128,256").split(","))
BATCHES = tuple(int(s) for s in os.environ.get("BENCH_BATCHES", "1,4").split(","))
ENGINES = tuple(os.environ.get("BENCH_ENGINES", "torch-fp32,torch,torch-compile,onnx,onnx-fp16,trt").split(","))


@pytest.fixture(scope="session")
def bench_setup(tmp_path_factory):
    """(checkpoint, engines that run here, skipped engines with reasons), random weights of the preset."""
    from tfsdeploy.tools.bench import BenchConfig, build_engines, random_checkpoint

    work = tmp_path_factory.mktemp("bench")
    ckpt = random_checkpoint(PRESET, work / "run")
    bcfg = BenchConfig(preset=PRESET, sizes=SIZES, batches=BATCHES, engines=ENGINES, fuse_size=max(SIZES))
    engines, skipped = build_engines(Path(ckpt), bcfg, work, log=lambda s: None)
    return Path(ckpt), engines, skipped


@pytest.fixture(scope="session")
def cpu_peak():
    """The peak a CPU call's fraction is taken against (tfsdeploy.tools.hardware.cpu_peak)."""
    from tfsdeploy.tools.hardware import cpu_peak as measure

    return measure()
