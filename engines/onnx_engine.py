"""The ONNX Runtime engine: CPU provider, or CUDA provider with I/O binding when present.

ONNX Runtime falls back to the CPU silently when a provider cannot load, so the engine reports the
provider that actually runs (`.provider`), not the one asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tfsdeploy.artifacts import read_sidecar
from tfsdeploy.errors import UserError
from tfsdeploy.iospec import INPUTS, OUTPUT, IOSpec


class OnnxDenoiser:
    name = "onnx"

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0,
                 meta: dict[str, Any] | None = None):
        """`meta` is the sidecar; pass it only for an artifact being verified before its sidecar exists."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("ONNX Runtime is not installed: pip install 'tfsdeploy[onnx]'") from None
        self.path = Path(path)
        self.meta = meta if meta is not None else read_sidecar(self.path)
        self.spec = IOSpec.from_json(self.meta["io"])
        self.precision = self.meta.get("precision", "fp32")
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32

        available = ort.get_available_providers()
        providers = []
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available and torch.cuda.is_available():
            providers.append("CUDAExecutionProvider")
        elif device == "cuda":
            raise UserError("ONNX Runtime has no usable CUDA provider here (it needs onnxruntime-gpu and a GPU; "
                            f"available: {', '.join(available)})")
        providers.append("CPUExecutionProvider")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign model file
            raise UserError(f"{self.path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        self.provider = self.session.get_providers()[0]
        self.device = torch.device("cuda") if self.provider == "CUDAExecutionProvider" else torch.device("cpu")
        self.capturable = False  # ONNX Runtime synchronises with the host inside a call

    def describe(self) -> str:
        return f"onnx {self.precision} ({self.provider})"

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        self.spec.check(b, h, w)
        inputs = dict(zip(INPUTS, (x_t, cond, noise_level)))
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feed = {k: v.detach().float().cpu().contiguous().numpy() for k, v in inputs.items()}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Zero-copy: ONNX Runtime reads and writes torch's CUDA buffers."""
        binding = self.session.io_binding()
        keep = {}
        for name, t in inputs.items():
            t = t.detach().to(self.device, torch.float32).contiguous()
            keep[name] = t
            binding.bind_input(name, "cuda", t.device.index or 0, np.float32, tuple(t.shape), t.data_ptr())
        x = keep["x_t"]
        out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        binding.bind_output(OUTPUT, "cuda", out.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream().synchronize()  # inputs written by torch must be ready
        self.session.run_with_iobinding(binding)
        return out
