"""`tfsdeploy bundle`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import long_running, scale_values
from tfsdeploy.errors import UserError


def bundle(
    out: Path = typer.Argument(..., help="Bundle folder to write."),
    x2: Optional[Path] = typer.Option(None, help="Checkpoint for x2."),
    x4: Optional[Path] = typer.Option(None, help="Checkpoint for x4."),
    x8: Optional[Path] = typer.Option(None, help="Checkpoint for x8."),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="Store the weights in half precision."),
    notes: str = typer.Option("", help="Free text stored in bundle.json."),
    ddim_steps: str = typer.Option("", help="Recommended DDIM steps per scale, e.g. 2:2,4:2,8:2 (from a "
                                   "sampler study); used when fuse runs DDIM without --steps."),
    blend: str = typer.Option("", help="Store fine-tuned members (train --init) as a blend with the model each "
                              "started from: (1 - A) * start + A * fine-tuned, 0 < A <= 1. One A for every "
                              "fine-tuned member, or per scale, e.g. 4:0.3,8:0.5. Keeps more of the start model's behaviour on data "
                              "neither was tuned for. Default: the A each fine-tune chose on its held-out slices."),
    backproject: str = typer.Option("", help="Back-projection strength per scale, e.g. 4:0.75,8:1 (from the "
                                    "transfer study); used when fuse runs without --backproject."),
) -> None:
    """Pack one checkpoint per scale into a bundle that fuse, demo, export, evaluate and bench take."""
    long_running()
    from tfsdeploy.bundle import make_bundle

    members = {s: p for s, p in ((2, x2), (4, x4), (8, x8)) if p is not None}
    if not members:
        raise UserError("give at least one of --x2, --x4, --x8")
    steps = {}
    for item, k, v in scale_values(ddim_steps, "--ddim-steps", int, "SCALE:STEPS pairs"):
        if k not in members or v < 1:
            raise UserError(f"--ddim-steps {item!r}: no --x{k} model given, or steps < 1")
        steps[k] = v
    strengths = {}
    for item, k, v in scale_values(backproject, "--backproject", float, "SCALE:STRENGTH pairs"):
        if k not in members:
            raise UserError(f"--backproject {item!r}: no --x{k} model given")
        strengths[k] = v
    path = make_bundle(members, out, fp16=fp16, notes=notes, ddim_steps=steps, blend=_blend_option(blend, members),
                       backproject=strengths)
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    typer.echo(f"wrote {path} ({', '.join(f'x{s}' for s in sorted(members))}; {size:.1f} MB)")


def _blend_option(text: str, members: dict[int, Path]) -> dict[int, float]:
    """--blend: "A" for every fine-tuned member, or "SCALE:A,..."; each A in (0, 1] (1: the fine-tune as
    it is, whatever blend it chose)."""
    from tfsdeploy.checkpoint import read_meta

    if not text.strip():
        return {}
    tuned = [s for s, p in members.items() if read_meta(p)[1].get("init")]
    out = {}
    for item, scale, alpha in scale_values(text, "--blend", float, "A or SCALE:A pairs", scale_optional=True):
        if not 0.0 < alpha <= 1.0:
            raise UserError(f"--blend {item!r}: A must lie in (0, 1] (1: the fine-tune as it is)")
        scales = tuned if scale is None else [scale]
        if not scales:
            raise UserError("--blend: none of the models given is a fine-tune (train --init)")
        for s in scales:
            if s not in members:
                raise UserError(f"--blend {item!r}: no --x{s} model given")
            out[s] = alpha
    return out
