"""`tfsdeploy data build`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import long_running
from tfsdeploy.config import COMBOS, DEFAULT_DATA_SOURCES
from tfsdeploy.errors import UserError


def build(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset folder (default: the user cache)."),
    size: int = typer.Option(256, min=32, max=4096, help="Side of the high-resolution images."),
    combos: str = typer.Option(",".join(COMBOS), help="Tri-modal combinations, comma separated."),
    sources: str = typer.Option(",".join(DEFAULT_DATA_SOURCES), help="Where slices come from, comma separated: spm (the registered "
                                "SPM templates), synth (patient-like slices synthesised from the SPM label and "
                                "tissue maps: skull, texture, noise, bias field, lesions)."),
    seed: int = typer.Option(0, min=0, max=2**31 - 1, help="Seed of the synthetic slices."),
    force: bool = typer.Option(False, help="Rebuild even if the dataset exists."),
) -> None:
    """Write the training dataset into ROOT/{train,val,test}/{t1,t2,func,gt}: registered tri-modal slices
    cut from the installed SPM templates and synthesised from its label maps."""
    long_running()
    from rich.progress import Progress

    from tfsdeploy.data import build_dataset, default_data_dir

    out = out or default_data_dir()
    if size % 8:
        raise UserError(f"--size must be a multiple of 8, got {size}")
    wanted = [c for c in combos.split(",") if c]
    if not any(c.strip() for c in wanted):
        raise UserError("--combos: give at least one combination")
    with Progress(transient=True) as prog:
        task = prog.add_task("making slices", total=None)
        summary = build_dataset(out, size=size, combos=wanted, sources=sources.split(","), seed=seed, force=force,
                                progress=lambda d, t: prog.update(task, completed=d, total=t))
    counts = summary["counts"]
    typer.echo(f"dataset: {out}")
    typer.echo(f"  {summary['size']}x{summary['size']}, combinations: {', '.join(summary['combos'])}")
    for split in ("train", "val", "test"):
        typer.echo(f"  {split:5s}: {counts.get(split, 0):4d} triplets")
        for name, info in summary["sources"].items():
            zs = info["slices"][split]
            typer.echo(f"         {name:5s} {info['count'][split]:4d} from {len(zs)} axial slices (z in {_ranges(zs)})")
    typer.echo(f"  ground truth: {summary['ground_truth']}")


def _ranges(zs: list[int]) -> str:
    parts, start = [], None
    for i, z in enumerate(zs):
        if start is None:
            start = z
        if i + 1 == len(zs) or zs[i + 1] != z + 1:
            parts.append(f"{start}-{z}" if z != start else f"{z}")
            start = None
    return ", ".join(parts)
