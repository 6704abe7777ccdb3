"""Shared fixtures: tiny models, synthetic tri-modal folders and a tiny trained checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfsdeploy.checkpoint import Configs, save_checkpoint
from tfsdeploy.config import PRESETS, DataConfig, DiffusionConfig, ScheduleConfig, TrainConfig
from tfsdeploy.iospec import IOSpec

torch.set_num_threads(2)

# Fixtures that take minutes to build on a 2-core CPU. A test that uses one is marked slow, so the
# quick run (pyproject's addopts) leaves it out and `-m slow` runs it.
SLOW_FIXTURES = {"package",  # test_aoti.py: an AOTInductor compile of the tiny model
                 "exported",  # ONNX exports of the tiny model, fp32 and fp16, parity-checked
                 "spm_dataset"}  # the SPM template dataset, built from the templates


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)  # a parametrised argument is no fixture
        if SLOW_FIXTURES & (set(getattr(item, "fixturenames", ())) - set(params.params if params else ())):
            item.add_marker(pytest.mark.slow)


def smooth_image(rng: np.random.Generator, size: int, blobs: int = 6) -> np.ndarray:
    """A smooth synthetic 'anatomy' in [0, 1]: a disc with Gaussian blobs."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16).astype(np.float64) * 0.3
    for _ in range(blobs):
        cx, cy, s, a = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.03, 0.12), rng.uniform(0.2, 0.7)
        img += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return np.clip(img, 0, 1)


def write_folder(root: Path, names: list[str], size: int = 64, seed: int = 0, gt: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    for d in ("t1", "t2", "func") + (("gt",) if gt else ()):
        (root / d).mkdir(parents=True, exist_ok=True)
    for n in names:
        for d in ("t1", "t2", "func"):
            Image.fromarray((smooth_image(rng, size) * 255).astype(np.uint8)).save(root / d / f"{n}.png")
        if gt:
            rgb = np.stack([smooth_image(rng, size) for _ in range(3)], -1)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(root / "gt" / f"{n}.png")
    return root


class AnalyticDenoiser:
    """A plain function behind the Denoiser protocol (diffusers-style contract tests)."""

    capturable = False

    def __init__(self, fn, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.fn, self.device, self.dtype = fn, torch.device(device), dtype

    def describe(self) -> str:
        return f"analytic ({self.device.type})"

    def __call__(self, x_t, cond, noise_level):
        return self.fn(x_t, cond, noise_level)


def randomize_output(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The output conv starts at zero by design; give it random weights so outputs carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.final.conv.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A split synthetic dataset of 64x64 images."""
    root = tmp_path_factory.mktemp("synth")
    write_folder(root / "train", [f"s{i:02d}" for i in range(6)], seed=1)
    write_folder(root / "val", ["v00", "v01"], seed=2)
    write_folder(root / "test", ["e00", "e01"], seed=3)
    return root


def tiny_configs(steps: int = 4, prediction: str = "x0", target: str = "residual", T: int = 100,
                 **train_kw) -> Configs:
    model = dataclasses.replace(PRESETS["tiny"], image_size=64)
    return Configs(
        model=model,
        schedule=ScheduleConfig(num_steps=T),
        diffusion=DiffusionConfig(prediction=prediction, target=target),
        data=DataConfig(scales=(2, 4, 8), crop=32),
        train=TrainConfig(**{"steps": steps, "batch_size": 2, "val_every": 0, "ckpt_every": 2, "log_every": 1,
                             "val_images": 2, "val_steps": 3, **train_kw}),
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_dataset) -> Path:
    """A tiny model trained for 4 steps on the synthetic data (a run folder)."""
    from training.train import train

    run = tmp_path_factory.mktemp("run") / "tiny"
    train(run, tiny_configs(), data_root=synth_dataset, show_progress=False, log=lambda s: None)
    return run


@pytest.fixture(scope="session")
def spm_dataset(tmp_path_factory) -> Path:
    """The real SPM dataset at 64x64 (built once per test session)."""
    from tfsdeploy.data import build_dataset

    out = tmp_path_factory.mktemp("spm") / "ds"
    build_dataset(out, size=64, sources=["spm"])
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFSDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TFSDEPLOY_MODEL", raising=False)
    yield
    os.environ.pop("WORLD_SIZE", None)


EXPORT_SPEC = IOSpec(size_multiple=4, min_batch=1, opt_batch=1, max_batch=3, min_size=32, opt_size=64, max_size=128)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with random (non-zero) output weights, so parity compares real numbers."""
    from tfsdeploy.model import build_model

    cfg = Configs(model=dataclasses.replace(PRESETS["tiny"], image_size=64),
                  diffusion=DiffusionConfig(prediction="eps", target="fused"))
    torch.manual_seed(0)
    model = randomize_output(build_model(cfg.model))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "run", cfg, 5, model.state_dict())


@pytest.fixture(scope="session")
def exported(ckpt):
    """The tiny checkpoint exported to fp32 and fp16 ONNX: precision -> (path, parity report)."""
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
    from export.onnx_export import export_onnx

    return {p: export_onnx(ckpt, p, spec=EXPORT_SPEC, parity_steps=3, log=lambda s: None) for p in ("fp32", "fp16")}


class RecordingGraphs:
    """A stand-in for CUDA graphs: captures by running the function once (as the warm-up would),
    with `capturing` set while it runs, and replays by running it again. With `rules`, both run
    under tfsdeploy.loopgraph.CaptureRules for that device."""

    def __init__(self, fail: bool = False, rules: str | None = None):
        self.captures, self.replays, self.released, self.fail, self.rules = 0, 0, 0, fail, rules
        self.capturing = False

    def _run(self, fn):
        from tfsdeploy.loopgraph import CaptureRules

        with CaptureRules(self.rules) if self.rules else contextlib.nullcontext():
            return fn()

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.capturing = True
        try:
            self._run(fn)
        finally:
            self.capturing = False
        self.captures += 1
        graphs = self

        class Replay:
            def __call__(self):  # a real replay runs the recorded kernels, never the engine's Python again
                from tfsdeploy.loopgraph import recording

                graphs.replays += 1
                with recording():
                    return graphs._run(fn)

            def release(self):
                graphs.released += 1

        return Replay()
