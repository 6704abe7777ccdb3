"""The PyTorch engine: an eval-mode TFSDiffUNet behind the Denoiser protocol.

On a CPU it runs the model as it is (fp32). On CUDA the fast path is fp16 weights and activations
with the fp32 islands the model keeps by itself (GroupNorm, the attention softmax and the
noise-level sinusoids cast up and back), channels-last memory, and one CUDA graph per input
shape: the first call at a shape captures the whole forward pass, later calls copy their inputs
into the graph's static buffers and replay it, so a denoiser call costs one launch instead of
hundreds. `torch.compile` is optional; it pays its compile time once per process.
"""

from __future__ import annotations

import torch

from tfsdeploy.model import TFSDiffUNet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchDenoiser:
    name = "torch"

    def __init__(self, model: TFSDiffUNet, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False, channels_last: bool = False, cuda_graph: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.model = model.to(self.device, dtype).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.compiled = compile
        # reduce-overhead mode makes torch.compile capture CUDA graphs itself
        mode = "reduce-overhead" if compile and self.device.type == "cuda" else None
        self._run = torch.compile(self.model, mode=mode) if compile else self.model  # compiles on the first call
        self.cuda_graph = cuda_graph and self.device.type == "cuda" and not compile
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.graph_error = ""  # why capture failed, when it did (describe() then no longer says CUDA graph)

    def describe(self) -> str:
        kind = "compiled" if self.compiled else "eager"
        extras = [x for x, on in (("channels-last", self.channels_last), ("CUDA graph", self.cuda_graph)) if on]
        return (f"torch {kind} {str(self.dtype).replace('torch.', '')} ({self.device.type}"
                + "".join(f", {x}" for x in extras) + ")")

    @torch.no_grad()
    def _forward(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x_t.to(self.device, self.dtype).contiguous(memory_format=fmt)
        c = cond.to(self.device, self.dtype).contiguous(memory_format=fmt)
        return self._run(x, c, noise_level.to(self.device, torch.float32)).float()

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            with torch.inference_mode():
                return self._forward(x_t, cond, noise_level)
        return self._replay(x_t, cond, noise_level)

    def _replay(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        key = (tuple(x_t.shape), tuple(cond.shape))
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(x_t, cond, noise_level)
            except RuntimeError as e:  # a driver or op that cannot be captured: stay correct, run eagerly
                self.cuda_graph, self.graph_error = False, f"{type(e).__name__}: {e}"
                with torch.inference_mode():
                    return self._forward(x_t, cond, noise_level)
        graph, static, out = self._graphs[key]
        for buf, new in zip(static, (x_t, cond, noise_level)):
            buf.copy_(new, non_blocking=True)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _capture(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor):
        """Record one forward pass at this shape into a CUDA graph (warmed up on a side stream first,
        so that cuDNN's algorithm search and the allocator's first requests stay out of the graph)."""
        static = [t.detach().to(self.device, torch.float32).clone() for t in (x_t, cond, noise_level)]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(*static)
        return graph, static, out
