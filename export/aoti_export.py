"""Checkpoint -> AOTInductor package (`.pt2`): the denoiser compiled ahead of time for this machine.

`torch.export` captures the network with the I/O spec's dynamic batch (and size range, unless the
spec fixes one size), and `torch._inductor.aoti_compile_and_package` compiles it: fp16 weights and
activations with the fp32 islands (the same module as the fp16 ONNX) on CUDA, fp32 on a CPU. The
package passes the same parity gate as the ONNX files and TensorRT engines (one call and a whole
fused image against torch fp32) before it is published under a name keyed by everything that makes
a package valid: the checkpoint, torch, the device and the shapes. A key that matches is reused.

Builds of one key are serialised by a lock file in the tfsdeploy cache, so two processes that
build the same package at once do not race on its file or its sidecar: the second waits and reuses
the first one's package. The compile stages in a hidden folder beside the package (one left by a
process killed outright is removed by the next build there) and keeps Inductor's own files in the
tfsdeploy cache, not in the system's temporary folder. A first-use build (`remember_failure`) that
fails leaves a marker with the reason, so later jobs do not compile again for minutes only to fail
the same way; `tfsdeploy export --aoti` always tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from engines.aoti_engine import COMPILER_LOGGERS, AotiDenoiser, device_identity, identity_text
from export.onnx_export import HalfDenoiser, default_spec, versions
from tfsdeploy.artifacts import checkpoint_fingerprint, read_sidecar, sidecar_path, write_sidecar
from tfsdeploy.checkpoint import build_from_checkpoint
from tfsdeploy.errors import UserError, quiet
from tfsdeploy.fileio import _temp_prefix, remove_stale_temporaries, write_error
from tfsdeploy.inputs import Triplet
from tfsdeploy.iospec import IOSpec
from tfsdeploy.paths import cache_dir

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


def failure_marker(target: Path) -> Path:
    """Where a first-use build that failed leaves its reason."""
    return target.with_name(target.name + ".failed")


@contextlib.contextmanager
def build_lock(key: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the build lock of package `key` (waiting, and saying so, while another process holds
    it). Without a writable cache there is no lock; the build then goes on unserialised."""
    try:
        folder = cache_dir() / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"aoti-{key[:16]}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("  another process is building this AOTInductor package; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _cached(target: Path, key: str) -> dict[str, Any] | None:
    """The parity report of a complete package under `target` built for `key`, else None."""
    if not target.is_file():
        return None
    try:
        old = read_sidecar(target)
        return old["parity"] if old.get("key") == key else None
    except (UserError, KeyError):
        return None  # stale or half-written: build it again


def export_aoti(ckpt: str | Path, out_dir: str | Path, device: str = "auto", spec: IOSpec | None = None,
                parity_steps: int = 10, parity_image: Triplet | None = None,
                log: Callable[[str], None] = print, remember_failure: bool = False) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse a matching) package for `device` ("auto": CUDA when present); returns its path
    and parity report. Raises UserError, leaving nothing behind, when the build or the parity gate
    fails. With `remember_failure`, a build that failed before is not tried again (its marker's
    reason is raised), and a failure leaves a marker."""
    from engines.torch_engine import use_compile_cache

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
    report = _cached(target, key)
    if report is not None:
        log(f"  AOTInductor package cache hit: {target.name}")
        return target, report
    marker = failure_marker(target)
    if remember_failure and marker.is_file():
        raise UserError(f"building this AOTInductor package failed before ({marker.read_text().strip()}); "
                        f"`tfsdeploy export --aoti` tries again")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the export folder ({e.strerror})") from None
    use_compile_cache()  # Inductor's files (hundreds of MB) go to the tfsdeploy cache, not the temp folder
    with build_lock(key, log):
        report = _cached(target, key)  # built by the process this one waited for
        if report is not None:
            log(f"  AOTInductor package cache hit: {target.name}")
            return target, report
        try:
            report = _build(model, ck, spec, precision, device, identity, fingerprint, key, target,
                            parity_steps, parity_image, log)
        except UserError as e:
            if remember_failure:
                with contextlib.suppress(OSError):
                    marker.write_text(str(e) + "\n")
            raise
        marker.unlink(missing_ok=True)
    return target, report


def _build(model, ck, spec: IOSpec, precision: str, device: str, identity: dict[str, str],
           fingerprint: dict[str, Any], key: str, target: Path, parity_steps: int, parity_image: Triplet | None,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Compile, check parity and publish the package at `target` (under the build lock)."""
    from engines.torch_engine import TorchDenoiser
    from export.parity import parity_condition, parity_report
    from tfsdeploy.diffusion import Diffusion

    out_dir = target.parent
    module = (model if precision == "fp32" else HalfDenoiser(model)).to(device).eval()
    example = tuple(t.to(device) for t in spec.example_inputs())
    meta = {"kind": "aoti", "precision": precision, "key": key, "torch": torch.__version__, **identity,
            "io": spec.to_json(), "checkpoint": fingerprint, "configs": ck.configs.to_json(), "versions": versions()}
    remove_stale_temporaries(target)  # the staging folder of a build that was killed outright
    try:
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=out_dir))
    except OSError as e:
        raise write_error(out_dir, e) from None
    log(f"compiling the denoiser for {identity_text(identity)} once ({precision} AOTInductor package): about "
        f"{estimated_build_s(sum(p.numel() for p in model.parameters()), device)} s; later runs load it")
    try:
        tmp = staging / target.name
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
        try:
            sidecar_path(target).unlink(missing_ok=True)
            os.replace(tmp, target)
        except OSError as e:
            raise write_error(target, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_sidecar(target, {**meta, "parity": report})
    return report


__all__ = ["export_aoti", "failure_marker", "build_lock", "package_key", "package_path", "package_precision",
           "estimated_build_s"]
