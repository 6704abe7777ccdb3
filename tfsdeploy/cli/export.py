"""`tfsdeploy export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import long_running
from tfsdeploy.errors import UserError


def export(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint, run folder or bundle (default: the packaged "
                                           "model, or $TFSDEPLOY_MODEL)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Export the fp32 ONNX."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Export the fp16 ONNX (fp32 islands and I/O)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT FP16 engine (needs TensorRT and a GPU)."),
    aoti: bool = typer.Option(False, "--aoti", help="Also build an AOTInductor package for this machine: fp16 on "
                              "a GPU, fp32 on a CPU (minutes on a CPU; `--no-onnx --no-fp16 --aoti` builds only it)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: CKPT/export)."),
    max_batch: int = typer.Option(0, min=0, max=1024, help="Largest batch the artifacts accept (0 = 64 when a "
                                  "TensorRT engine or a GPU package is built, else 4)."),
    min_size: int = typer.Option(0, min=0, max=8192,
                                 help="Smallest image side (0 = 64, rounded to the model's multiple)."),
    max_size: int = typer.Option(0, min=0, max=8192, help="Largest image side (0 = 512)."),
    opset: int = typer.Option(18, min=18, max=30, help="ONNX opset (18 or above)."),
    parity_steps: int = typer.Option(10, min=1, max=1000, help="DDIM steps of the fused-image parity check."),
    workspace_gib: float = typer.Option(8.0, max=1024.0, help="TensorRT builder workspace."),
) -> None:
    """Export the TMFA + U-Net denoiser to ONNX (fp32, fp16), TensorRT FP16 and AOTInductor, each checked
    for parity. A bundle exports every member, each into its own folder."""
    long_running()
    from export.checkpoint_export import ExportConfig, export_checkpoint
    from tfsdeploy.artifacts import default_export_dir
    from tfsdeploy.data import reference_triplet
    from tfsdeploy.fileio import removed_if_left_empty
    from tfsdeploy.modelref import resolve_model

    if not workspace_gib > 0:
        raise UserError(f"--workspace-gib must be positive, got {workspace_gib}")
    cfg = ExportConfig(onnx=onnx, fp16=fp16, trt=trt, aoti=aoti, max_batch=max_batch, min_size=min_size,
                       max_size=max_size, opset=opset, parity_steps=parity_steps, workspace_gib=workspace_gib)
    ref = resolve_model(model)
    if ref.kind == "bundle":
        if out is not None:
            raise UserError("--out is per checkpoint; a bundle's members export beside it (or to the cache for "
                            "the packaged model)")
        members = list(ref.members().values())
    else:
        members = [ref.path]
    for member in members:
        with removed_if_left_empty(out or default_export_dir(member)):  # a failed export leaves no empty folder
            # the parity checks fuse a held-out slice
            export_checkpoint(member, cfg, out, parity_image=reference_triplet, log=typer.echo)
