"""Which model a `--model` value names: one resolver, used by every command and library caller.

    ref = resolve_model("runs/small")      # or a bundle, a checkpoint, an exported artifact, None
    ref.kind                               # "bundle", "run", "checkpoint" or "artifact"
    ref.member(4)                          # the file that fuses at x4
    ref.sample_for(4, SampleConfig())      # the sampler settings recommended for x4
    ref.fingerprint()                      # what identifies its numbers

The kinds:

- bundle: a folder with `bundle.json` and one checkpoint per scale (tfsdeploy.bundle). The manifest
  is read and validated once, when the value is resolved; a member's file is checked against its
  recorded sha256 when it is first asked for.
- run: a training run folder; its newest checkpoint (`latest`) is what loads.
- checkpoint: a checkpoint folder or a lone safetensors file (tfsdeploy.checkpoint).
- artifact: an exported `.onnx`, `.plan` or `.pt2`, described by its sidecar (tfsdeploy.artifacts).

A run, a checkpoint or an artifact serves every scale. None, or the word "default" where no such
file exists, names the default model: $TFSDEPLOY_MODEL if set, else the packaged bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tfsdeploy.bundle import BUNDLE_FILE, BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, DEFAULT_BUNDLE, check_bundle_meta
from tfsdeploy.checkpoint import CONFIG_FILE, LATEST_FILE, Configs, read_meta, sha256_file
from tfsdeploy.config import DEFAULT_DDIM_STEPS, SampleConfig, ScheduleConfig, artifact_engine
from tfsdeploy.errors import UserError

MODEL_ENV = "TFSDEPLOY_MODEL"


def default_model() -> Path:
    """$TFSDEPLOY_MODEL if set, else the packaged default bundle."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    if not (DEFAULT_BUNDLE / BUNDLE_FILE).is_file():
        raise UserError(f"the packaged default model is missing from {DEFAULT_BUNDLE}; reinstall tfsdeploy, "
                        f"or pass --model RUN_OR_CHECKPOINT")
    return DEFAULT_BUNDLE


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """One resolved model (see the module docstring): `path` as given (the default model's where
    none was), `kind`, and for a bundle its validated bundle.json (`manifest`) and that file's sha256."""

    path: Path
    kind: str
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    manifest_sha256: str = ""
    # scale -> member file, once checked against its sha256: a member is hashed once per resolution
    _checked: dict[int, Path] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ facts
    @property
    def scales(self) -> list[int]:
        """A bundle's scales (a run, a checkpoint or an artifact serves every scale: empty)."""
        return sorted(int(s) for s in self.manifest.get("models", {}))

    @property
    def notes(self) -> str:
        return self.manifest.get("notes", "")

    def _entry(self, scale: int) -> dict[str, Any]:
        return self.manifest.get("models", {}).get(str(scale), {})

    def describe(self) -> str:
        """What the model holds, in a few words ("bundle: x2, x4, x8" or "checkpoint, step N"); refuses
        a path that holds neither."""
        if self.kind == "bundle":
            return f"bundle: {', '.join(f'x{s}' for s in self.scales)}"
        _, meta = read_meta(self.path)
        return f"checkpoint, step {meta.get('step', 0)}"

    def fingerprint(self) -> str:
        """What identifies the model's numbers: a bundle's manifest sha256 (it lists every member's),
        a checkpoint's weights sha256, an artifact's file name."""
        from tfsdeploy.artifacts import checkpoint_fingerprint

        if self.kind == "bundle":
            return self.manifest_sha256
        if self.kind == "artifact":
            return self.path.name
        return checkpoint_fingerprint(self.path)["sha256"]

    # ------------------------------------------------------------------ per scale
    def member(self, scale: int) -> Path:
        """The file that fuses at `scale`: a bundle's member for it (only that one is checked against
        its sha256), or the path itself."""
        if self.kind != "bundle":
            return self.path
        if scale not in self._checked:
            models = self.manifest["models"]
            if str(scale) not in models:
                raise UserError(f"{self.path}: no model for x{scale} (this bundle has "
                                f"{', '.join(f'x{s}' for s in self.scales)})")
            self._checked[scale] = self._check_member(str(scale), models[str(scale)])
        return self._checked[scale]

    def members(self) -> dict[int, Path]:
        """A bundle's scale -> member file, every one checked against its sha256."""
        return {scale: self.member(scale) for scale in (int(s) for s in self.manifest.get("models", {}))}

    def _check_member(self, scale: str, entry: dict[str, Any]) -> Path:
        file = self.path / entry["file"]
        if not file.is_file():
            raise UserError(f"{self.path}: {entry['file']} (x{scale}) is missing")
        if sha256_file(file) != entry.get("sha256"):
            raise UserError(f"{file}: corrupted (sha256 does not match {BUNDLE_FILE})")
        return file

    def ddim_steps(self, scale: int) -> int:
        """The DDIM step count a bundle recommends for `scale` (0: none; use the general default)."""
        entry = self._entry(scale)
        steps = entry.get("ddim_steps", 0)
        if steps:  # a recommendation the member's own schedule cannot run is the bundle's fault, not --steps'
            _, meta = read_meta(self.path / entry["file"])
            num_steps = meta.get("schedule", {}).get("num_steps", ScheduleConfig().num_steps)
            if steps > num_steps:
                raise UserError(f"{self.path / BUNDLE_FILE}: 'models.{scale}.ddim_steps' is {steps}, more than the "
                                f"x{scale} model's schedule has (T = {num_steps}); fix the bundle or pass --steps")
        return steps

    def sample_for(self, scale: int, sample: SampleConfig) -> SampleConfig:
        """How `scale` runs: DDIM without a step count gets the bundle's recommendation, else
        DEFAULT_DDIM_STEPS, and an unset back-projection the model's (`_backproject`), so both are always
        explicit; anything given is kept."""
        if sample.backproject is None:
            gate = self._entry(scale).get("backproject_gate")  # a bundle member's; none elsewhere
            sample = dataclasses.replace(sample, backproject=self._backproject(scale),
                                         backproject_gate=sample.backproject_gate or (tuple(gate) if gate else None))
        if sample.sampler != "ddim" or sample.steps:
            return sample
        return dataclasses.replace(sample, steps=self.ddim_steps(scale) or DEFAULT_DDIM_STEPS)

    def _backproject(self, scale: int) -> float:
        """The strength the model's inputs are meant to be upsampled with: a bundle member's entry, or
        for a run or checkpoint the strength it was trained at (a fine-tune of a member trains at the
        member's); 0 for an exported artifact."""
        if self.kind == "bundle":
            return float(self._entry(scale).get("backproject", 0))
        if self.kind == "artifact":
            return 0.0
        _, meta = read_meta(self.path)
        return float(meta.get("data", {}).get("backproject", 0.0))

    def fusable_member(self, scale: int) -> Path:
        """The member for `scale`, after refusing a model that does not take 5 condition channels and
        give 3, read from its header or sidecar before any weights load."""
        from tfsdeploy.artifacts import read_sidecar
        from tfsdeploy.inputs import check_fusable

        file = self.member(scale)
        if artifact_engine(file) is not None:
            where, meta = file, read_sidecar(file).get("configs", {})
        else:
            where, meta = read_meta(file)
        check_fusable(Configs.from_json(meta).model, where)
        return file


