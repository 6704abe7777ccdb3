"""Checkpoint -> AOTInductor package (`.pt2`): the denoiser compiled ahead of time for this machine.

`torch.export` captures the network with the I/O spec's dynamic batch (and size range, unless the
spec fixes one size), and `torch._inductor.aoti_compile_and_package` compiles it: fp16 weights and
activations with the fp32 islands (the same module as the fp16 ONNX) on CUDA, fp32 on a CPU. The
package passes the same parity gate as the ONNX files and TensorRT engines (one call and a whole
fused image against torch fp32) before it is published under a name keyed by everything that makes
a package valid: the checkpoint, torch, the device and the shapes. A key that matches is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from engines.aoti_engine import COMPILER_LOGGERS, AotiDenoiser, device_identity, identity_text
from export.onnx_export import HalfDenoiser, default_spec, versions
from tfsdeploy.artifacts import checkpoint_fingerprint, read_sidecar, sidecar_path, write_sidecar
from tfsdeploy.checkpoint import build_from_checkpoint
from tfsdeploy.errors import UserError, quiet
from tfsdeploy.inputs import Triplet
from tfsdeploy.iospec import IOSpec

# Seconds to build a package, per million parameters and fixed, as measured (paper preset on an
# H200: 112 s for 97.8 M; the packaged x4 member on a CPU: 32 s for 4.7 M). Only for the one line
# that tells a user how long the first long job will spend compiling.
BUILD_S_PER_MPARAM = {"cuda": 1.0, "cpu": 3.0}
BUILD_S_FIXED = {"cuda": 15.0, "cpu": 20.0}


def package_precision(device_type: str) -> str:
    return "fp16" if device_type == "cuda" else "fp32"


def package_key(ckpt_sha256: str, identity: dict[str, str], precision: str, spec: IOSpec) -> str:
    """The cache key: a change in any of these makes a different package."""
    payload = {"checkpoint": ckpt_sha256, "torch": torch.__version__, **identity, "precision": precision,
               "profile": {k: [list(s) for s in v] for k, v in spec.profile().items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def package_path(out_dir: Path, key: str, precision: str) -> Path:
    return out_dir / f"denoiser-aoti-{precision}-{key[:16]}.pt2"


def estimated_build_s(n_params: int, device_type: str) -> int:
    return int(round(BUILD_S_FIXED[device_type] + BUILD_S_PER_MPARAM[device_type] * n_params / 1e6, -1)) or 10


def export_aoti(ckpt: str | Path, out_dir: str | Path, device: str = "auto", spec: IOSpec | None = None,
                parity_steps: int = 10, parity_image: Triplet | None = None,
                log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse a matching) package for `device` ("auto": CUDA when present); returns its path
    and parity report. Raises UserError, leaving nothing behind, when the build or the parity gate
    fails."""
    from engines.torch_engine import TorchDenoiser
    from export.parity import parity_condition, parity_report
    from tfsdeploy.diffusion import Diffusion

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--aoti on cuda: no CUDA GPU is available to torch here")
    precision = package_precision(device)
    model, ck = build_from_checkpoint(ckpt)
    spec = spec or default_spec(model)
    identity = device_identity(device)
    fingerprint = checkpoint_fingerprint(ckpt)
    key = package_key(fingerprint["sha256"], identity, precision, spec)
    out_dir = Path(out_dir)
    target = package_path(out_dir, key, precision)
    if target.is_file():
        try:
            old = read_sidecar(target)
            if old.get("key") == key:
                log(f"  AOTInductor package cache hit: {target.name}")
                return target, old["parity"]
        except (UserError, KeyError):
            pass  # stale or half-written: build it again
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the export folder ({e.strerror})") from None

    module = (model if precision == "fp32" else HalfDenoiser(model)).to(device).eval()
    example = tuple(t.to(device) for t in spec.example_inputs())
    meta = {"kind": "aoti", "precision": precision, "key": key, "torch": torch.__version__, **identity,
            "io": spec.to_json(), "checkpoint": fingerprint, "configs": ck.configs.to_json(), "versions": versions()}
    log(f"compiling the denoiser for {identity_text(identity)} once ({precision} AOTInductor package): about "
        f"{estimated_build_s(sum(p.numel() for p in model.parameters()), device)} s; later runs load it")
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmpdir:
        tmp = Path(tmpdir) / target.name
        t0 = time.perf_counter()
        try:
            with quiet(*COMPILER_LOGGERS), torch.no_grad():
                program = torch.export.export(module, example, dynamic_shapes=spec.dynamic_shapes())
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        except Exception as e:  # noqa: BLE001 - compiler failures are long; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"AOTInductor compile failed: {first}") from None
        meta["build_s"] = round(time.perf_counter() - t0, 1)
        engine = AotiDenoiser(tmp, meta=meta)
        reference = TorchDenoiser(model.float(), device)
        report, problems = parity_report(precision, reference, engine, Diffusion.from_configs(ck.configs), spec,
                                         parity_condition(spec, parity_image), parity_steps)
        if problems:
            raise UserError(f"{precision} AOTInductor package failed parity against torch fp32: "
                            f"{'; '.join(problems)}; nothing was written")
        del engine
        # An old sidecar never describes a new file; the sidecar goes last, as the commit marker.
        sidecar_path(target).unlink(missing_ok=True)
        os.replace(tmp, target)
    write_sidecar(target, {**meta, "parity": report})
    return target, report


__all__ = ["export_aoti", "package_key", "package_path", "package_precision", "estimated_build_s"]
