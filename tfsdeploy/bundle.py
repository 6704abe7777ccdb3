"""Model bundles: one checkpoint per scale behind one name, and the default model that ships.

A bundle is a folder holding `bundle.json` and one self-describing checkpoint file per scale
(safetensors whose header carries the configs, as `tfsdeploy.checkpoint` writes them):

    bundle.json   {"format": "tfsdeploy-bundle", "models": {"4": {"file": "x4.safetensors",
                   "sha256": "...", "ddim_steps": 2}, ...}, "notes": "..."}
    x2.safetensors  x4.safetensors  x8.safetensors

Everything that takes `--model` takes a bundle too; the scale decides which checkpoint runs
(tfsdeploy.modelref reads a bundle; this module writes one and checks its manifest). A
member may carry the DDIM step count that a sampler study chose for it (`ddim_steps`); it replaces
the general default when DDIM runs with no `--steps`. It may also carry the strength of the
back-projection its inputs are upsampled with (`backproject`, tfsdeploy.inputs.upsample; absent:
0, plain bicubic), which `--backproject` replaces. The packaged default model is such a bundle
(see MODEL_CARD.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tfsdeploy.checkpoint import read_meta, sha256_file
from tfsdeploy.config import BACKPROJECT_MAX, SCALES, valid_gate
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_dir, check_output, write_safetensors

if TYPE_CHECKING:
    import torch

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "tfsdeploy-bundle"
BUNDLE_FORMAT_VERSION = 1
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "default"
# What a bundle folder holds: an existing one is replaced only when it holds nothing else.
BUNDLE_OWNS = (BUNDLE_FILE, *(f"x{s}.safetensors" for s in SCALES))

# The fields of one member's entry: name -> (check, what it must be).
_MEMBER_FIELDS = {
    "file": (lambda v: isinstance(v, str) and Path(v).name == v and v not in ("", ".", ".."),
             "a file name in the bundle folder"),
    "sha256": (lambda v: isinstance(v, str), "a string"),
    "step": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "ddim_steps": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "trained_scales": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
    "blend": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1, "a number in [0, 1]"),
    "backproject": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= BACKPROJECT_MAX,
                    f"a number from 0 to {BACKPROJECT_MAX}"),
    "backproject_gate": (valid_gate, "two noise ratios [lo, hi] with 0 <= lo < hi"),
}
_REQUIRED = ("file", "sha256")


def check_bundle_meta(file: Path, meta: dict[str, Any]) -> None:
    """Validate bundle.json against its schema (module docstring); one line naming the file and the field."""
    if "format_version" in meta and not _is_int(meta["format_version"]):
        raise UserError(f"{file}: 'format_version' must be an integer, got {meta['format_version']!r}")
    if not isinstance(meta.get("notes", ""), str):
        raise UserError(f"{file}: 'notes' must be a string")
    models = meta.get("models")
    if not isinstance(models, dict) or not models:
        raise UserError(f"{file}: 'models' must be a JSON object with one entry per scale")
    for scale, entry in models.items():
        if not (scale.isdigit() and int(scale) in SCALES):
            raise UserError(f"{file}: 'models' has a key {scale!r}; keys are scales "
                            f"({', '.join(map(str, SCALES))})")
        if not isinstance(entry, dict):
            raise UserError(f"{file}: 'models.{scale}' must be a JSON object, got {entry!r}")
        for name in _REQUIRED:
            if name not in entry:
                raise UserError(f"{file}: 'models.{scale}' has no '{name}'")
        for name, (ok, what) in _MEMBER_FIELDS.items():
            if name in entry and not ok(entry[name]):
                raise UserError(f"{file}: 'models.{scale}.{name}' must be {what}, got {entry[name]!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def blend_weights(ckpt, alpha: float, where: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(1 - alpha) * the weights a fine-tune started from + alpha * its own: a fine-tuned model pulled
    back towards the model it came from, which keeps more of what that model did well on data
    neither was tuned for (weight-space ensembling). The starting checkpoint is found by the path
    the fine-tune recorded and must still hold the same weights (sha256)."""
    from tfsdeploy.artifacts import checkpoint_fingerprint
    from tfsdeploy.checkpoint import load_checkpoint

    init = ckpt.meta.get("init")
    if "blend" in ckpt.meta:
        done = ckpt.meta["blend"]
        raise UserError(f"{where}: is already a blend (A = {done.get('alpha') if isinstance(done, dict) else done}) "
                        f"of a fine-tune and the model it started from; blend the fine-tuned checkpoint itself")
    if not init:
        raise UserError(f"{where}: --blend needs a fine-tuned checkpoint (train --init); this one was trained "
                        f"from scratch")
    start = Path(init["path"])
    if not start.exists():
        raise UserError(f"{where}: the checkpoint it was fine-tuned from, {start}, is gone; --blend needs it")
    if checkpoint_fingerprint(start)["sha256"] != init["sha256"]:
        raise UserError(f"{where}: {start} has changed since the fine-tune started from it (sha256 differs); "
                        f"blend before replacing it")
    base = load_checkpoint(start)
    if set(base.weights) != set(ckpt.weights) or any(base.weights[k].shape != v.shape for k, v in ckpt.weights.items()):
        raise UserError(f"{where}: its weights do not match those of {start}")
    weights = {k: (v.float() * alpha + base.weights[k].float() * (1 - alpha)).to(v.dtype) if v.is_floating_point()
               else v for k, v in ckpt.weights.items()}
    return weights, {"alpha": alpha, "init": init}


