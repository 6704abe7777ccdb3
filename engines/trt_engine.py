"""The TensorRT engine: preallocated bindings, execute_async_v3 on torch's current stream, and an
optional CUDA graph for static shapes."""

from __future__ import annotations

from pathlib import Path

import torch

from tfsdeploy.artifacts import read_sidecar
from tfsdeploy.errors import UserError
from tfsdeploy.iospec import INPUTS, OUTPUT, IOSpec


class TrtDenoiser:
    name = "trt"

    def __init__(self, path: str | Path, cuda_graph: bool = False):
        from export.trt_build import check_engine_meta, gpu_identity, tensorrt_status

        trt, reason = tensorrt_status()
        if trt is None:
            raise UserError(f"cannot run {path}: {reason}")
        self.path = Path(path)
        self.meta = read_sidecar(self.path)
        check_engine_meta(self.meta, trt.__version__, gpu_identity(), self.path)
        self.spec = IOSpec.from_json(self.meta["io"])
        self.precision = "fp16"
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
