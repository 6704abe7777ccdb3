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
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"^AOTInductor compile failed: C\+\+ compile failed$"):
        export_aoti(ckpt, out, "cpu", EXPORT_SPEC, log=lambda s: None)
    assert list(out.iterdir()) == []


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


# ------------------------------------------------------------------ first-use builds and what they leave


class StandInCompiler:
    """torch.export and the AOTInductor compiler stood in for (a package file that is only bytes),
    and a loader whose runner is the tiny model itself, extracting into the temporary folder the way
    torch's C++ loader does (mkdtemp under $TMPDIR): the export machinery runs whole in seconds."""

    def __init__(self, ckpt, monkeypatch, fail=None, delay=0.0):
        import os
        import tempfile as tf
        import time

        self.compiles, self.extracted, self.inductor_dirs = 0, [], []
        model = build_from_checkpoint(ckpt)[0].eval()

        def compile_(program, package_path):
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            self.inductor_dirs.append(cache_dir())
            self.compiles += 1
            time.sleep(delay)
            if fail:
                raise RuntimeError(fail)
            with open(package_path, "wb") as f:
                f.write(b"package " + str(self.compiles).encode())

        def load(path, run_single_threaded=False, device_index=-1):
            folder = tf.mkdtemp(prefix="aotinductor_", dir=os.environ.get("TMPDIR", "/tmp"))
            with open(os.path.join(folder, "model.so"), "wb") as f:
                f.write(b"\0" * 1024)
            self.extracted.append(folder)
            return lambda x, c, n: model(x, c, n)

        monkeypatch.setattr(torch.export, "export", lambda *a, **k: "program")
        monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_)
        monkeypatch.setattr(torch._inductor, "aoti_load_package", load)


def _export(ckpt, out, **kw):
    from export.aoti_export import export_aoti

    return export_aoti(ckpt, out, "cpu", EXPORT_SPEC, parity_steps=2, log=lambda s: None, **kw)


def test_a_package_loads_into_the_tfsdeploy_cache_and_leaves_nothing_when_released(ckpt, tmp_path, monkeypatch):
    import gc
    import os

    from tfsdeploy.paths import cache_dir

    compiler = StandInCompiler(ckpt, monkeypatch)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    path, _ = _export(ckpt, tmp_path / "out")
    engine = AotiDenoiser(path)
    folder = compiler.extracted[-1]
    assert folder.startswith(str(cache_dir() / "aoti-load")) and os.path.isdir(folder)
    assert os.environ["TMPDIR"] == str(tmp_path / "system-tmp")  # put back after the load
    del engine
    gc.collect()
    assert not os.path.exists(folder) and list((tmp_path / "system-tmp").glob("aotinductor*")) == []
    assert list((cache_dir() / "aoti-load").iterdir()) == []


