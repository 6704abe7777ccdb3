"""Shared set-up for the benchmark suites (not part of the default test run).

    pytest benchmarks/ --benchmark-only                                  # small preset
    BENCH_PRESET=tiny BENCH_SIZES=64 BENCH_BATCHES=1 pytest benchmarks/ --benchmark-disable   # CI smoke
"""

import os
from pathlib import Path

import pytest
import torch

PRESET = os.environ.get("BENCH_PRESET", "small")
SIZES = tuple(int(s) for s in os.environ.get("BENCH_SIZES", "128,256").split(","))
BATCHES = tuple(int(s) for s in os.environ.get("BENCH_BATCHES", "1,4").split(","))
ENGINES = tuple(os.environ.get("BENCH_ENGINES", "torch,torch-compile,onnx-fp32,onnx-fp16,trt").split(","))


@pytest.fixture(scope="session")
def bench_setup(tmp_path_factory):
    """(checkpoint, engines that run here, skipped engines with reasons), random weights of the preset."""
    from tfsdeploy.bench import BenchConfig, build_engines
    from tfsdeploy.checkpoint import Configs, save_checkpoint
    from tfsdeploy.config import model_preset
    from tfsdeploy.model import build_model

    torch.manual_seed(0)
    cfg = model_preset(PRESET)
    model = build_model(cfg)
    with torch.no_grad():
        model.final.conv.weight.normal_(0, 0.02)
    work = tmp_path_factory.mktemp("bench")
    ckpt = save_checkpoint(work / "run", Configs(model=cfg), 0, model.state_dict())
    bcfg = BenchConfig(preset=PRESET, sizes=SIZES, batches=BATCHES, engines=ENGINES, fuse_size=max(SIZES))
    engines, skipped = build_engines(Path(ckpt), bcfg, work, log=lambda s: None)
    return Path(ckpt), engines, skipped