def resolve_model(model: str | Path | ModelRef | None, kind: str | None = None) -> ModelRef:
    """The model a `--model` value names (see the module docstring); a ModelRef is returned as it is.
    `kind="bundle"` reads the value as a bundle whatever it holds (a missing bundle.json is an error)."""
    if isinstance(model, ModelRef):
        return model
    if model is None or (str(model) == "default" and not Path(model).exists()):
        path = default_model()
    else:
        path = Path(model)
    if kind == "bundle" or (path / BUNDLE_FILE).is_file():
        raw, manifest = _read_manifest(path / BUNDLE_FILE)
        return ModelRef(path, "bundle", manifest, hashlib.sha256(raw).hexdigest())
    if artifact_engine(path) is not None:
        return ModelRef(path, "artifact")
    is_run = path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / LATEST_FILE).is_file()
    return ModelRef(path, "run" if is_run else "checkpoint")


def _read_manifest(file: Path) -> tuple[bytes, dict[str, Any]]:
    """bundle.json's bytes and its validated contents; one line naming the file (and the field) if bad."""
    try:
        raw = file.read_bytes()
        meta = json.loads(raw.decode())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{file}: not a tfsdeploy bundle")
    check_bundle_meta(file, meta)
    if meta.get("format_version", 0) > BUNDLE_FORMAT_VERSION:
        raise UserError(f"{file}: bundle format {meta['format_version']} is newer than this tfsdeploy reads")
    return raw, meta


__all__ = ["ModelRef", "resolve_model", "default_model", "MODEL_ENV"]
