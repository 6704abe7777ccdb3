"""Self-describing checkpoints: safetensors for tensors, JSON for everything else. No pickle anywhere.

A checkpoint is a directory:

    config.json            format tag, step, every config, sha256 of each tensor file
    model.safetensors      EMA weights (what inference uses); its metadata repeats config.json,
                           so the file alone is self-describing too
    training.safetensors   (training checkpoints) online weights and optimizer tensors

A training run directory holds several `ckpt-NNNNNNN/` checkpoints and a `latest` file naming
the newest. Directories are written under a temporary name and renamed when complete, and
`latest` is replaced atomically, so an interrupted save can never be mistaken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tfsdeploy import __version__
from tfsdeploy.config import DataConfig, DiffusionConfig, ModelConfig, ScheduleConfig, TrainConfig, from_dict, to_dict
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_dir, atomic_path, write_safetensors

CHECKPOINT_FORMAT = "tfsdeploy-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
LATEST_FILE = "latest"


@dataclass(frozen=True)
class Configs:
    model: ModelConfig
    schedule: ScheduleConfig = ScheduleConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def to_json(self) -> dict[str, Any]:
        return {k: to_dict(getattr(self, k)) for k in ("model", "schedule", "diffusion", "data", "train")}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Configs":
        if "model" not in d:
            raise UserError("checkpoint config has no 'model' section")
        return Configs(
            model=from_dict(ModelConfig, d["model"]),
            schedule=from_dict(ScheduleConfig, d.get("schedule", {})),
            diffusion=from_dict(DiffusionConfig, d.get("diffusion", {})),
            data=from_dict(DataConfig, d.get("data", {})),
            train=from_dict(TrainConfig, d.get("train", {})),
        )


@dataclass
class Checkpoint:
    path: Path
    configs: Configs
    step: int
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def save_checkpoint(run_dir: str | Path, configs: Configs, step: int, weights: dict[str, torch.Tensor],
                    training_tensors: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 0, name: str | None = None) -> Path:
    """Write `run_dir/ckpt-<step>/` atomically and point `run_dir/latest` at it.

    keep > 0 removes all but the newest `keep` checkpoints afterwards.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{run_dir}: cannot create the directory ({e.strerror})") from None
    name = name or f"ckpt-{step:07d}"
    with atomic_dir(run_dir / name) as tmp:
        meta: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, "tfsdeploy_version": __version__,
            "step": step, **configs.to_json(), **(extra or {}),
        }
        header = {"tfsdeploy": json.dumps(meta, sort_keys=True)}
        write_safetensors(_contiguous(weights), tmp / MODEL_FILE, metadata=header)
        files = {"model": {"file": MODEL_FILE, "sha256": sha256_file(tmp / MODEL_FILE)}}
        if training_tensors is not None:
            write_safetensors(_contiguous(training_tensors), tmp / TRAINING_FILE)
            files["training"] = {"file": TRAINING_FILE, "sha256": sha256_file(tmp / TRAINING_FILE)}
        (tmp / CONFIG_FILE).write_text(json.dumps({**meta, "files": files}, indent=2, sort_keys=True))
    with atomic_path(run_dir / LATEST_FILE) as t:
        t.write_text(name + "\n")
    _cleanup(run_dir, keep, current=name)
    return run_dir / name


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _cleanup(run_dir: Path, keep: int, current: str) -> None:
    for stale in run_dir.glob(".ckpt-*.tmp"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    ckpts = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir() and p.name[5:].isdigit())  # not ckpt-notes/
    for old in ckpts[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its `latest`: the newest checkpoint), or a lone
    model.safetensors file, as the readers below take it. Which model a `--model` value names (a
    bundle's member, an exported artifact, the default model) is tfsdeploy.modelref's to say."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    if path.is_file():
        return path
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / CONFIG_FILE).is_file():
            raise UserError(f"{path}: 'latest' points at {target.name}, which is not a complete checkpoint")
        return target
    raise UserError(f"{path}: not a checkpoint (no {CONFIG_FILE} and no {LATEST_FILE})")