def test_the_extraction_of_a_process_killed_outright_is_removed_by_the_next_load(ckpt, tmp_path, monkeypatch):
    import subprocess
    import sys

    from tfsdeploy.paths import cache_dir

    StandInCompiler(ckpt, monkeypatch)
    path, _ = _export(ckpt, tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = cache_dir() / "aoti-load" / f".run.{dead}.abcd1234.tmp"
    (stale / "aotinductor_x").mkdir(parents=True)
    engine = AotiDenoiser(path)
    assert not stale.exists() and engine is not None


def test_export_keeps_inductors_files_in_the_tfsdeploy_cache(ckpt, tmp_path, monkeypatch):
    from tfsdeploy.paths import cache_dir

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    compiler = StandInCompiler(ckpt, monkeypatch)
    _export(ckpt, tmp_path / "out")
    assert compiler.inductor_dirs and compiler.inductor_dirs[0].startswith(str(cache_dir()))


def test_the_staging_folder_of_an_export_killed_outright_is_removed_by_the_next(ckpt, tmp_path, monkeypatch):
    import subprocess
    import sys

    from export.aoti_export import package_key, package_path
    from tfsdeploy.artifacts import checkpoint_fingerprint

    StandInCompiler(ckpt, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    key = package_key(checkpoint_fingerprint(ckpt)["sha256"], device_identity("cpu"), "fp32", EXPORT_SPEC)
    target = package_path(out, key, "fp32")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = out / f".{target.name}.{dead}.x1y2z3.tmp"
    stale.mkdir()
    (stale / target.name).write_bytes(b"\0" * 4096)  # the full package it was writing
    path, _ = _export(ckpt, out)
    assert path == target and sorted(p.name for p in out.iterdir()) == sorted([target.name, target.name + ".json"])


def test_two_builds_of_one_package_at_once_compile_it_once(ckpt, tmp_path, monkeypatch):
    import threading

    compiler = StandInCompiler(ckpt, monkeypatch, delay=1.0)
    out, results, errors = tmp_path / "out", [], []

    def build():
        try:
            results.append(_export(ckpt, out))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and compiler.compiles == 1
    assert results[0] == results[1]
    assert read_sidecar(results[0][0])["key"]  # the sidecar matches the file (its sha256 is checked)


def test_a_failed_first_use_build_is_remembered_and_not_tried_by_every_job(ckpt, tmp_path, monkeypatch):
    from export.aoti_export import failure_marker

    compiler = StandInCompiler(ckpt, monkeypatch, fail="out of memory")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="AOTInductor compile failed: out of memory"):
        _export(ckpt, out, remember_failure=True)
    markers = list(out.glob("*.failed"))
    assert compiler.compiles == 1 and len(markers) == 1
    with pytest.raises(UserError, match=r"failed before \(AOTInductor compile failed: out of memory\).*export --aoti"):
        _export(ckpt, out, remember_failure=True)
    assert compiler.compiles == 1  # not compiled again
    compiler_ok = StandInCompiler(ckpt, monkeypatch)  # `export --aoti` tries again, and clears the marker
    path, _ = _export(ckpt, out)
    assert compiler_ok.compiles == 1 and not failure_marker(path).exists()


def _read_only(monkeypatch, root):
    """A stand-in for a read-only folder that holds even for root: creating anything under `root`
    fails with EACCES, as on a read-only mount or a folder of another user."""
    import builtins
    import errno
    import io
    import os

    real_mkdir, real_open = os.mkdir, os.open
    root = str(root)

    def refuse(path):
        if os.path.abspath(os.fspath(path)).startswith(root):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    def mkdir(path, *a, **k):
        refuse(path)
        return real_mkdir(path, *a, **k)

    def open_(path, flags, *a, **k):
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *a, **k)

    def builtin_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
            refuse(file)
        return real_builtin_open(file, mode, *a, **k)

    real_builtin_open = builtins.open
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setattr(io, "open", builtin_open)


def test_a_read_only_cache_is_one_line_not_a_traceback(ckpt, tmp_path, monkeypatch):
    StandInCompiler(ckpt, monkeypatch)
    out = tmp_path / "compiled"
    out.mkdir()
    _read_only(monkeypatch, out)
    with pytest.raises(UserError, match=r"cannot write here \(Permission denied\)"):
        _export(ckpt, out, remember_failure=True)
    assert list(out.iterdir()) == []


def test_a_first_use_build_that_cannot_write_falls_back_to_torch_with_a_notice(fake_engines, ckpt, monkeypatch):
    import tfsdeploy.pipeline as pipeline

    def refused(ckpt_, notice):
        raise PermissionError(13, "Permission denied", "/cache/compiled")

    monkeypatch.setattr(pipeline, "build_package", refused)
    fake_engines.update(device="cuda", available=set())
    notices = []
    d, _ = pipeline.load_denoiser(ckpt, EngineConfig(build_missing=True), notice=notices.append)
    assert d.name == "torch" and len(notices) == 1 and notices[0].startswith(
        "warning: building the AOTInductor package failed (PermissionError:") and notices[0].endswith(
        "running the torch engine instead")


def test_loading_the_real_package_leaves_nothing_in_the_temporary_folder(package, tmp_path, monkeypatch):
    import gc

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    engine = AotiDenoiser(package[0])
    assert engine.single_threaded and engine(*inputs(1, 64)).shape == (1, 3, 64, 64)
    del engine
    gc.collect()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("aotinductor")] == []
