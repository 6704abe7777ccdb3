"""`tfsdeploy demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import engine_config, progress_bar
from tfsdeploy.fileio import check_output


def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Output folder."),
    scale: int = typer.Option(4, help="Super-resolution factor: 2, 4 or 8."),
    combo: str = typer.Option("t1-t2-spect", help="Which SPM templates: t1-t2-spect, t1-t2-pet, t1-pd-spect "
                              "or t1-pd-pet."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint, run folder or bundle "
                                         "(default: the packaged model)."),
    engine: str = typer.Option("auto", help="auto, torch, onnx, onnx-fp16 or trt (see fuse)."),
    steps: int = typer.Option(0, min=0, help="Denoiser calls (0 = the default sampler's)."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Cut a held-out triplet from the installed SPM templates, fuse it, and show it beside the baseline."""
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.data import reference_triplet
    from tfsdeploy.inputs import check_scale
    from tfsdeploy.pipeline import FusionPipeline
    from tfsdeploy.tools.demo import DEMO_FILES, run_demo

    size = 256
    check_scale(scale)
    check_output(out, [model], owns=DEMO_FILES, what="a file of the demo")
    pipe = FusionPipeline.load(model, scale, SampleConfig(steps=steps, seed=seed), engine_config(engine))
    with progress_bar("demo", progress):
        r = run_demo(pipe, reference_triplet(size, combo), out, size)
    for label, v in r["scores"].items():
        typer.echo(f"{label:>20}: PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f} against the HR classical fusion")
    typer.echo(f"fused in {r['seconds']:.1f} s ({pipe.describe()})")
    typer.echo(f"wrote {out}/t1.png, t2.png, func.png (inputs, {r['input_side']} px), fused.png, baseline.png, "
               f"reference.png and side_by_side.png")
