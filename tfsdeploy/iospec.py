"""The one I/O spec of the compiled denoiser.

It names the tensors, fixes their dtypes and channel counts, and bounds the dynamic batch and
image size. The same object drives `torch.onnx.export` (dynamic shapes), the TensorRT
optimisation profile (min / opt / max) and the buffers an engine allocates, so the three can
never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tfsdeploy.errors import UserError

INPUTS = ("x_t", "cond", "noise_level")
OUTPUT = "prediction"


@dataclass(frozen=True)
class IOSpec:
    x_channels: int = 3
    cond_channels: int = 5
    size_multiple: int = 8  # H and W must be multiples of this (2 ** (levels - 1))
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_size: int = 64
    opt_size: int = 256
    max_size: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError("need 1 <= min_batch <= opt_batch <= max_batch")
        if not self.size_multiple <= self.min_size <= self.opt_size <= self.max_size:
            raise UserError("need size_multiple <= min_size <= opt_size <= max_size")
        for s in (self.min_size, self.opt_size, self.max_size):
            if s % self.size_multiple:
                raise UserError(f"image sizes must be multiples of {self.size_multiple}, got {s}")

    # ------------------------------------------------------------------ shapes
    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape for one call."""
        return {
            "x_t": (batch, self.x_channels, height, width),
            "cond": (batch, self.cond_channels, height, width),
            "noise_level": (batch,),
            OUTPUT: (batch, self.x_channels, height, width),
        }

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min / opt / max shape of each input, for a TensorRT optimisation profile."""
        lo = self.shapes(self.min_batch, self.min_size, self.min_size)
        mid = self.shapes(self.opt_batch, self.opt_size, self.opt_size)
        hi = self.shapes(self.max_batch, self.max_size, self.max_size)
        return {n: (lo[n], mid[n], hi[n]) for n in INPUTS}

    def check(self, batch: int, height: int, width: int) -> None:
        """Refuse a call the compiled artifact was not built for, with the reason."""
        if not self.min_batch <= batch <= self.max_batch:
            raise UserError(f"batch {batch} is outside the exported range {self.min_batch}..{self.max_batch}")
        for name, v in (("height", height), ("width", width)):
            if not self.min_size <= v <= self.max_size:
                raise UserError(f"{name} {v} is outside the exported range {self.min_size}..{self.max_size}")
            if v % self.size_multiple:
                raise UserError(f"{name} {v} is not a multiple of {self.size_multiple}")

    def dynamic_shapes(self):
        """`dynamic_shapes` for torch.onnx.export(dynamo=True), in input order."""
        from torch.export import Dim

        m = self.size_multiple
        # A range of one value stays static: torch.export cannot make a Dim with min == max.
        batch = Dim("batch", min=self.min_batch, max=self.max_batch) if self.max_batch > self.min_batch else None
        image: dict[int, object] = {}
        if batch is not None:
            image[0] = batch
        if self.max_size > self.min_size:
            image[2] = m * Dim("h_blocks", min=self.min_size // m, max=self.max_size // m)
            image[3] = m * Dim("w_blocks", min=self.min_size // m, max=self.max_size // m)
        return (image, dict(image), {0: batch} if batch is not None else {})

    def example_inputs(self):
        """Small example inputs for tracing. Batch 2 and a non-square size keep torch.export from
        specialising any dynamic dimension to a constant."""
        import torch

        b = max(2, self.min_batch) if self.max_batch >= 2 else 1
        h = max(self.min_size, 2 * self.size_multiple)
        w = h + self.size_multiple if h + self.size_multiple <= self.max_size else h
        g = torch.Generator().manual_seed(0)
        s = self.shapes(b, h, w)
        return (torch.randn(s["x_t"], generator=g), torch.randn(s["cond"], generator=g),
                torch.rand(s["noise_level"], generator=g))

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "IOSpec":
        try:
            return IOSpec(**d)
        except TypeError as e:
            raise UserError(f"bad I/O spec in sidecar: {e}") from None
