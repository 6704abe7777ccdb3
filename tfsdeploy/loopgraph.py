"""One CUDA graph for a whole fuse.

A DDIM fuse (or a regression model's single call) is a fixed sequence of kernels once its shape and
steps are known: the classical baseline, every denoiser call, the update arithmetic between them,
the clip and the decode (Diffusion.fuse_from_noise, which syncs with the host nowhere). It is
recorded once per (batch, size, steps, spacing) into one graph; a fuse is then two copies into the
graph's static buffers (the condition, and the initial noise each slice's own seed gives, kept on
the device by Diffusion.fuse_noise, so a slice comes out the same alone or in a batch) and one
replay. Only the few most recent keys keep their graphs (GraphCache): an older graph is reset and
its memory pool released, so a long-lived process does not grow with every shape it meets.

DDPM draws fresh noise at every step, from the per-slice CPU generators; it keeps the per-call
path (and per-call graphs, where the engine has them) rather than holding every step's noise.

Engines declare whether their calls can be recorded (`capturable`: the torch engine and an
AOTInductor package loaded single-threaded on CUDA; TensorRT keeps its own per-call graph, ONNX
Runtime none). When a capture fails, the stream and the allocator are put back as they were
(CudaGraphs.capture), and the pipeline falls back and says so.

The rules a recorded region must keep (no host synchronisation, no copy between host and device,
no random numbers, no data-dependent shapes) are checked on any device by CaptureRules, a
TorchDispatchMode that refuses the ops that break them.

The backend that records and replays is a parameter, so the logic (static buffers, keys, copies,
fallback, release) is tested on the CPU with a stand-in that replays by running the recorded
function, and CudaGraphs itself with a stand-in for the torch.cuda calls it makes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator, Protocol

import torch

from tfsdeploy.config import SampleConfig
from tfsdeploy.diffusion import Denoiser, Diffusion
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Graphs kept per cache (whole-fuse graphs of a pipeline, per-call graphs of an engine): a scan
# needs two keys (its full batches and the last one), a cohort of mixed sizes a few more.
MAX_GRAPHS = 4


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


class Replay(Protocol):
    def __call__(self) -> torch.Tensor:
        """Run the recorded work again; returns its output buffer."""
        ...

    def release(self) -> None:
        """Free the graph and its memory pool; the replay is not called again."""
        ...


class GraphBackend(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> Replay:
        """Record `fn` (which reads only static buffers) and return its replay. Raises
        RuntimeError, with the process as it was before, when the capture fails."""
        ...


class GraphCache:
    """The most recent `cap` replays by key; an evicted one is released (its memory pool freed)."""

    def __init__(self, cap: int = MAX_GRAPHS):
        self.cap = cap
        self._items: OrderedDict[tuple, tuple[Any, Replay]] = OrderedDict()

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> tuple[Any, Replay]:
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: tuple, buffers: Any, replay: Replay) -> None:
        self._items[key] = (buffers, replay)
        while len(self._items) > self.cap:
            _, (_, old) = self._items.popitem(last=False)
            old.release()

    def clear(self) -> None:
        while self._items:
            _, (_, old) = self._items.popitem(last=False)
            old.release()


class TorchCuda:
    """The torch.cuda calls a capture makes (a stand-in replaces them in the CPU tests)."""

    Stream = staticmethod(lambda device: torch.cuda.Stream(device))
    CUDAGraph = staticmethod(lambda: torch.cuda.CUDAGraph())
    stream = staticmethod(lambda s: torch.cuda.stream(s))
    current_stream = staticmethod(lambda device: torch.cuda.current_stream(device))
    synchronize = staticmethod(lambda device: torch.cuda.synchronize(device))
    pool_handle = staticmethod(lambda: torch.cuda.graph_pool_handle())

    @staticmethod
    def end_pool(device: torch.device, pool: Any) -> None:
        """Stop routing allocations to `pool` (a capture whose end failed never did)."""
        torch._C._cuda_endAllocateToPool(device.index if device.index is not None else torch.cuda.current_device(),
                                         pool)

    @staticmethod
    def release_pool(device: torch.device, pool: Any) -> None:
        torch._C._cuda_releasePool(device.index if device.index is not None else torch.cuda.current_device(), pool)


class _CudaReplay:
    def __init__(self, graph: Any, out: torch.Tensor):
        self.graph, self.out = graph, out

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out

    def release(self) -> None:
        self.graph.reset()  # frees the graph and gives its private pool back to the allocator
        self.graph = self.out = None


class CudaGraphs:
    """torch.cuda.CUDAGraph: warm-ups on a side stream (cuDNN's algorithm search and the
    allocator's first requests stay out of the graph), then the capture on a fresh stream of its
    own, in a memory pool of its own.

    torch.cuda.graph's context manager leaves its stream current when capture_end raises (and, on
    some versions, the allocator routing to the capture's pool); here the stream context is exited
    whatever happens, the capture ended, and the pool's routing ended and released, so that after a
    failure the process runs on as before: on its own stream, with a sane allocator."""

    def __init__(self, warmups: int = 1, cuda: Any = TorchCuda):
        self.warmups = warmups
        self.cuda = cuda

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> Replay:
        cuda = self.cuda
        side = cuda.Stream(device)
        side.wait_stream(cuda.current_stream(device))
        with cuda.stream(side):
            for _ in range(self.warmups):
                fn()
        cuda.current_stream(device).wait_stream(side)
        cuda.synchronize(device)
        graph, pool, stream = cuda.CUDAGraph(), cuda.pool_handle(), cuda.Stream(device)
        begun = ended = False
        try:
            with cuda.stream(stream):  # exited even when the capture raises
                graph.capture_begin(pool=pool)
                begun = True
                try:
                    out = fn()
                except BaseException:
                    with contextlib.suppress(Exception):  # takes the stream out of capture mode
                        graph.capture_end()
                        ended = True
                    raise
                graph.capture_end()
                ended = True
        except BaseException as e:
            self._abandon(graph, pool, device, begun and not ended)
            if isinstance(e, RuntimeError) or not isinstance(e, Exception):
                raise
            raise RuntimeError(f"{type(e).__name__}: {e}") from e
        cuda.current_stream(device).wait_stream(stream)
        return _CudaReplay(graph, out)

    def _abandon(self, graph: Any, pool: Any, device: torch.device, pool_held: bool) -> None:
        """After a failed capture: when its end failed too, the allocator stops routing to the pool
        and releases it (torch's graph does so only after a good end); the graph is dropped. Each
        step is tried on its own; none may hide the first error."""
        steps = [lambda: self.cuda.end_pool(device, pool), lambda: self.cuda.release_pool(device, pool)]
        for step in [*(steps if pool_held else []), graph.reset]:
            with contextlib.suppress(Exception):
                step()


# ------------------------------------------------------------------ the rules of a recorded region


class CaptureRuleError(RuntimeError):
    """An op that a CUDA graph cannot hold."""


class CaptureRules(TorchDispatchMode):
    """Refuses, on any device, what a CUDA graph cannot record: a host synchronisation
    (`.item()`, `_local_scalar_dense`, a tensor's truth value, `equal`), a data-dependent output
    shape (`nonzero`, `masked_select`, `unique`, boolean indexing), random numbers drawn inside the
    region, and any tensor on another device than `device` (a copy to or from the host). CPU scalars
    handed to an op (wrapped numbers) are allowed. Run a recorded function under it with `device`
    the one it records on; the CPU tests use the meta device as the stand-in for CUDA."""

    def __init__(self, device: str | torch.device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = set(getattr(func, "tags", ()))
        if torch.Tag.data_dependent_output in tags or func is torch.ops.aten.is_nonzero.default:
            raise CaptureRuleError(f"{func}: synchronises with the host")
        if torch.Tag.dynamic_output_shape in tags:
            raise CaptureRuleError(f"{func}: its output shape depends on the data")
        if torch.Tag.nondeterministic_seeded in tags:
            raise CaptureRuleError(f"{func}: draws random numbers inside the recorded region")
        if kwargs.get("device") is not None and torch.device(kwargs["device"]) != self.device:
            raise CaptureRuleError(f"{func}: makes a tensor on {kwargs['device']} (a copy between host and device)")
        for t in tree_leaves((args, kwargs)):
            host_scalar = isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 0
            if isinstance(t, torch.Tensor) and t.device != self.device and not host_scalar:
                raise CaptureRuleError(f"{func}: reads a tensor on {t.device} (a copy between host and device)")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise CaptureRuleError(f"{func}: makes a tensor on {t.device} (a copy between host and device)")
        return out


class WholeFuseGraphs:
    """Whole-fuse graphs for one diffusion object and one engine, keyed by shape and sampler (the
    MAX_GRAPHS most recent ones)."""

    def __init__(self, diffusion: Diffusion, denoiser: Denoiser, backend: GraphBackend | None = None):
        self.diffusion = diffusion
        self.denoiser = denoiser
        self.backend = backend or CudaGraphs()
        self.graphs = GraphCache()

    def supports(self, sample: SampleConfig) -> bool:
        return self.diffusion.deterministic(sample)

    def fuse(self, cond01: torch.Tensor, sample: SampleConfig, seeds: list[int] | None = None) -> torch.Tensor:
        """The same images as Diffusion.fuse, from one replay. Raises RuntimeError when the capture
        fails (the caller falls back)."""
        device = self.denoiser.device
        b, _, h, w = cond01.shape
        x_T = self.diffusion.fuse_noise(cond01, sample, seeds, device)
        key = (b, h, w, sample.steps, sample.spacing)
        if key not in self.graphs:
            static_cond = cond01.detach().to(device, torch.float32).clone()
            static_noise = x_T.clone()
            with recording():
                run = self.backend.capture(
                    lambda: self.diffusion.fuse_from_noise(self.denoiser, static_cond, static_noise, sample), device)
            self.graphs.put(key, (static_cond, static_noise), run)
        (static_cond, static_noise), run = self.graphs.get(key)
        static_cond.copy_(cond01, non_blocking=True)
        static_noise.copy_(x_T, non_blocking=True)
        return run().clone()  # the next replay overwrites the graph's output

    def release(self) -> None:
        """Free every graph (the pipeline leaves this path)."""
        self.graphs.clear()


__all__ = ["WholeFuseGraphs", "CudaGraphs", "GraphBackend", "GraphCache", "Replay", "TorchCuda", "CaptureRules",
           "CaptureRuleError", "MAX_GRAPHS", "recording", "is_recording"]
