"""From an exported artifact to its engine, and from a checkpoint to the artifact an engine runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tfsdeploy.artifacts import checkpoint_fingerprint, compiled_cache_dir, default_export_dir, read_sidecar, verify_source
from tfsdeploy.checkpoint import Configs
from tfsdeploy.config import ARTIFACT_FILES, ARTIFACT_SUFFIXES, ENGINES, artifact_engine
from tfsdeploy.diffusion import Denoiser
from tfsdeploy.errors import UserError


def load_artifact(path: str | Path, device: str = "auto", threads: int = 0,
                  cuda_graph: bool = False) -> tuple[Denoiser, Configs]:
    """An exported .onnx (ONNX Runtime), .plan / .engine (TensorRT) or .pt2 (AOTInductor) ->
    (denoiser, the configs its sidecar carries)."""
    path = Path(path)
    kind = artifact_engine(path)
    if kind == "onnx":
        from engines.onnx_engine import OnnxDenoiser

        d = OnnxDenoiser(path, device=device, threads=threads)
    elif kind == "trt":
        from engines.trt_engine import TrtDenoiser

        d = TrtDenoiser(path, cuda_graph=cuda_graph)
    elif kind == "aoti":
        from engines.aoti_engine import AotiDenoiser

        d = AotiDenoiser(path)
        if device not in ("auto", d.device.type):
            raise UserError(f"{path} runs on {d.device.type}, not on {device}")
    else:
        raise UserError(f"{path}: not an exported artifact (expected {', '.join(ARTIFACT_SUFFIXES)})")
    return d, Configs.from_json(d.meta["configs"])


def _newest_valid(paths: list[Path], check: Callable[[dict[str, Any], Path], None]) -> tuple[Path | None, list[str]]:
    """The newest of `paths` whose sidecar passes `check`, and why each other one was skipped."""
    valid, skipped = [], []
    for p in paths:
        try:
            check(read_sidecar(p), p)
            valid.append(p)
        except UserError as e:
            skipped.append(str(e))
    return (max(valid, key=lambda p: p.stat().st_mtime) if valid else None), skipped


def find_artifact(ckpt: str | Path, engine: str, export_dir: str | Path | None = None,
                  device: str = "auto") -> Path:
    """The exported artifact for `engine`, valid for this checkpoint (hash-checked) and this machine,
    or a UserError that says what is wrong and how to fix it."""
    if engine not in ARTIFACT_FILES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    export_dir = Path(export_dir) if export_dir else default_export_dir(ckpt)
    if engine == "trt":
        from engines.trt_engine import check_engine_meta, gpu_identity, tensorrt_status

        trt, reason = tensorrt_status()
        if trt is None:
            raise UserError(f"engine trt: {reason}")
        gpu = gpu_identity()
        path, skipped = _newest_valid(sorted(export_dir.glob(ARTIFACT_FILES["trt"])),
                                      lambda meta, p: check_engine_meta(meta, trt.__version__, gpu, p))
        if path is None:
            raise UserError(f"no TensorRT engine in {export_dir} for TensorRT {trt.__version__} on {gpu['gpu']}"
                            + "".join(f" ({s})" for s in skipped) + f"; run `tfsdeploy export {ckpt} --trt`")
    elif engine == "aoti":
        return find_package(ckpt, export_dir, device)  # it checks the source checkpoint itself
    else:
        path = export_dir / ARTIFACT_FILES[engine]
        if not path.is_file():
            precision = "fp16" if engine == "onnx-fp16" else "fp32"
            flag = " --fp16" if precision == "fp16" else ""
            raise UserError(f"no {precision} ONNX in {export_dir}; run `tfsdeploy export {ckpt}{flag}`")
    verify_source(read_sidecar(path), ckpt, path)
    return path


def find_package(ckpt: str | Path, export_dir: Path, device: str = "auto") -> Path:
    """The newest AOTInductor package for this checkpoint that runs here (this torch, this GPU or
    CPU instruction set, `device` unless "auto"), from the export folder or the compiled cache."""
    import torch

    from engines.aoti_engine import check_package_meta

    sha = checkpoint_fingerprint(ckpt)["sha256"]
    where = [export_dir, compiled_cache_dir(sha)]
    paths = [p for d in where for p in sorted(d.glob(ARTIFACT_FILES["aoti"]))]

    def check(meta: dict[str, Any], p: Path) -> None:
        if meta.get("checkpoint", {}).get("sha256") != sha:
            raise UserError(f"{p} was exported from a different checkpoint (or it changed since)")
        if device != "auto" and meta.get("device") != device:
            raise UserError(f"{p} is for {meta.get('device')}, not {device}")
        check_package_meta(meta, p)

    path, skipped = _newest_valid(paths, check)
    if path is None:
        here = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        raise UserError(f"no AOTInductor package for torch {torch.__version__} on {here} in {export_dir}"
                        + "".join(f" ({s})" for s in skipped) + f"; run `tfsdeploy export {ckpt} --aoti`")
    return path
