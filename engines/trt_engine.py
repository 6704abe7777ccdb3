"""The TensorRT engine: preallocated bindings, execute_async_v3 on torch's current stream, and an
optional CUDA graph per shape (the few most recent, as tfsdeploy.loopgraph keeps them).

Written against the TensorRT 10 / 11 Python API: the engine's I/O tensors are checked by name,
direction and dtype against the one I/O spec when it loads (fp32 in and out), a shape that the
context refuses (`set_input_shape` returns False) is an error with the reason, and a CUDA graph
that cannot be captured leaves the engine running without one (and says why in describe()).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tfsdeploy.artifacts import read_sidecar
from tfsdeploy.errors import UserError
from tfsdeploy.iospec import INPUTS, OUTPUT, IOSpec
from tfsdeploy.loopgraph import CudaGraphs, GraphBackend, GraphCache


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


def check_engine_io(trt: Any, engine: Any, where: str | Path) -> None:
    """Refuse an engine whose I/O tensors are not the spec's: the three inputs and the output by
    name and direction, all fp32 (the buffers this engine binds are fp32)."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if names != {*INPUTS, OUTPUT}:
        raise UserError(f"{where}: engine tensors {sorted(names)} do not match the I/O spec")
    for n in (*INPUTS, OUTPUT):
        mode = trt.TensorIOMode.INPUT if n in INPUTS else trt.TensorIOMode.OUTPUT
        if engine.get_tensor_mode(n) != mode:
            raise UserError(f"{where}: engine tensor {n} is not an {'input' if n in INPUTS else 'output'}")
        if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
            raise UserError(f"{where}: engine tensor {n} is {engine.get_tensor_dtype(n)}, the I/O spec's is fp32; "
                            "rebuild it with `tfsdeploy export --trt`")


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
        check_engine_io(trt, self.engine, self.path)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        self.cuda_graph = cuda_graph
        self.graph_error = ""  # why capture failed, when it did
        self.capturable = False  # TensorRT keeps its own optional per-call graph
        self.graphs = GraphCache()  # per-call graphs by shape, the few most recent
        self.backend: GraphBackend = CudaGraphs()
        self._shape: tuple[int, ...] | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def describe(self) -> str:
        return f"tensorrt fp16 ({self.meta.get('gpu')}{', CUDA graph' if self.cuda_graph else ''})"

    def _allocate(self, b: int, h: int, w: int) -> None:
        """Preallocate every binding for this shape (or take back those its graph was recorded with)
        and point the context at them."""
        shapes = self.spec.shapes(b, h, w)
        if (b, h, w) in self.graphs:
            self._buffers = self.graphs.get((b, h, w))[0]
        else:
            self._buffers = {n: torch.empty(shapes[n], device=self.device, dtype=torch.float32)
                             for n in (*INPUTS, OUTPUT)}
        self._shape = None  # until the context has taken every shape and address
        for n in INPUTS:
            if not self.context.set_input_shape(n, shapes[n]):
                raise UserError(f"{self.path}: TensorRT refused input {n} of shape {tuple(shapes[n])} (outside the "
                                f"engine's optimisation profile?)")
        for n, t in self._buffers.items():
            if not self.context.set_tensor_address(n, t.data_ptr()):
                raise UserError(f"{self.path}: TensorRT refused the buffer of {n}")
        self._shape = (b, h, w)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _launch(self) -> torch.Tensor:
        if not self.context.execute_async_v3(self._stream()):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return self._buffers[OUTPUT]

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        self.spec.check(b, h, w)
        if self._shape != (b, h, w):
            self._allocate(b, h, w)
        for n, t in zip(INPUTS, (x_t, cond, noise_level)):
            self._buffers[n].copy_(t, non_blocking=True)
        if self.cuda_graph:
            key = (b, h, w)
            if key not in self.graphs:
                try:  # the backend's warm-up runs it once before the capture (TensorRT may allocate then)
                    self.graphs.put(key, self._buffers, self.backend.capture(self._launch, self.device))
                except RuntimeError as e:  # a driver or plugin that cannot be captured: run without a graph
                    self.cuda_graph, self.graph_error = False, f"{type(e).__name__}: {e}"
                    self.graphs.clear()
            if self.cuda_graph:
                return self.graphs.get(key)[1]().clone()
        return self._launch().clone()
