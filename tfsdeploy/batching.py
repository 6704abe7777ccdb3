"""How many slices of a scan go into one denoiser call: chosen by measurement on the machine that runs it.

On a GPU a larger batch keeps the device busy, and the batch is as large as its memory allows. On a
CPU a larger batch can cost time: the arithmetic per slice is the same, while the activations of
several slices no longer fit in the caches and the allocator works harder (on a quiet 2-core CPU,
batch 4 took 2.1x the time per slice of batch 1 with torch and 1.3x with ONNX Runtime,
benchmarks/reports/cpu-engines/). On the same CPU under heavy load, batch 4 often took half the
time per slice instead (benchmarks/reports/cpu-batching/). Which wins depends on the CPU, its load,
the engine, the model and the size, so a CPU scan measures it on its own first slices, whose
results are kept:

- one slice is fused first, untimed, so that the one-off costs of a first call (kernel selection,
  the allocator's first growth) are not charged to batch 1;
- then batches of 1, 2, 4, ... up to the largest the memory allows are timed once each, on the
  next slices in order;
- a larger batch is kept only if it is faster per slice than the best so far by MARGIN (it costs
  memory); the first one that is not ends the measurement, and the rest of the scan runs at the
  fastest.

    choice = fuse_in_batches(len(scan), run, cap=4, measure=True, on_choice=print_line)

`run(start, count)` fuses slices start .. start + count - 1; a slice's result does not depend on
its batch (each slice has its own noise), so the order and batch sizes change only the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

# A larger batch must save at least this fraction of the time per slice to be chosen: it holds
# more memory, and one timed call on a shared machine is noisy.
MARGIN = 0.05


@dataclass(frozen=True)
class BatchChoice:
    """The batch a scan runs at and how it was chosen: "set" (--batch-size), "measured" (seconds per
    slice of each batch timed, in `per_slice_s`), "by memory" (a GPU, or a CPU whose memory holds
    one slice at a time) or "one slice" (a scan of one slice: nothing to choose)."""

    batch: int
    how: str
    per_slice_s: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        """E.g. "measured: 0.93 s a slice at batch 1, 1.31 s at 2"."""
        if not self.per_slice_s:
            return self.how
        timed = [f"{s:.2f} s a slice at batch {b}" if i == 0 else f"{s:.2f} s at {b}"
                 for i, (b, s) in enumerate(self.per_slice_s.items())]
        return f"{self.how}: {', '.join(timed)}"


def fuse_in_batches(n: int, run: Callable[[int, int], None], batch: int = 0, cap: int = 1, measure: bool = False,
                    on_choice: Callable[[BatchChoice], None] = lambda c: None,
                    clock: Callable[[], float] = time.perf_counter, margin: float = MARGIN) -> BatchChoice:
    """Fuse slices 0 .. n-1 through `run(start, count)`, in order: at `batch` when it is given ("set"),
    else at the fastest batch measured up to `cap` when `measure` is true, else at `cap` ("by
    memory"). `on_choice` hears the choice once it is made (for a measured one, after the slices
    that measured it). Returns the choice."""
    if n < 1:
        raise ValueError("a scan has at least one slice")
    done = 0
    if batch:
        choice = BatchChoice(batch, "set")
    elif not measure or cap <= 1:
        choice = BatchChoice(max(1, cap), "by memory")
    else:
        run(0, 1)  # untimed: a first call pays one-off costs that are no batch's
        done = 1
        per_slice: dict[int, float] = {}
        best, b = 0, 1
        while b <= cap and done + b <= n:
            t0 = clock()
            run(done, b)
            per_slice[b] = (clock() - t0) / b
            done += b
            if best and per_slice[b] > per_slice[best] * (1 - margin):
                break
            best, b = b, 2 * b
        choice = BatchChoice(best or 1, "measured" if per_slice else "one slice", per_slice)
    on_choice(choice)
    while done < n:
        count = min(choice.batch, n - done)
        run(done, count)
        done += count
    return choice


__all__ = ["BatchChoice", "MARGIN", "fuse_in_batches"]