def read_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read and validate a checkpoint's JSON; never touches tensors."""
    path = resolve(path)
    if path.is_file():
        meta = _safetensors_meta(path)
    else:
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path / CONFIG_FILE}: corrupted JSON ({e})") from None
    where = path if path.is_file() else path / CONFIG_FILE
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{where}: not a tfsdeploy checkpoint (format tag missing)")
    check_meta(where, meta)
    if meta.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{where}: checkpoint format {meta['format_version']} is newer than this tfsdeploy reads")
    return path, meta


SECTIONS = {"model": ModelConfig, "schedule": ScheduleConfig, "diffusion": DiffusionConfig, "data": DataConfig,
            "train": TrainConfig}


def check_meta(where: str | Path, meta: dict[str, Any]) -> None:
    """Validate a checkpoint's JSON against its schema: every config field of its declared type (and
    the configs' own value checks), the step and format version integers. One line naming the file
    and the field."""
    import typing

    for key in ("format_version", "step"):
        if key in meta and not _is_int(meta[key]):
            raise UserError(f"{where}: '{key}' must be an integer, got {meta[key]!r}")
    if "model" not in meta:
        raise UserError(f"{where}: no 'model' section")
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise UserError(f"{where}: 'files' must be a JSON object, got {files!r}")
    for key, entry in files.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{where}: 'files.{key}.file' must be a file name in the checkpoint folder")
        if not isinstance(entry.get("sha256", ""), str):
            raise UserError(f"{where}: 'files.{key}.sha256' must be a string")
    for section, cls in SECTIONS.items():
        if section not in meta:
            continue
        values = meta[section]
        if not isinstance(values, dict):
            raise UserError(f"{where}: '{section}' must be a JSON object, got {values!r}")
        for name, tp in typing.get_type_hints(cls).items():
            if name in values and not _of_type(values[name], tp):
                raise UserError(f"{where}: '{section}.{name}' must be {_type_name(tp)}, got {values[name]!r}")
    try:
        Configs.from_json(meta)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _of_type(v: Any, tp: Any) -> bool:
    import math
    import typing

    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return _is_int(v)
    if tp is float:
        return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    if typing.get_origin(tp) is tuple:
        return isinstance(v, (list, tuple)) and all(_of_type(x, typing.get_args(tp)[0]) for x in v)
    return True


def _type_name(tp: Any) -> str:
    import typing

    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _safetensors_meta(file: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    if "tfsdeploy" not in header:
        raise UserError(f"{file}: safetensors file carries no tfsdeploy config")
    try:
        return json.loads(header["tfsdeploy"])
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: corrupted embedded config ({e})") from None


def _load_tensors(file: Path, sha: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError(f"{file}: missing")
    if sha is not None and sha256_file(file) != sha:
        raise UserError(f"{file}: corrupted (sha256 does not match {CONFIG_FILE})")
    try:
        return load_file(str(file))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None


def load_checkpoint(path: str | Path, training: bool = False) -> Checkpoint:
    """Load configs and EMA weights (and, with training=True, the training tensors as meta['training'])."""
    path, meta = read_meta(path)
    configs = Configs.from_json(meta)
    if path.is_file():
        weights = _load_tensors(path, None)
        root = path.parent
        files: dict[str, Any] = {}
    else:
        files = meta.get("files", {})
        if "model" not in files:
            raise UserError(f"{path}: {CONFIG_FILE} lists no model weights")
        weights = _load_tensors(path / files["model"]["file"], files["model"].get("sha256"))
        root = path
    ckpt = Checkpoint(path=path, configs=configs, step=int(meta.get("step", 0)), weights=weights, meta=meta)
    if training:
        if "training" not in files:
            raise UserError(f"{path}: holds no training state to resume from")
        ckpt.meta["training"] = _load_tensors(root / files["training"]["file"], files["training"].get("sha256"))
    return ckpt


def build_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Checkpoint -> (eval-mode model, Checkpoint). The JSON alone decides the architecture."""
    from tfsdeploy.model import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt.configs.model)
    load_weights(model, ckpt.weights, ckpt.path)
    return model.to(device).eval(), ckpt


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path | str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad:
            parts.append(f"{len(bad)} of the wrong shape (e.g. {bad[0]})")
        raise UserError(f"{where}: weights do not match the model config: {'; '.join(parts)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
