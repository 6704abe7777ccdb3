"""Export to ONNX, the engines behind one interface, and everything around TensorRT that runs without it."""

import dataclasses
import json
import shutil

import hashlib

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")

from conftest import EXPORT_SPEC, randomize_output  # noqa: E402
from engines.loader import find_artifact, load_artifact  # noqa: E402
from engines.onnx_engine import OnnxDenoiser  # noqa: E402
from engines.torch_engine import TorchDenoiser  # noqa: E402
from engines.trt_engine import check_engine_meta, tensorrt_status  # noqa: E402
from export.onnx_export import HalfDenoiser, default_spec, export_onnx  # noqa: E402
from export.parity import check_limits, relative_l2  # noqa: E402
from export.trt_build import build_plan, engine_key, engine_path  # noqa: E402
from tfsdeploy.artifacts import read_sidecar, sidecar_path, write_sidecar  # noqa: E402
from tfsdeploy.checkpoint import Configs, build_from_checkpoint, save_checkpoint  # noqa: E402
from tfsdeploy.config import PRESETS, EngineConfig  # noqa: E402
from tfsdeploy.pipeline import load_denoiser  # noqa: E402
from tfsdeploy.errors import UserError  # noqa: E402
from tfsdeploy.iospec import INPUTS, OUTPUT, IOSpec  # noqa: E402
from tfsdeploy.model import build_model  # noqa: E402

SPEC = EXPORT_SPEC


def test_io_spec_drives_shapes_and_profile():
    s = SPEC.shapes(2, 64, 96)
    assert s["x_t"] == (2, 3, 64, 96) and s["cond"] == (2, 5, 64, 96) and s["noise_level"] == (2,)
    assert s[OUTPUT] == s["x_t"]
    prof = SPEC.profile()
    assert prof["cond"] == ((1, 5, 32, 32), (1, 5, 64, 64), (3, 5, 128, 128))
    with pytest.raises(UserError, match="batch 4"):
        SPEC.check(4, 64, 64)
    with pytest.raises(UserError, match="multiple of 4"):
        SPEC.check(1, 66, 64)
    with pytest.raises(UserError, match="outside"):
        SPEC.check(1, 256, 64)
    assert IOSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(UserError):
        IOSpec(min_size=64, opt_size=32)


def test_onnx_graph_is_valid_with_dynamic_axes_and_opset(exported):
    path, _ = exported["fp32"]
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in m.graph.input] == list(INPUTS) and [o.name for o in m.graph.output] == [OUTPUT]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str)


