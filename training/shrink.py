"""Shrink a bundle member's predicted residual towards the upsample-then-fuse baseline.

A TFS-Diff member of the packaged kind predicts the clean residual over the baseline (x0-prediction,
target "residual"), and its last layer is a convolution with nothing after it. Scaling that
convolution's weight and bias by alpha therefore scales every prediction by alpha: alpha = 1 is the
member as it is, alpha = 0 is exactly the baseline. Where a member's residual is right in direction
but too large for data it was not trained on, a smaller alpha keeps part of the gain and bounds the
loss (benchmarks/transfer_study.py --alphas measures it).

    python -m training.shrink BUNDLE --scale 2 --alpha 0.3 [--ddim-steps 1] [--out NEW_BUNDLE]

rewrites the member in place (or into a copy of the bundle: bundle.json and the members' files; an
existing --out is replaced only when it holds nothing else), atomically: its file, its sha256 in
bundle.json, `residual_alpha` there and in the member's header (which also records the sha256 of the
weights it was made from), with --ddim-steps the member's recommended DDIM step count, and with
--backproject the strength of the back-projection its inputs are upsampled with
(tfsdeploy.inputs.upsample; 0 removes it) and with --backproject-gate LO,HI a noise gate on that
strength (each slice gets all of it up to a noise ratio of LO and none from HI on:
tfsdeploy.inputs.gated_strength; `none` removes it). Without --alpha the member's file is kept as it is. In
place, only the member's file and bundle.json change, together; nothing else in the folder is
touched. The packaged model (`default`) is never rewritten in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tfsdeploy.bundle import BUNDLE_FILE, BUNDLE_OWNS, DEFAULT_BUNDLE, check_backproject, check_backproject_gate
from tfsdeploy.checkpoint import read_meta, sha256_file
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_dir, atomic_outputs, check_output, write_safetensors
from tfsdeploy.model import FINAL_CONV
from tfsdeploy.modelref import resolve_model



def shrink_member(bundle: str | Path, scale: int, alpha: float | None, ddim_steps: int = 0,
                  out: str | Path | None = None, notes: str | None = None,
                  backproject: float | None = None, gate: tuple[float, float] | str | None = None) -> Path:
    """Write `bundle` (to `out`, default: in place) with member x`scale` shrunk by `alpha` (None:
    as it is), recommending `ddim_steps` (0: as it was), a back-projection strength (None: as it
    was) and its noise `gate` ((lo, hi); "none" removes it; None: as it was), and with `notes`
    (None: as they were)."""

    from safetensors.torch import load_file

    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must lie in [0, 1], got {alpha}")
    ref = resolve_model(bundle, kind="bundle")
    source = ref.path  # `default`: the packaged bundle
    in_place = out is None or (Path(out).exists() and os.path.samefile(out, source))
    if in_place and source.resolve() == DEFAULT_BUNDLE:
        raise UserError(f"{bundle}: the packaged model is not rewritten in place; give --out for a new bundle")
    manifest = ref.manifest
    files = tuple(e["file"] for e in manifest["models"].values())
    if not in_place:
        check_output(out, [source], owns=(*BUNDLE_OWNS, *files), what="a file of a bundle")
    entry = manifest["models"].get(str(scale))
    if entry is None:
        raise UserError(f"{source}: no x{scale} member")
    src = ref.member(scale)  # checked against its sha256
    _, meta = read_meta(src)
    diffusion = meta.get("diffusion", {})
    if diffusion.get("prediction") != "x0" or diffusion.get("target") != "residual":
        raise UserError(f"{src}: only an x0-prediction model of the residual can be shrunk this way")
    if alpha is not None and "residual_alpha" in meta:
        raise UserError(f"{src}: already shrunk (alpha {meta['residual_alpha']}); shrink the member it came from")
    if backproject is not None:
        check_backproject(scale, backproject)
    if gate not in (None, "none"):
        check_backproject_gate(scale, gate)
    if ddim_steps < 0 or ddim_steps > meta.get("schedule", {}).get("num_steps", 0):
        raise UserError(f"x{scale}: {ddim_steps} DDIM steps is not a step count of this schedule")
    if alpha is not None:
        weights = load_file(str(src))
        missing = [k for k in FINAL_CONV if k not in weights]
        if missing:
            raise UserError(f"{src}: no {', '.join(missing)}; not a TFS-Diff network")
        for k in FINAL_CONV:
            weights[k] = (weights[k].float() * alpha).to(weights[k].dtype)
        meta = {**meta, "residual_alpha": alpha, "residual_alpha_of": entry["sha256"]}
    # In place, the member's file (if it changes) and bundle.json are replaced together and nothing
    # else in the folder is touched; a new bundle gets bundle.json and the members' files.
    changed = [entry["file"]] if alpha is not None else []
    dest = source if in_place else Path(out)
    names = [*changed, BUNDLE_FILE] if in_place else [*files, BUNDLE_FILE]
    with (atomic_outputs(*(dest / n for n in names)) if in_place else atomic_dir(dest)) as staged:
        stage = staged[0].parent if in_place else staged
        for name in files:
            if not in_place and name not in changed:
                shutil.copy2(source / name, stage / name)
        if alpha is not None:
            write_safetensors({k: v.contiguous() for k, v in weights.items()}, stage / entry["file"],
                              metadata={"tfsdeploy": json.dumps(meta, sort_keys=True)})
            entry = {**entry, "sha256": sha256_file(stage / entry["file"]), "residual_alpha": alpha}
        if ddim_steps:
            entry["ddim_steps"] = ddim_steps
        if backproject is not None:
            entry = {k: v for k, v in entry.items() if k != "backproject"}
            if backproject:
                entry["backproject"] = backproject
        if gate is not None:
            entry = {k: v for k, v in entry.items() if k != "backproject_gate"}
            if gate != "none":
                entry["backproject_gate"] = [float(v) for v in gate]
        if entry.get("backproject_gate") and not entry.get("backproject"):
            raise UserError(f"x{scale}: a noise gate needs a back-projection strength to gate (--backproject)")
        manifest["models"][str(scale)] = entry
        if notes is not None:
            manifest["notes"] = notes
        (stage / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest


def _gate(text: str) -> tuple[float, float] | str:
    if text == "none":
        return text
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give LO,HI (two numbers) or none, got {text!r}") from None
    return lo, hi


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="the bundle to read (`default`: the packaged model)")
    ap.add_argument("--scale", type=int, required=True)
    ap.add_argument("--alpha", type=float, default=None, help="residual scale in [0, 1] (default: keep the weights)")
    ap.add_argument("--ddim-steps", type=int, default=0, help="the member's recommended DDIM steps (0: keep)")
    ap.add_argument("--backproject", type=float, default=None,
                    help="back-projection strength of the member's inputs (0: none; default: keep)")
    ap.add_argument("--backproject-gate", default=None, type=_gate,
                    help="LO,HI: the noise ratios where the strength starts to fall and where it is 0 "
                         "(`none`: remove; default: keep)")
    ap.add_argument("--out", type=Path, default=None, help="write a new bundle here instead of in place")
    ap.add_argument("--notes", default=None, help="replace the bundle's notes")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        print(shrink_member(args.bundle, args.scale, args.alpha, args.ddim_steps, args.out, args.notes,
                            args.backproject, args.backproject_gate))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
