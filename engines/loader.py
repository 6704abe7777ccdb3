"""From an exported artifact to its engine, and from a checkpoint to the artifact an engine runs."""

from __future__ import annotations

from pathlib import Path

from tfsdeploy.artifacts import default_export_dir, read_sidecar, verify_source
from tfsdeploy.checkpoint import Configs
from tfsdeploy.config import ARTIFACT_FILES, ARTIFACT_SUFFIXES, ENGINES, artifact_engine
from tfsdeploy.diffusion import Denoiser
from tfsdeploy.errors import UserError


def load_artifact(path: str | Path, device: str = "auto", threads: int = 0,
                  cuda_graph: bool = False) -> tuple[Denoiser, Configs]:
    """An exported .onnx (ONNX Runtime) or .plan / .engine (TensorRT) -> (denoiser, the configs its
    sidecar carries)."""
    path = Path(path)
    kind = artifact_engine(path)
    if kind == "onnx":
        from engines.onnx_engine import OnnxDenoiser

        d = OnnxDenoiser(path, device=device, threads=threads)
    elif kind == "trt":
        from engines.trt_engine import TrtDenoiser

        d = TrtDenoiser(path, cuda_graph=cuda_graph)
    else:
        raise UserError(f"{path}: not an exported artifact (expected {', '.join(ARTIFACT_SUFFIXES)})")
    return d, Configs.from_json(d.meta["configs"])


def find_artifact(ckpt: str | Path, engine: str, export_dir: str | Path | None = None) -> Path:
    """The exported artifact for `engine`, valid for this checkpoint (hash-checked), or a UserError
    that says what is wrong and how to fix it."""
    if engine not in ARTIFACT_FILES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    export_dir = Path(export_dir) if export_dir else default_export_dir(ckpt)
    if engine == "trt":
        from engines.trt_engine import check_engine_meta, gpu_identity, tensorrt_status

        trt, reason = tensorrt_status()
        if trt is None:
            raise UserError(f"engine trt: {reason}")
        gpu = gpu_identity()
        candidates = []
        for p in sorted(export_dir.glob(ARTIFACT_FILES["trt"])):
            try:
                check_engine_meta(read_sidecar(p), trt.__version__, gpu, p)
                candidates.append(p)
            except UserError:
                continue
        if not candidates:
            raise UserError(f"no TensorRT engine in {export_dir} for TensorRT {trt.__version__} on {gpu['gpu']}; "
                            f"run `tfsdeploy export {ckpt} --trt`")
        path = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        path = export_dir / ARTIFACT_FILES[engine]
        if not path.is_file():
            precision = "fp16" if engine == "onnx-fp16" else "fp32"
            flag = " --fp16" if precision == "fp16" else ""
            raise UserError(f"no {precision} ONNX in {export_dir}; run `tfsdeploy export {ckpt}{flag}`")
    verify_source(read_sidecar(path), ckpt, path)
    return path