def test_fp16_onnx_has_half_weights_fp32_islands_and_fp32_io(exported):
    path, _ = exported["fp16"]
    m = onnx.load(str(path))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(i.type.tensor_type.elem_type == f32 for i in m.graph.input)
    assert m.graph.output[0].type.tensor_type.elem_type == f32
    conv_weights = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    inits = {i.name: i.data_type for i in m.graph.initializer}
    assert conv_weights and all(inits[w] == f16 for w in conv_weights if w in inits)
    # norms run in fp32: every normalisation node is fed by a Cast to float
    producers = {o: n for n in m.graph.node for o in n.output}
    norms = [n for n in m.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    assert norms
    for n in norms:
        src = producers.get(n.input[0])
        while src is not None and src.op_type in ("Reshape",):
            src = producers.get(src.input[0])
        assert src is not None and src.op_type == "Cast" and src.attribute[0].i == f32


def test_parity_reports_are_within_limits_and_recorded(exported, ckpt):
    for p, (path, rep) in exported.items():
        side = read_sidecar(path)
        assert side["precision"] == p and side["opset"] >= 18 and side["parity"] == rep
        weights = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
        assert side["checkpoint"]["sha256"] == weights
        assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert {"torch", "onnx", "onnxruntime"} <= set(side["versions"])
    assert exported["fp32"][1]["relative_l2"] <= 1e-4 and exported["fp32"][1]["fused_psnr_db"] >= 45
    assert 0 < exported["fp16"][1]["relative_l2"] <= 1e-2 and exported["fp16"][1]["fused_psnr_db"] >= 35


def test_onnx_engine_matches_torch_at_other_shapes(exported, ckpt):
    model, _ = build_from_checkpoint(ckpt)
    ref = TorchDenoiser(model)
    eng = OnnxDenoiser(exported["fp32"][0])
    assert eng.provider == "CPUExecutionProvider"
    g = torch.Generator().manual_seed(1)
    x, c, l = torch.randn(3, 3, 96, 64, generator=g), torch.randn(3, 5, 96, 64, generator=g), torch.rand(3, generator=g)
    assert relative_l2(eng(x, c, l), ref(x, c, l)) < 1e-5
    with pytest.raises(UserError, match="outside"):
        eng(torch.randn(1, 3, 256, 256), torch.randn(1, 5, 256, 256), torch.rand(1))


def test_parity_failure_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import export.parity as parity

    monkeypatch.setitem(parity.LIMITS, "fp32", (0.0, 1e9))  # impossible limits
    out = tmp_path / "exp"
    with pytest.raises(UserError, match="failed parity"):
        export_onnx(ckpt, "fp32", out, SPEC, parity_steps=2, log=lambda s: None)
    assert list(out.iterdir()) == []


def test_tampered_onnx_is_refused(exported, tmp_path):
    src = exported["fp32"][0]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    shutil.copy(sidecar_path(src), sidecar_path(dst))
    OnnxDenoiser(dst)  # intact copy loads
    data = bytearray(dst.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 does not match"):
        OnnxDenoiser(dst)
    sidecar_path(dst).unlink()
    with pytest.raises(UserError, match="no sidecar"):
        load_artifact(dst)


def test_a_sidecar_is_sealed_by_its_own_hash(tmp_path):
    package = tmp_path / "denoiser-fp32.pt2"
    package.write_bytes(b"compiled")
    write_sidecar(package, {"kind": "aoti", "configs": {"diffusion": {"prediction": "x0"}}})
    assert read_sidecar(package)["configs"]["diffusion"]["prediction"] == "x0"
    text = sidecar_path(package).read_text()
    sidecar_path(package).write_text(text.replace('"x0"', '"eps"'))
    with pytest.raises(UserError, match="was edited after export"):
        read_sidecar(package, verify_hash=False)
    sidecar_path(package).write_text(text.replace("  ", " "))  # the same content, laid out otherwise
    assert read_sidecar(package)["configs"]["diffusion"]["prediction"] == "x0"


def test_an_edited_sidecar_is_refused(exported, tmp_path):
    src = exported["fp32"][0]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    meta = json.loads(sidecar_path(src).read_text())
    diffusion = meta["configs"]["diffusion"]
    # x0 read as eps (or the other way round): the artifact's output would be read as the wrong thing
    diffusion["prediction"] = "eps" if diffusion["prediction"] == "x0" else "x0"
    sidecar_path(dst).write_text(json.dumps(meta, indent=2, sort_keys=True))
    with pytest.raises(UserError, match=r"was edited after export \(its own sha256 does not match\); export again"):
        OnnxDenoiser(dst)
    del meta["sidecar_sha256"]
    sidecar_path(dst).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has no sha256 of its own"):
        load_artifact(dst)


def test_checkpoint_changed_after_export_is_refused(ckpt, exported, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(ckpt, run)
    # the copy's export folder came along and still matches the unchanged weights
    assert find_artifact(run, "onnx").name == "denoiser-fp32.onnx"
    cfg = Configs.from_json(json.loads((run / "config.json").read_text()))
    model, _ = build_from_checkpoint(run)
    with torch.no_grad():
        model.final.conv.bias.add_(0.5)
    save_checkpoint(tmp_path, cfg, 5, model.state_dict(), name="copy")  # rewrites weights, keeps no export dir
    (run / "export").mkdir(exist_ok=True)
    for f in (ckpt / "export").iterdir():
        shutil.copy(f, run / "export" / f.name)
    with pytest.raises(UserError, match="different checkpoint"):
        find_artifact(run, "onnx")
    # auto then falls back to torch rather than use a stale artifact
    den, _ = load_denoiser(run)
    assert den.name == "torch"


def test_auto_prefers_onnx_on_cpu(ckpt, exported):
    den, cfg = load_denoiser(ckpt)
    assert den.name == "onnx" and den.precision == "fp32" and den.device.type == "cpu"
    assert cfg.diffusion.prediction == "eps"
    den16, _ = load_denoiser(ckpt, EngineConfig(engine="onnx-fp16"))
    assert den16.precision == "fp16" and den16.dtype == torch.float16
    direct, cfg2 = load_artifact(exported["fp16"][0])
    assert direct.precision == "fp16" and cfg2 == cfg
    with pytest.raises(UserError, match="engine must be"):
        EngineConfig(engine="cuda-magic")


def test_missing_export_says_how_to_fix(tmp_path):
    cfg = Configs(model=PRESETS["tiny"])
    ck = save_checkpoint(tmp_path, cfg, 1, build_model(cfg.model).state_dict())
    with pytest.raises(UserError, match="tfsdeploy export"):
        load_denoiser(ck, EngineConfig(engine="onnx"))


def test_half_wrapper_keeps_fp32_io():
    m = randomize_output(build_model(PRESETS["tiny"])).eval()
    h = HalfDenoiser(m)
    y = h(torch.randn(1, 3, 16, 16), torch.randn(1, 5, 16, 16), torch.rand(1))
    assert y.dtype == torch.float32 and h.model.init_conv.weight.dtype == torch.float16


def test_default_spec_follows_the_model():
    s = default_spec(build_model(PRESETS["paper"]))
    assert s.size_multiple == 16 and s.opt_size == 256 and s.min_size % 16 == 0 and s.max_size >= 256


def test_relative_l2_and_limits():
    a = torch.ones(4)
    assert relative_l2(a, a) == 0.0 and relative_l2(torch.zeros(4), torch.zeros(4)) == 0.0
    assert relative_l2(a * 1.01, a) == pytest.approx(0.01, rel=1e-4)
    assert check_limits("fp32", 1e-5, 50) == []
    assert len(check_limits("fp16", 0.5, 20)) == 2


# --------------------------------------------------------------------------- TensorRT, around it


def test_build_plan_per_tensorrt_major():
    assert build_plan("10.13.3.9") == type(build_plan("10.0"))(onnx_precision="fp32", strongly_typed=False,
                                                             fp16_flag=True)
    p11 = build_plan("11.0.0")
    assert p11.strongly_typed and not p11.fp16_flag and p11.onnx_precision == "fp16"
    with pytest.raises(UserError, match="not supported"):
        build_plan("8.6.1")


def test_engine_key_changes_with_every_input():
    base = dict(onnx_sha256="a" * 64, trt_version="10.13", gpu="NVIDIA H100", compute_capability="9.0",
                precision="fp16", spec=SPEC)
    k = engine_key(**base)
    assert k == engine_key(**base)
    for field, value in [("onnx_sha256", "b" * 64), ("trt_version", "11.0"), ("gpu", "NVIDIA H200"),
                         ("compute_capability", "8.9"), ("precision", "fp32"),
                         ("spec", dataclasses.replace(SPEC, max_batch=2))]:
        assert engine_key(**{**base, field: value}) != k, field
    assert engine_path(__import__("pathlib").Path("/x"), k).name == f"denoiser-fp16-{k[:16]}.plan"


def test_foreign_engine_is_refused():
    meta = {"tensorrt": "10.13", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    check_engine_meta(meta, "10.13", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "e.plan")
    with pytest.raises(UserError, match="built with TensorRT 10.13"):
        check_engine_meta(meta, "11.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "e.plan")
    with pytest.raises(UserError, match="built for NVIDIA H100"):
        check_engine_meta(meta, "10.13", {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, "e.plan")


@pytest.mark.skipif(tensorrt_status()[0] is not None, reason="TensorRT and a GPU are present here")
def test_trt_unavailable_is_one_clear_reason(ckpt):
    trt, reason = tensorrt_status()
    assert trt is None and reason
    with pytest.raises(UserError, match="engine trt"):
        load_denoiser(ckpt, EngineConfig(engine="trt"))


needs_trt = pytest.mark.skipif(tensorrt_status()[0] is None, reason=f"needs TensorRT: {tensorrt_status()[1]}")


@pytest.mark.tensorrt
@needs_trt
def test_trt_engine_builds_caches_and_matches_torch(ckpt, exported):
    from engines.trt_engine import TrtDenoiser
    from export.trt_build import build_engine

    onnx_path = exported[build_plan(tensorrt_status()[0].__version__).onnx_precision][0]
    eng_path = build_engine(onnx_path, onnx_path.parent, ckpt, parity_steps=3, log=lambda s: None)
    assert build_engine(onnx_path, onnx_path.parent, ckpt, log=lambda s: None) == eng_path  # cache hit
    parity = read_sidecar(eng_path)["parity"]
    assert parity["relative_l2"] <= 1e-2 and parity["fused_psnr_db"] >= 35
    model, _ = build_from_checkpoint(ckpt)
    ref = TorchDenoiser(model, "cuda")
    x, c, l = torch.randn(1, 3, 64, 64), torch.randn(1, 5, 64, 64), torch.rand(1)
    for graph in (False, True):
        eng = TrtDenoiser(eng_path, cuda_graph=graph)
        assert relative_l2(eng(x.cuda(), c.cuda(), l.cuda()).cpu(), ref(x, c, l).cpu()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_onnx_cuda_provider_with_io_binding(exported):
    eng = OnnxDenoiser(exported["fp32"][0], device="cuda")
    assert eng.provider == "CUDAExecutionProvider"
    x = torch.randn(1, 3, 64, 64, device="cuda")
    y = eng(x, torch.randn(1, 5, 64, 64, device="cuda"), torch.rand(1, device="cuda"))
    assert y.is_cuda and y.shape == x.shape and np.isfinite(y.cpu().numpy()).all()


@pytest.mark.slow
def test_paper_preset_exports(tmp_path):
    cfg = Configs(model=PRESETS["paper"])
    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "run", cfg, 0, randomize_output(build_model(cfg.model)).state_dict())
    spec = IOSpec(size_multiple=16, min_size=32, opt_size=64, max_size=256, max_batch=2)
    path, rep = export_onnx(ck, "fp32", spec=spec, parity_steps=2, log=lambda s: None)
    assert rep["relative_l2"] <= 1e-4
    total = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.data"))
    assert total > 350e6  # the 98 M weights are in the artifact (inline or as external data)


@pytest.mark.slow
def test_torch_compile_engine_matches_eager(ckpt):
    model, _ = build_from_checkpoint(ckpt)
    eager = TorchDenoiser(model)
    compiled = TorchDenoiser(build_from_checkpoint(ckpt)[0], compile=True)
    assert compiled.describe().startswith("torch compiled")
    x, c, l = torch.randn(1, 3, 32, 32), torch.randn(1, 5, 32, 32), torch.rand(1)
    assert relative_l2(compiled(x, c, l), eager(x, c, l)) < 1e-4
