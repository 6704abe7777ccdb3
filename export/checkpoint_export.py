"""One checkpoint -> every artifact asked for (fp32 / fp16 ONNX, a TensorRT FP16 engine, an
AOTInductor package) in one folder, each written only after its parity check passes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tfsdeploy.config import MAX_BATCH
from tfsdeploy.errors import UserError
from tfsdeploy.inputs import Triplet


@dataclass(frozen=True)
class ExportConfig:
    onnx: bool = True  # the fp32 ONNX
    fp16: bool = True  # the fp16 ONNX (fp32 islands and I/O)
    trt: bool = False  # a TensorRT FP16 engine (needs TensorRT and a GPU)
    aoti: bool = False  # an AOTInductor package for this machine
    max_batch: int = 0  # 0 = the scan cap of the device the artifacts are for (config.MAX_BATCH)
    min_size: int = 0  # 0 = 64, rounded to the model's multiple
    max_size: int = 0  # 0 = 512
    opset: int = 18
    parity_steps: int = 10  # DDIM steps of the fused-image parity check
    workspace_gib: float = 8.0  # TensorRT builder workspace


def default_max_batch(cfg: ExportConfig) -> int:
    """The largest batch artifacts accept when not told: a GPU's scan batch when any of them runs
    on a GPU (a TensorRT engine, which builds from the ONNX, or a CUDA package), else a CPU's."""
    import torch

    gpu = cfg.trt or (cfg.aoti and torch.cuda.is_available())
    return MAX_BATCH["cuda" if gpu else "cpu"]


def export_checkpoint(model: Path, cfg: ExportConfig, out: Path | None = None,
                      parity_image: Callable[[int], Triplet] | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Path]:
    """Export the denoiser of checkpoint `model` into `out` (default: its export folder), as `cfg`
    asks, and return what was written by kind (fp32, fp16, trt, aoti). `parity_image(side)` gives
    the triplet the fused-image parity checks run on (a held-out slice; default: a phantom)."""
    from engines.trt_engine import tensorrt_status
    from export.onnx_export import default_spec, export_onnx
    from export.trt_build import build_engine, build_plan
    from tfsdeploy.artifacts import EXPORT_FILES, default_export_dir
    from tfsdeploy.checkpoint import build_from_checkpoint, read_meta
    from tfsdeploy.fileio import check_output

    out = out or default_export_dir(model)
    # The checkpoint's own files are its inputs: its export folder lies beside them by design.
    source, _ = read_meta(model)
    check_output(out, [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source],
                 owns=EXPORT_FILES, what="an exported artifact or its sidecar")
    net, _ = build_from_checkpoint(model)
    spec = default_spec(net, max_batch=cfg.max_batch or default_max_batch(cfg), min_size=cfg.min_size,
                        max_size=cfg.max_size)
    trt_mod, trt_reason = tensorrt_status() if cfg.trt else (None, "")
    precisions = [p for p, on in (("fp32", cfg.onnx), ("fp16", cfg.fp16)) if on]
    if trt_mod is not None and build_plan(trt_mod.__version__).onnx_precision not in precisions:
        precisions.append(build_plan(trt_mod.__version__).onnx_precision)
    if not precisions and not cfg.trt and not cfg.aoti:
        raise UserError("nothing to export: pass --onnx, --fp16, --trt or --aoti")
    log(f"exporting {model} -> {out} (batch {spec.min_batch}..{spec.max_batch}, "
        f"size {spec.min_size}..{spec.max_size}, multiple of {spec.size_multiple}, opset {cfg.opset})")
    done: dict[str, Path] = {}
    image = parity_image(spec.opt_size) if parity_image is not None else None
    for p in precisions:
        path, rep = export_onnx(model, p, out, spec, cfg.opset, cfg.parity_steps, image, log=log)
        done[p] = path
        log(f"  {path.name}: parity vs torch fp32: relative L2 {rep['relative_l2']:.2e} "
            f"(limit {rep['limits']['max_relative_l2']:g}), fused PSNR {rep['fused_psnr_db']:.1f} dB "
            f"(limit {rep['limits']['min_fused_psnr_db']:g}, DDIM-{rep['ddim_steps']}, {rep['size']}px, "
            f"{rep['provider']})")
    if cfg.trt:
        if trt_mod is None:
            written = "; the ONNX files above were written" if done else ""
            raise UserError(f"--trt: {trt_reason}{written}")
        onnx_path = done[build_plan(trt_mod.__version__).onnx_precision]
        done["trt"] = build_engine(onnx_path, out, model, cfg.workspace_gib, cfg.parity_steps, image, log=log)
        log(f"  {done['trt'].name}: TensorRT FP16 engine")
    if cfg.aoti:
        from export.aoti_export import export_aoti

        done["aoti"], rep = export_aoti(model, out, "auto", spec, cfg.parity_steps, image, log=log)
        log(f"  {done['aoti'].name}: AOTInductor package, parity vs torch fp32: relative L2 "
            f"{rep['relative_l2']:.2e}, fused PSNR {rep['fused_psnr_db']:.1f} dB")
    return done
