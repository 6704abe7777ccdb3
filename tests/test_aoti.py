"""The AOTInductor path: export with its parity gate and keyed sidecar, the engine's refusals of a
stale or foreign package, and where `auto` puts it among the engines."""

import json
import shutil

import pytest
import torch

from conftest import EXPORT_SPEC
from engines.aoti_engine import AotiDenoiser, device_identity
from engines.torch_engine import TorchDenoiser
from export.parity import relative_l2
from tfsdeploy.artifacts import read_sidecar, sealed, sidecar_path
from tfsdeploy.checkpoint import build_from_checkpoint
from tfsdeploy.config import EngineConfig
from tfsdeploy.errors import UserError
from tfsdeploy.metrics import psnr


@pytest.fixture(scope="session")
def package(ckpt, tmp_path_factory):
    """The tiny checkpoint compiled for this CPU (the slow part: a C++ compile, once per session)."""
    from export.aoti_export import export_aoti

    out = tmp_path_factory.mktemp("aoti")
    path, report = export_aoti(ckpt, out, "cpu", EXPORT_SPEC, parity_steps=3, log=lambda s: None)
    return path, report


def inputs(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, 5, size, size, generator=g) * 2 - 1,
            torch.linspace(0.2, 0.9, batch))


def test_the_package_matches_torch_fp32_at_every_batch_and_size_of_its_range(package, ckpt):
    path, report = package
    engine = AotiDenoiser(path)
    reference = TorchDenoiser(build_from_checkpoint(ckpt)[0])
    for batch, size in ((1, 64), (3, 32), (2, 128), (2, 48)):  # dynamic batch and size
        args = inputs(batch, size)
        out = engine(*args)
        assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
        assert relative_l2(out, reference(*args)) < 1e-4
    assert report["relative_l2"] <= 1e-4 and report["fused_psnr_db"] >= 45


def test_the_sidecar_records_what_a_stale_package_would_get_wrong(package, ckpt):
    from tfsdeploy.artifacts import checkpoint_fingerprint

    meta = read_sidecar(package[0])
    assert meta["kind"] == "aoti" and meta["precision"] == "fp32" and meta["device"] == "cpu"
    assert meta["torch"] == torch.__version__ and meta["cpu_isa"] == device_identity("cpu")["cpu_isa"]
    assert meta["checkpoint"]["sha256"] == checkpoint_fingerprint(ckpt)["sha256"]
    assert meta["io"] == EXPORT_SPEC.to_json() and meta["parity"]["fused_psnr_db"] >= 45
    assert package[0].name.startswith("denoiser-aoti-fp32-") and meta["key"].startswith(package[0].name[19:35])


def test_calls_outside_the_exported_range_are_refused(package):
    engine = AotiDenoiser(package[0])
    with pytest.raises(UserError, match="batch 4 is outside the exported range 1..3"):
        engine(*inputs(4, 64))
    with pytest.raises(UserError, match="not a multiple of 4"):
        engine(*inputs(1, 66))


def _copy_with(package_path, tmp_path, **changes):
    """A copy of the package whose sidecar says something else."""
    dst = tmp_path / package_path.name
    shutil.copy(package_path, dst)
    meta = json.loads(sidecar_path(package_path).read_text())
    meta.update(changes)
    sidecar_path(dst).write_text(json.dumps(sealed(meta)))  # sealed again: an export that says this
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"torch": "2.0.0"}, "was built with torch 2.0.0, this is torch"),
    ({"cpu_isa": "avx512"}, r"was built for a CPU \(.*, avx512\), this is a CPU \("),
    ({"machine": "aarch64"}, r"was built for a CPU \(aarch64, "),
    ({"device": "cuda", "gpu": "NVIDIA H200", "compute_capability": "9.0"}, "no CUDA GPU is available here|this is"),
    ({"kind": "onnx"}, "not an AOTInductor package"),
])
def test_a_foreign_package_is_refused_with_the_reason_and_never_loaded(package, tmp_path, monkeypatch, changes,
                                                                        message):
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda p: loaded.append(p))
    with pytest.raises(UserError, match=message):
        AotiDenoiser(_copy_with(package[0], tmp_path, **changes))
    assert loaded == []


def test_a_modified_package_is_refused_by_its_hash(package, tmp_path):
    dst = _copy_with(package[0], tmp_path)
    with open(dst, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="sha256 does not match"):
        AotiDenoiser(dst)


def test_find_skips_stale_packages_with_the_reason_and_takes_a_valid_one(package, ckpt, tmp_path):
    from engines.loader import find_artifact

    _copy_with(package[0], tmp_path, torch="2.0.0")
    with pytest.raises(UserError, match=r"no AOTInductor package .*\(.*built with torch 2.0.0.*\).*--aoti"):
        find_artifact(ckpt, "aoti", tmp_path)
    assert find_artifact(ckpt, "aoti", package[0].parent) == package[0]


def test_a_package_of_another_checkpoint_is_not_used(package, tmp_path):
    from engines.loader import find_artifact
    from tfsdeploy.checkpoint import Configs, save_checkpoint
    from tfsdeploy.model import build_model

    cfg = Configs.from_json(read_sidecar(package[0])["configs"])
    other = save_checkpoint(tmp_path / "other", cfg, 1, build_model(cfg.model).state_dict())
    with pytest.raises(UserError, match="different checkpoint"):
        find_artifact(other, "aoti", package[0].parent)


