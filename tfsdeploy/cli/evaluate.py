"""`tfsdeploy evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import engine_config, long_running, parse_scales, progress_bar
from tfsdeploy.config import BACKPROJECT_MAX
from tfsdeploy.fileio import check_output


def evaluate(
    model: list[Path] = typer.Option([], "--model", "-m", help="Checkpoint, run folder or exported artifact; "
                                     "repeat for several (ablations)."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (default: the built SPM dataset)."),
    split: str = typer.Option("test", help="Split to evaluate: train, val or test."),
    scales: str = typer.Option("2,4,8", help="Scales, comma separated."),
    methods: str = typer.Option("classical,laplacian,guided", help="Upsample-then-fuse baselines."),
    sampler: str = typer.Option("ddim", help="ddim or ddpm."),
    steps: int = typer.Option(0, min=0, help="Sampler steps (0 = the sampler's default, as in fuse)."),
    spacing: str = typer.Option("linear", help="Step spacing: linear, quadratic or trailing."),
    backproject: Optional[float] = typer.Option(None, min=0, max=BACKPROJECT_MAX,
                                                help="Back-projection strength of the models' inputs (see fuse; "
                                                "default: each bundle's recommendation)."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1),
    engine: str = typer.Option("auto", help="Engine for the models (see fuse)."),
    limit: int = typer.Option(0, min=0, help="Evaluate at most N images (0 = all)."),
    size: int = typer.Option(0, min=0, max=4096, help="Image side (0 = the first model's training size)."),
    montage_image: str = typer.Option("", help="Image name shown in the montage (default: the middle one)."),
    lpips_backbone: Optional[Path] = typer.Option(None, help="AlexNet weights file for LPIPS."),
    lpips_lin: Optional[Path] = typer.Option(None, help="LPIPS v0.1 alex linear weights file."),
    out: Path = typer.Option(Path("reports/eval"), "--out", "-o", help="Report folder."),
    threads: int = typer.Option(0, min=0, max=1024, help="CPU threads for torch (0 = default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Table-1 style metrics of each baseline and model, per scale, with a Fig-2 style montage."""
    long_running()
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.tools.evaluate import REPORT_FILES, EvalConfig, evaluation_inputs
    from tfsdeploy.tools.evaluate import evaluate as run_evaluation

    check_output(out, [*model, data, lpips_backbone, lpips_lin], owns=REPORT_FILES, what="a report's file")
    cfg = EvalConfig(split=split, scales=parse_scales(scales) or (), methods=tuple(m for m in methods.split(",") if m),
                     sample=SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed,
                                         backproject=backproject), engine=engine,
                     limit=limit, size=size, montage_image=montage_image)
    entries, samples = evaluation_inputs(list(model), data, cfg, engine_config(engine, threads=threads, long_job=True),
                                         typer.echo)
    with progress_bar("evaluate", progress) as bar:
        summary = run_evaluation(entries, samples, out, cfg, lpips_backbone, lpips_lin, progress=bar, log=typer.echo)
    for scale, tables in summary["tables"].items():
        typer.echo(f"{scale}: " + "; ".join(f"{k} {v['PSNR']:.2f} dB / {v['SSIM']:.4f}"
                                            for k, v in tables["reference"].items()))
    typer.echo(f"wrote {out}/report.md, table1_x*.md/.csv, values.json and montage.png")
