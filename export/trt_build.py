"""ONNX -> TensorRT FP16 engine, for TensorRT 10.x and 11.x, with a timing cache and a keyed engine cache.

- TensorRT 10: the fp32 ONNX, weakly typed, with the FP16 builder flag; norms, softmax and the
  sinusoids are pinned to fp32 with precision constraints.
- TensorRT 11 (no FP16 flag): the fp16 ONNX in a strongly typed network, so precision comes from
  the graph's own types (fp16 weights, fp32 islands, fp32 I/O).

An engine is cached under a key made of the ONNX sha256, the TensorRT version, the GPU name and
compute capability, the precision and the optimisation profile. A cached engine whose key differs
is never used; it is rebuilt (or, when loading, refused with the reason).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engines.trt_engine import gpu_identity, tensorrt_status
from tfsdeploy.artifacts import read_sidecar, sidecar_path, write_sidecar
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.inputs import Triplet
from tfsdeploy.iospec import IOSpec


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise UserError(f"cannot parse TensorRT version {version!r}") from None


@dataclass(frozen=True)
class BuildPlan:
    """How to build for one TensorRT major version."""

    onnx_precision: str  # which exported ONNX to parse
    strongly_typed: bool
    fp16_flag: bool


def build_plan(version: str) -> BuildPlan:
    if trt_major(version) >= 11:
        return BuildPlan(onnx_precision="fp16", strongly_typed=True, fp16_flag=False)
    if trt_major(version) == 10:
        return BuildPlan(onnx_precision="fp32", strongly_typed=False, fp16_flag=True)
    raise UserError(f"TensorRT {version} is not supported; use 10.x or 11.x")


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, compute_capability: str, precision: str,
               spec: IOSpec) -> str:
    """The engine cache key: any change in these makes a different engine."""
    payload = {"onnx": onnx_sha256, "tensorrt": trt_version, "gpu": gpu, "cc": compute_capability,
               "precision": precision, "profile": {k: [list(s) for s in v] for k, v in spec.profile().items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_path(out_dir: Path, key: str, precision: str = "fp16") -> Path:
    return out_dir / f"denoiser-{precision}-{key[:16]}.plan"


def build_engine(onnx_path: Path, out_dir: Path, ckpt: str | Path, workspace_gib: float = 8.0,
                 parity_steps: int = 10, parity_image: Triplet | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Build (or reuse a matching cached) FP16 engine from an exported ONNX and its sidecar.

    A new engine passes the same parity gate as the ONNX files (one call, and a whole fused image,
    against torch fp32 from `ckpt`, the fp16 limits) before it is published; its sidecar records
    the result. An engine that misses the limits is deleted and the build fails."""
    trt, reason = tensorrt_status()
    if trt is None:
        raise UserError(f"--trt: {reason}")
    onnx_meta = read_sidecar(onnx_path)
    spec = IOSpec.from_json(onnx_meta["io"])
    gpu = gpu_identity()
    key = engine_key(onnx_meta["sha256"], trt.__version__, gpu["gpu"], gpu["compute_capability"], "fp16", spec)
    target = engine_path(out_dir, key)
    if target.is_file():
        try:
            meta = read_sidecar(target)
            if meta.get("key") == key:
                log(f"engine cache hit: {target.name}")
                return target
        except UserError:
            pass  # a stale or half-written engine: rebuild it
    plan = build_plan(trt.__version__)
    if onnx_meta.get("precision") != plan.onnx_precision:
        raise UserError(f"TensorRT {trt.__version__} builds from the {plan.onnx_precision} ONNX, got "
                        f"{onnx_meta.get('precision')}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
        _pin_fp32_islands(trt, network, config)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_file = out_dir / f"timing-trt{trt.__version__}-{gpu['gpu'].replace(' ', '_')}.cache"
    timing = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(timing, False)

    log(f"building TensorRT {trt.__version__} FP16 engine for {gpu['gpu']} (this takes minutes)")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT failed to build the engine (see the messages above)")
    build_s = time.perf_counter() - t0
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {"kind": "tensorrt", "precision": "fp16", "key": key, "tensorrt": trt.__version__, **gpu,
            "strongly_typed": plan.strongly_typed, "onnx": {"file": onnx_path.name, "sha256": onnx_meta["sha256"]},
            "io": onnx_meta["io"], "checkpoint": onnx_meta["checkpoint"], "configs": onnx_meta["configs"],
            "versions": onnx_meta.get("versions", {}), "build_s": round(build_s, 1)}
    # Publish only after parity: an old sidecar never describes a new file, and the sidecar goes last.
    sidecar_path(target).unlink(missing_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(bytes(serialized))
        report = _engine_parity(tmp, meta, ckpt, spec, parity_steps, parity_image, log)
    write_sidecar(target, {**meta, "parity": report})
    return target


def _engine_parity(path: Path, meta: dict[str, Any], ckpt: str | Path, spec: IOSpec, steps: int,
                   image: Triplet | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Run a freshly built engine against torch fp32 on the GPU; raise (so nothing is published)
    when it misses the fp16 limits."""
    from engines.torch_engine import TorchDenoiser
    from engines.trt_engine import TrtDenoiser
    from export.parity import parity_condition, parity_report
    from tfsdeploy.checkpoint import build_from_checkpoint
    from tfsdeploy.diffusion import Diffusion

    model, ck = build_from_checkpoint(ckpt)
    engine = TrtDenoiser(path, meta=meta)
    reference = TorchDenoiser(model, engine.device)
    report, problems = parity_report("fp16", reference, engine, Diffusion.from_configs(ck.configs), spec,
                                     parity_condition(spec, image), steps)
    if problems:
        raise UserError(f"TensorRT engine failed parity against torch fp32: {'; '.join(problems)}; nothing was written")
    log(f"  TensorRT parity vs torch fp32: relative L2 {report['relative_l2']:.2e}, fused PSNR "
        f"{report['fused_psnr_db']:.1f} dB")
    return report


def _pin_fp32_islands(trt, network, config) -> None:
    """TensorRT 10 weak typing: keep normalisation, the attention's logits (every matrix product:
    the attention's two and the small embedding layers), softmax and the sinusoids in fp32."""
    keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.MATRIX_MULTIPLY}
    trig = {getattr(trt.UnaryOperation, n) for n in ("SIN", "COS") if hasattr(trt.UnaryOperation, n)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in keep
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            pin = layer.op in trig
        if pin:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
