"""Checkpoint -> ONNX (fp32, or fp16 weights with fp32 islands and fp32 I/O), checked and parity-tested.

Nothing is published until it passes: the graph is written to a temporary name, checked with
onnx.checker, run against torch fp32 (one call and a whole fused image), and only then renamed into
place, with its sidecar written last.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tfsdeploy import __version__
from tfsdeploy.artifacts import checkpoint_fingerprint, default_export_dir, sidecar_path, write_sidecar
from tfsdeploy.checkpoint import build_from_checkpoint
from tfsdeploy.config import ARTIFACT_FILES, PRECISIONS
from tfsdeploy.errors import UserError, quiet
from tfsdeploy.inputs import Triplet
from tfsdeploy.iospec import INPUTS, OUTPUT, IOSpec
from tfsdeploy.model import TFSDiffUNet, set_norm_upcast

DEFAULT_OPSET = 18
# Above this the graph's weights go to a separate `.data` file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
# The precisions of config.PRECISIONS an ONNX graph is exported in (ONNX Runtime has no bf16 path here).
ONNX_PRECISIONS = tuple(p for p in PRECISIONS if p != "bf16")


class HalfDenoiser(nn.Module):
    """fp32 in, fp16 weights and activations inside, fp32 out.

    GroupNorm, softmax and the noise-level sinusoids cast themselves up to fp32 (see model.py), so
    those islands survive in the exported graph as explicit Cast nodes.
    """

    def __init__(self, model: TFSDiffUNet):
        super().__init__()
        # the islands are part of the exported precision, whatever a live engine did to its own copy
        self.model = set_norm_upcast(copy.deepcopy(model).half(), True)

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        return self.model(x_t.half(), cond.half(), noise_level.float()).float()


def default_spec(model: TFSDiffUNet, max_batch: int = 4, min_size: int = 0, max_size: int = 0) -> IOSpec:
    cfg = model.cfg
    m = cfg.size_multiple
    lo = min_size or max(m, 64 // m * m)  # 64 rounded down to the multiple, at least one multiple
    hi = max_size or max(512, cfg.image_size)
    return IOSpec(cond_channels=cfg.cond_channels, x_channels=cfg.out_channels, size_multiple=m,
                  min_batch=1, opt_batch=1, max_batch=max_batch, min_size=lo, opt_size=cfg.image_size, max_size=hi)


def versions() -> dict[str, str]:
    out = {"tfsdeploy": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def write_onnx(module: nn.Module, spec: IOSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Export `module` with the spec's names and dynamic shapes, and check the result."""
    import onnx

    with quiet("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        try:
            program = torch.onnx.export(
                module, spec.example_inputs(), input_names=list(INPUTS), output_names=[OUTPUT],
                dynamic_shapes=spec.dynamic_shapes(), opset_version=opset, dynamo=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - exporter failures are long; keep the first line
            raise UserError(f"ONNX export failed: {str(e).strip().splitlines()[0]}") from None
        n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        program.save(str(path), external_data=n_bytes > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path), full_check=False)  # by path: works for external data too


def export_onnx(ckpt: str | Path, precision: str = "fp32", out_dir: str | Path | None = None,
                spec: IOSpec | None = None, opset: int = DEFAULT_OPSET, parity_steps: int = 10,
                parity_image: Triplet | None = None, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Export one precision; returns the ONNX path and its parity report. Raises UserError when the
    parity limits are exceeded, leaving no artifact behind. The fused-image check runs on
    `parity_image` (a real held-out slice, when the caller has one) or on a synthetic phantom."""
    from engines.onnx_engine import OnnxDenoiser
    from engines.torch_engine import TorchDenoiser
    from export.parity import parity_condition, parity_report
    from tfsdeploy.diffusion import Diffusion

    for needed in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(needed)
        except ImportError:
            raise UserError(f"exporting to ONNX needs {needed}: pip install 'tfsdeploy[onnx]'") from None
    if precision not in ONNX_PRECISIONS:
        raise UserError(f"precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    if opset < 18:
        raise UserError("opset must be 18 or above")
    model, ck = build_from_checkpoint(ckpt)
    spec = spec or default_spec(model)
    if spec.size_multiple % model.cfg.size_multiple:
        raise UserError(f"the spec's size multiple must be a multiple of {model.cfg.size_multiple} for this model")
    out_dir = Path(out_dir) if out_dir else default_export_dir(ckpt)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the export folder ({e.strerror})") from None
    final = out_dir / ARTIFACT_FILES["onnx" if precision == "fp32" else "onnx-fp16"]
    module: nn.Module = model if precision == "fp32" else HalfDenoiser(model).eval()

    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmpdir:
        tmp = Path(tmpdir) / final.name
        t0 = time.perf_counter()
        write_onnx(module, spec, tmp, opset)
        export_s = time.perf_counter() - t0

        fingerprint = checkpoint_fingerprint(ckpt)
        meta = {"kind": "onnx", "precision": precision, "opset": opset, "io": spec.to_json(),
                "checkpoint": fingerprint, "configs": ck.configs.to_json(), "versions": versions()}
        engine = OnnxDenoiser(tmp, device="cpu", meta=meta)
        report, problems = parity_report(precision, TorchDenoiser(model), engine, Diffusion.from_configs(ck.configs),
                                         spec, parity_condition(spec, parity_image), parity_steps)
        report.update(provider=engine.provider, export_s=round(export_s, 1))
        if problems:
            raise UserError(f"{precision} ONNX failed parity against torch fp32: {'; '.join(problems)}; "
                            f"nothing was written")
        del engine
        # Publish: drop any old sidecar first (an old sidecar must never describe a new file), move the
        # weights file (if any) and the graph, then write the sidecar as the commit marker.
        sidecar_path(final).unlink(missing_ok=True)
        for f in sorted(Path(tmpdir).iterdir(), key=lambda p: p.suffix == ".onnx"):
            os.replace(f, out_dir / f.name)
    write_sidecar(final, {**meta, "parity": report})
    return final, report
