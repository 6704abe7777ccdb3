"""The TensorRT engine: preallocated bindings, execute_async_v3 on torch's current stream, and an
optional CUDA graph for static shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tfsdeploy.artifacts import read_sidecar
from tfsdeploy.errors import UserError
from tfsdeploy.iospec import INPUTS, OUTPUT, IOSpec


def tensorrt_status() -> tuple[Any, str]:
    """(tensorrt module or None, reason it cannot be used). Importing can succeed without a GPU, so
    the GPU is checked too."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return None, "TensorRT is not installed (pip install 'tfsdeploy[gpu]' on a machine with an NVIDIA GPU)"
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) raises OSError etc.
        return None, f"TensorRT failed to import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU is available to build or run a TensorRT engine"
    return trt, ""


def gpu_identity() -> dict[str, str]:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def check_engine_meta(meta: dict[str, Any], trt_version: str, gpu: dict[str, str], where: str | Path) -> None:
    """Refuse an engine built by another TensorRT or for another GPU."""
    if meta.get("tensorrt") != trt_version:
        raise UserError(f"{where} was built with TensorRT {meta.get('tensorrt')}, this is {trt_version}; "
                        f"rebuild it with `tfsdeploy export --trt`")
    if meta.get("gpu") != gpu["gpu"] or meta.get("compute_capability") != gpu["compute_capability"]:
        raise UserError(f"{where} was built for {meta.get('gpu')} (sm {meta.get('compute_capability')}), this is "
                        f"{gpu['gpu']} (sm {gpu['compute_capability']}); rebuild it with `tfsdeploy export --trt`")


class TrtDenoiser:
    name = "trt"

    def __init__(self, path: str | Path, cuda_graph: bool = False, meta: dict[str, Any] | None = None):
        """`meta` is the sidecar; pass it only for an engine being verified before its sidecar exists."""
        trt, reason = tensorrt_status()
        if trt is None:
            raise UserError(f"cannot run {path}: {reason}")
        self.path = Path(path)
        self.meta = meta if meta is not None else read_sidecar(self.path)
        check_engine_meta(self.meta, trt.__version__, gpu_identity(), self.path)
        self.spec = IOSpec.from_json(self.meta["io"])
        self.precision = "fp16"
        self.dtype = torch.float16
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != {*INPUTS, OUTPUT}:
            raise UserError(f"{self.path}: engine tensors {sorted(names)} do not match the I/O spec")
        self.cuda_graph = cuda_graph
        self.capturable = False  # TensorRT keeps its own optional per-call graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._shape: tuple[int, ...] | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def describe(self) -> str:
        return f"tensorrt fp16 ({self.meta.get('gpu')}{', CUDA graph' if self.cuda_graph else ''})"

    def _allocate(self, b: int, h: int, w: int) -> None:
        """Preallocate every binding for this shape and point the context at them."""
        shapes = self.spec.shapes(b, h, w)
        self._buffers = {n: torch.empty(shapes[n], device=self.device, dtype=torch.float32) for n in (*INPUTS, OUTPUT)}
        for n in INPUTS:
            self.context.set_input_shape(n, shapes[n])
        for n, t in self._buffers.items():
            self.context.set_tensor_address(n, t.data_ptr())
        self._shape = (b, h, w)
        self._graph = None

    def _launch(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        self.spec.check(b, h, w)
        if self._shape != (b, h, w):
            self._allocate(b, h, w)
        for n, t in zip(INPUTS, (x_t, cond, noise_level)):
            self._buffers[n].copy_(t, non_blocking=True)
        if not self.cuda_graph:
            self._launch()
        else:
            if self._graph is None:
                self._launch()  # warm-up outside capture (TensorRT may allocate on first run)
                torch.cuda.current_stream(self.device).synchronize()
                stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(stream):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        self._launch()
                self._graph = graph
            self._graph.replay()
        return self._buffers[OUTPUT].clone()