def check_backproject(scale: int, strength: float) -> float:
    """A member's back-projection strength as bundle.json may record it, or one line saying why not."""
    ok, what = _MEMBER_FIELDS["backproject"]
    if not ok(strength):
        raise UserError(f"x{scale}: back-projection strength must be {what}, got {strength}")
    return strength


def check_backproject_gate(scale: int, gate: Any) -> Any:
    """A member's back-projection noise gate as bundle.json may record it, or one line saying why not."""
    ok, what = _MEMBER_FIELDS["backproject_gate"]
    if not ok(gate):
        raise UserError(f"x{scale}: a back-projection noise gate must be {what}, got {gate}")
    return gate


def make_bundle(members: dict[int, Path], out: str | Path, fp16: bool = True, notes: str = "",
                ddim_steps: dict[int, int] | None = None, blend: dict[int, float] | None = None,
                backproject: dict[int, float] | None = None) -> Path:
    """Write a bundle from one checkpoint (file, checkpoint folder or run folder) per scale.

    Each member is written as one safetensors file with its configs in the header; with `fp16`
    the weights are stored in half precision (they are cast back to fp32 on load). `ddim_steps`
    records a recommended DDIM step count per scale; `blend` (0 <= alpha <= 1 per scale) stores a
    fine-tuned member as `blend_weights` of it and the model it started from; `backproject` the
    back-projection strength a scale's inputs are upsampled with (tfsdeploy.inputs.upsample).

    A fine-tune keeps what the member it started from was shipped with: a scale not in `backproject`
    gets the strength the checkpoint was trained at (with its start's noise gate, when that strength
    is its start's), one not in `ddim_steps` the step count its start
    recommended, and one not in `blend` the blend the fine-tune chose on its held-out slices
    (training.train.Trainer.choose_blend; 0 stores the start itself)."""
    from tfsdeploy.checkpoint import load_checkpoint

    if not members:
        raise UserError("a bundle needs at least one model")
    out = Path(out)
    starts = [(read_meta(p)[1].get("init") or {}).get("path") for s, p in members.items() if s in (blend or {})]
    check_output(out, [*members.values(), *starts], owns=BUNDLE_OWNS, what="a file of a bundle")
    with atomic_dir(out) as tmp:
        models = {}
        for scale, src in sorted(members.items()):
            ckpt = load_checkpoint(src)
            trained = tuple(ckpt.configs.data.scales)
            if scale not in trained:
                raise UserError(f"{src}: trained for {', '.join(f'x{s}' for s in trained)}, not x{scale}")
            path, meta = read_meta(src)
            meta = {k: v for k, v in meta.items() if k not in ("files", "optim_param_groups")}  # training-only
            meta["weights_dtype"] = "float16" if fp16 else "float32"
            init = ckpt.meta.get("init") or {}
            alpha = (blend or {}).get(scale, (ckpt.meta.get("blend_choice") or {}).get("alpha", 1.0))
            weights = ckpt.weights
            if alpha != 1.0:
                if not 0.0 <= alpha < 1.0:
                    raise UserError(f"x{scale}: a blend takes 0 <= alpha <= 1, got {alpha}")
                weights, meta["blend"] = blend_weights(ckpt, alpha, src)
            weights = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous()
                       for k, v in weights.items()}
            name = f"x{scale}.safetensors"
            write_safetensors(weights, tmp / name, metadata={"tfsdeploy": json.dumps(meta, sort_keys=True)})
            models[str(scale)] = {"file": name, "sha256": sha256_file(tmp / name), "step": ckpt.step,
                                  "trained_scales": list(trained)}
            if "blend" in meta:
                models[str(scale)]["blend"] = alpha
            steps = (ddim_steps or {}).get(scale, init.get("ddim_steps", 0))
            if steps:
                if steps > ckpt.configs.schedule.num_steps:
                    raise UserError(f"x{scale}: {steps} DDIM steps exceed the schedule's T")
                models[str(scale)]["ddim_steps"] = steps
            strength = (backproject or {}).get(scale, ckpt.configs.data.backproject)
            if strength:
                models[str(scale)]["backproject"] = check_backproject(scale, strength)
                if init.get("backproject_gate") and strength == init.get("backproject"):
                    models[str(scale)]["backproject_gate"] = list(init["backproject_gate"])  # as it was shipped
        (tmp / BUNDLE_FILE).write_text(json.dumps(
            {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "models": models, "notes": notes},
            indent=2, sort_keys=True) + "\n")
    return out


__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "BUNDLE_OWNS", "BUNDLE_FORMAT_VERSION", "DEFAULT_BUNDLE",
           "check_bundle_meta", "check_backproject", "check_backproject_gate", "make_bundle", "blend_weights"]