def test_export_reuses_a_matching_package_without_compiling(package, ckpt, monkeypatch):
    from export.aoti_export import export_aoti

    def no_compile(*a, **k):
        raise AssertionError("a matching package was compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    lines = []
    path, report = export_aoti(ckpt, package[0].parent, "cpu", EXPORT_SPEC, parity_steps=3, log=lines.append)
    assert path == package[0] and report == package[1] and any("cache hit" in s for s in lines)


def test_a_package_that_fails_parity_is_never_published(package, ckpt, tmp_path, monkeypatch):
    import export.parity
    from export.aoti_export import export_aoti

    # Stand in for the compiler with the real package (no second C++ build), and make the gate fail.
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path: shutil.copy(package[0], package_path))
    monkeypatch.setattr(export.parity, "check_limits", lambda *a: ["fused-image PSNR 20.00 dB < 45 dB"])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="failed parity against torch fp32: fused-image PSNR.*nothing was written"):
        export_aoti(ckpt, out, "cpu", EXPORT_SPEC, parity_steps=2, log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_compile_failure_is_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from export.aoti_export import export_aoti

    def boom(program, package_path):
        raise RuntimeError("C++ compile failed\nlong compiler output")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", boom)
    with pytest.raises(UserError, match=r"^AOTInductor compile failed: C\+\+ compile failed$"):
        export_aoti(ckpt, tmp_path, "cpu", EXPORT_SPEC, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_the_aoti_engine_runs_a_fuse_through_the_pipeline(package, ckpt):
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.pipeline import FusionPipeline, load_denoiser

    denoiser, configs = load_denoiser(ckpt, EngineConfig(engine="aoti", export_dir=str(package[0].parent)))
    assert isinstance(denoiser, AotiDenoiser) and "aoti fp32" in denoiser.describe()
    cond = torch.rand(2, 5, 64, 64)
    sample = SampleConfig(steps=3)
    a = FusionPipeline(denoiser, configs, 4, sample)(cond)
    b = FusionPipeline(TorchDenoiser(build_from_checkpoint(ckpt)[0]), configs, 4, sample)(cond)
    assert float(psnr(a, b).min()) >= 45  # the fp32 parity gate's limit on fused images
    # handed over directly, the .pt2 file runs on its own engine only
    assert isinstance(load_denoiser(package[0])[0], AotiDenoiser)
    with pytest.raises(UserError, match="cannot run on engine onnx"):
        load_denoiser(package[0], EngineConfig(engine="onnx"))


# ------------------------------------------------------------------ auto's order


class Fake:
    capturable = False

    def __init__(self, name, device="cpu"):
        self.name, self.device, self.dtype = name, torch.device(device), torch.float32

    def describe(self):
        return self.name


@pytest.fixture
def fake_engines(monkeypatch, ckpt):
    """Stand-ins for find/load: `available` names the engines that have a valid artifact."""
    import engines.loader
    import tfsdeploy.pipeline as pipeline

    state = {"available": set(), "built": 0, "device": "cpu"}

    def find(ckpt_, engine, export_dir=None, device="auto"):
        if engine not in state["available"]:
            raise UserError(f"no {engine} here")
        return f"{engine}-artifact"

    def load(path, device="auto", threads=0, cuda_graph=False):
        return Fake(path.split("-")[0], state["device"]), None

    def build(ckpt_, notice):
        state["built"] += 1
        notice("compiling the denoiser for this GPU once: about 10 s; later runs load it")
        return Fake("aoti-built", "cuda"), None

    monkeypatch.setattr(engines.loader, "find_artifact", find)
    monkeypatch.setattr(engines.loader, "load_artifact", load)
    monkeypatch.setattr(pipeline, "build_package", build)
    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device(state["device"]))
    monkeypatch.setattr(pipeline, "torch_denoiser", lambda c, d, cfg: (Fake("torch", d.type), None))
    return state


@pytest.mark.parametrize("device, available, long_job, expected, built", [
    ("cuda", {"trt", "aoti", "onnx"}, False, "trt", 0),
    ("cuda", {"aoti", "onnx"}, False, "aoti", 0),
    ("cuda", {"onnx"}, False, "torch", 0),  # a one-image fuse never builds
    ("cuda", {"onnx"}, True, "aoti-built", 1),  # a long job builds once, then loads
    ("cpu", {"trt", "aoti", "onnx"}, True, "onnx", 0),
    ("cpu", {"aoti"}, True, "torch", 0),  # on a CPU a package is used only when asked for
])
def test_auto_takes_trt_then_aoti_then_torch_on_cuda_and_onnx_then_torch_on_a_cpu(fake_engines, ckpt, device,
                                                                                   available, long_job, expected,
                                                                                   built):
    from tfsdeploy.pipeline import load_denoiser

    fake_engines.update(device=device, available=available)
    skipped, notices = [], []
    d, _ = load_denoiser(ckpt, EngineConfig(build_missing=long_job), skipped.append, notices.append)
    assert d.name == expected and fake_engines["built"] == built
    assert all(s.startswith("auto: skipping ") for s in skipped)
    assert bool(notices) == bool(built)


def test_a_failed_first_use_build_falls_back_to_torch_and_says_so(fake_engines, ckpt, monkeypatch):
    import tfsdeploy.pipeline as pipeline

    def fail(ckpt_, notice):
        raise UserError("AOTInductor compile failed: out of memory")

    monkeypatch.setattr(pipeline, "build_package", fail)
    fake_engines.update(device="cuda", available=set())
    notices = []
    d, _ = pipeline.load_denoiser(ckpt, EngineConfig(build_missing=True), notice=notices.append)
    assert d.name == "torch" and notices == ["warning: AOTInductor compile failed: out of memory; running the "
                                             "torch engine instead"]
