"""One CUDA graph for a whole fuse.

A DDIM fuse (or a regression model's single call) is a fixed sequence of kernels once its shape and
steps are known: the classical baseline, every denoiser call, the update arithmetic between them,
the clip and the decode (Diffusion.fuse_from_noise, which syncs with the host nowhere). It is
recorded once per (batch, size, steps, spacing) into one graph; a fuse is then two copies into the
graph's static buffers (the condition, and the initial noise drawn from each slice's own CPU
generator as always, so a slice comes out the same alone or in a batch) and one replay.

DDPM draws fresh noise at every step, from the per-slice CPU generators; it keeps the per-call
path (and per-call graphs, where the engine has them) rather than holding every step's noise.

Engines declare whether their calls can be recorded (`capturable`: the torch engine and an
AOTInductor package on CUDA; TensorRT keeps its own per-call graph, ONNX Runtime none). When a
capture fails, the pipeline falls back to per-call replay and says so.

The backend that records and replays is a parameter, so the logic (static buffers, keys, copies,
fallback) is tested on the CPU with a stand-in that replays by running the recorded function.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Protocol

import torch

from tfsdeploy.config import SampleConfig
from tfsdeploy.diffusion import Denoiser, Diffusion


_STATE = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """While a whole fuse is warmed up and recorded, engines run their calls as plain kernels: no
    per-call graph of their own inside (or beside) the whole-fuse graph."""
    before = is_recording()
    _STATE.on = True
    try:
        yield
    finally:
        _STATE.on = before


def is_recording() -> bool:
    return getattr(_STATE, "on", False)


class GraphBackend(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
        """Record `fn` (which reads only static buffers) and return a replay that runs it again and
        returns its output buffer."""
        ...


class CudaGraphs:
    """torch.cuda.CUDAGraph: one warm-up on a side stream (cuDNN's algorithm search and the
    allocator's first requests stay out of the graph), then the capture."""

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class WholeFuseGraphs:
    """Whole-fuse graphs for one diffusion object and one engine, keyed by shape and sampler."""

    def __init__(self, diffusion: Diffusion, denoiser: Denoiser, backend: GraphBackend | None = None):
        self.diffusion = diffusion
        self.denoiser = denoiser
        self.backend = backend or CudaGraphs()
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]] = {}

    def supports(self, sample: SampleConfig) -> bool:
        return self.diffusion.deterministic(sample)

    def fuse(self, cond01: torch.Tensor, sample: SampleConfig, seeds: list[int] | None = None) -> torch.Tensor:
        """The same images as Diffusion.fuse, from one replay. Raises RuntimeError when the capture
        fails (the caller falls back)."""
        device = self.denoiser.device
        b, _, h, w = cond01.shape
        x_T = self.diffusion.fuse_noise(cond01, sample, seeds)
        key = (b, h, w, sample.steps, sample.spacing)
        if key not in self._graphs:
            static_cond = cond01.detach().to(device, torch.float32).clone()
            static_noise = x_T.to(device)
            with recording():
                run = self.backend.capture(
                    lambda: self.diffusion.fuse_from_noise(self.denoiser, static_cond, static_noise, sample), device)
            self._graphs[key] = (static_cond, static_noise, run)
        static_cond, static_noise, run = self._graphs[key]
        static_cond.copy_(cond01, non_blocking=True)
        static_noise.copy_(x_T, non_blocking=True)
        return run().clone()  # the next replay overwrites the graph's output


__all__ = ["WholeFuseGraphs", "CudaGraphs", "GraphBackend", "recording", "is_recording"]
