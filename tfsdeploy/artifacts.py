"""Sidecar JSON for every compiled artifact, and the checks that keep stale ones out.

`denoiser-fp32.onnx` is described by `denoiser-fp32.onnx.json`: the artifact's own sha256, the
source checkpoint's sha256, precision, opset, I/O spec, tool versions and (for engines) the
TensorRT version and GPU, and last the sidecar's own sha256 (`sidecar_sha256`, over the rest of
it). A loader refuses an artifact whose sidecar is missing or was edited (what a sidecar says, such
as the model's prediction target, decides how the artifact's output is read), whose hash does not
match, or whose source checkpoint has changed since export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tfsdeploy.checkpoint import MODEL_FILE, read_meta, sha256_file
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.paths import cache_dir

SIDECAR_FORMAT = "tfsdeploy-artifact"
SEAL = "sidecar_sha256"
EXPORT_DIR = "export"
# What an export folder holds: the artifacts, their sidecars (and an ONNX graph's external weights),
# TensorRT's timing cache and the staging folders of exports that were killed.
EXPORT_FILES = ("denoiser-*", "denoiser-*/**", "timing-trt*.cache", ".export-*/**")


def sidecar_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def write_sidecar(artifact: str | Path, data: dict[str, Any]) -> Path:
    """Write the sidecar last, atomically: an artifact without one is never loaded."""
    out = sidecar_path(artifact)
    body = sealed({"format": SIDECAR_FORMAT, "file": Path(artifact).name, "sha256": sha256_file(artifact), **data})
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    return out


def sealed(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its own sha256 (SEAL) over the rest of it, as write_sidecar stores it."""
    return {**body, SEAL: _seal_of(body)}


def _seal_of(body: dict[str, Any]) -> str:
    rest = {k: v for k, v in body.items() if k != SEAL}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_sidecar(artifact: str | Path, verify_hash: bool = True) -> dict[str, Any]:
    artifact = Path(artifact)
    if not artifact.is_file():
        raise UserError(f"{artifact}: no such artifact")
    sc = sidecar_path(artifact)
    if not sc.is_file():
        raise UserError(f"{artifact}: no sidecar {sc.name}; it was not written by a complete `tfsdeploy export`")
    try:
        data = json.loads(sc.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{sc}: corrupted JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{sc}: not a tfsdeploy sidecar")
    if SEAL not in data:
        raise UserError(f"{sc}: has no sha256 of its own (written by an older tfsdeploy); export again")
    if data[SEAL] != _seal_of(data):
        raise UserError(f"{sc}: was edited after export (its own sha256 does not match); export again")
    if verify_hash and sha256_file(artifact) != data.get("sha256"):
        raise UserError(f"{artifact}: sha256 does not match its sidecar (modified or truncated); export again")
    return data


def checkpoint_fingerprint(ckpt: str | Path) -> dict[str, Any]:
    """What an artifact records about its source checkpoint."""
    path, meta = read_meta(ckpt)
    weights = path if path.is_file() else path / meta.get("files", {}).get("model", {}).get("file", MODEL_FILE)
    return {"path": str(path), "sha256": sha256_file(weights), "step": int(meta.get("step", 0))}


def verify_source(sidecar: dict[str, Any], ckpt: str | Path, artifact: str | Path) -> None:
    """Refuse an artifact exported from a different (or since modified) checkpoint."""
    now = checkpoint_fingerprint(ckpt)["sha256"]
    if sidecar.get("checkpoint", {}).get("sha256") != now:
        raise UserError(f"{artifact} was exported from a different checkpoint than {ckpt} "
                        f"(or the checkpoint changed since); export again")


def default_export_dir(ckpt: str | Path) -> Path:
    """<checkpoint dir>/export for checkpoint folders, <file's folder>/export/<file stem> for a lone
    file (so the members of a bundle do not collide), and a folder in the cache for the packaged
    default model, which may sit in a read-only install."""
    from tfsdeploy.bundle import DEFAULT_BUNDLE

    path, _ = read_meta(ckpt)
    if not path.is_file():
        return path / EXPORT_DIR
    if path.resolve().parent == DEFAULT_BUNDLE:
        return cache_dir() / EXPORT_DIR / "default" / path.stem
    return path.parent / EXPORT_DIR / path.stem


def compiled_cache_dir(ckpt_sha256: str) -> Path:
    """Where long jobs put the AOTInductor packages they build on first use: the user cache, one
    folder per checkpoint (by its weights' sha256), whatever folder the checkpoint sits in."""
    return cache_dir() / "compiled" / ckpt_sha256[:16]


__all__ = ["sidecar_path", "write_sidecar", "sealed", "read_sidecar", "checkpoint_fingerprint", "verify_source",
           "default_export_dir", "compiled_cache_dir"]
