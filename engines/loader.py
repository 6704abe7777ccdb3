"""One loader: from a checkpoint or an exported artifact to a Denoiser plus the configs to sample with."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tfsdeploy.artifacts import default_export_dir, read_sidecar, verify_source
from tfsdeploy.checkpoint import Configs, build_from_checkpoint
from tfsdeploy.errors import UserError

ENGINES = ("auto", "torch", "onnx", "onnx-fp16", "trt")
ENGINE_SUFFIXES = (".plan", ".engine")


def load_denoiser(path: str | Path, device: str = "auto", threads: int = 0, cuda_graph: bool = False,
                  compile: bool = False):
    """Pick the implementation from the artifact: .onnx -> ONNX Runtime, .plan -> TensorRT, anything
    else is a checkpoint -> torch. Returns (denoiser, Configs)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from engines.onnx_engine import OnnxDenoiser

        d = OnnxDenoiser(path, device=device, threads=threads)
        return d, Configs.from_json(d.meta["configs"])
    if path.suffix in ENGINE_SUFFIXES:
        from engines.trt_engine import TrtDenoiser

        d = TrtDenoiser(path, cuda_graph=cuda_graph)
        return d, Configs.from_json(d.meta["configs"])
    import torch

    from engines.torch_engine import TorchDenoiser

    model, ck = build_from_checkpoint(path)
    dev = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    return TorchDenoiser(model, dev, compile=compile), ck.configs


def find_artifact(ckpt: str | Path, engine: str, export_dir: str | Path | None = None) -> Path:
    """The exported artifact for `engine`, valid for this checkpoint (hash-checked), or a UserError
    that says what is wrong and how to fix it."""
    export_dir = Path(export_dir) if export_dir else default_export_dir(ckpt)
    if engine in ("onnx", "onnx-fp16"):
        precision = "fp16" if engine == "onnx-fp16" else "fp32"
        path = export_dir / f"denoiser-{precision}.onnx"
        if not path.is_file():
            flag = " --fp16" if precision == "fp16" else ""
            raise UserError(f"no {precision} ONNX in {export_dir}; run `tfsdeploy export {ckpt}{flag}`")
    elif engine == "trt":
        from export.trt_build import check_engine_meta, gpu_identity, tensorrt_status

        trt, reason = tensorrt_status()
        if trt is None:
            raise UserError(f"engine trt: {reason}")
        gpu = gpu_identity()
        candidates = []
        for p in sorted(export_dir.glob("denoiser-fp16-*.plan")):
            try:
                meta = read_sidecar(p)
                check_engine_meta(meta, trt.__version__, gpu, p)
                candidates.append(p)
            except UserError:
                continue
        if not candidates:
            raise UserError(f"no TensorRT engine in {export_dir} for TensorRT {trt.__version__} on {gpu['gpu']}; "
                            f"run `tfsdeploy export {ckpt} --trt`")
        path = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    verify_source(read_sidecar(path), ckpt, path)
    return path


def select_engine(ckpt: str | Path, engine: str = "auto", export_dir: str | Path | None = None,
                  threads: int = 0, cuda_graph: bool = False, compile: bool = False,
                  log: Callable[[str], None] = lambda s: None):
    """The denoiser for `fuse`. `auto` takes the fastest engine that is present and valid for the
    checkpoint: TensorRT on a GPU, then ONNX Runtime fp32, then torch. Returns (denoiser, Configs)."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if Path(ckpt).suffix in (".onnx", *ENGINE_SUFFIXES):
        if engine not in ("auto", "trt" if Path(ckpt).suffix in ENGINE_SUFFIXES else "onnx", "onnx-fp16"):
            raise UserError(f"{ckpt} is an exported artifact; it cannot run on engine {engine}")
        return load_denoiser(ckpt, threads=threads, cuda_graph=cuda_graph)
    if engine == "torch":
        return load_denoiser(ckpt, threads=threads, compile=compile)
    if engine != "auto":
        return load_denoiser(find_artifact(ckpt, engine, export_dir), threads=threads, cuda_graph=cuda_graph)
    for candidate in ("trt", "onnx"):
        try:
            path = find_artifact(ckpt, candidate, export_dir)
        except UserError as e:
            log(f"auto: skipping {candidate}: {e}")
            continue
        return load_denoiser(path, threads=threads, cuda_graph=cuda_graph)
    return load_denoiser(ckpt, threads=threads, compile=compile)
