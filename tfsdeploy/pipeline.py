"""FusionPipeline: from a model to fused images, the one path behind fuse, demo, evaluate and bench.

It owns everything between "this model, this scale" and a fused image:

- the checkpoint that runs (a bundle's member for the scale) and its default sampler steps;
- the engine (`auto`: on CUDA a valid TensorRT engine, else a valid AOTInductor package, else the
  torch fast path; on a CPU a valid fp32 ONNX export, else torch), its device and precision, and
  its compile / CUDA-graph mode; long jobs on CUDA build the AOTInductor package on first use;
- on CUDA, a whole DDIM fuse recorded into one CUDA graph (tfsdeploy.loopgraph);
- the sampler, whose state lives on the engine's device (the condition moves there once);
- the batch of a whole scan: by the memory a GPU has, by measurement on a CPU (tfsdeploy.batching).

    pipe = FusionPipeline.load(model, scale=4)
    fused = pipe(cond01)                       # [B,5,H,W] in [0, 1] -> [B,3,H,W] on pipe.device
    img = pipe.fuse_triplet(read_triplet(t1, t2, func))   # [3,h,w] on the CPU
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tfsdeploy.batching import BatchChoice, fuse_in_batches
from tfsdeploy.checkpoint import Configs, build_from_checkpoint
from tfsdeploy.config import AUTO_ORDER, ENGINES, MAX_BATCH, EngineConfig, SampleConfig, artifact_engine
from tfsdeploy.diffusion import Denoiser, Diffusion
from tfsdeploy.ensemble import fuse_views
from tfsdeploy.errors import UserError
from tfsdeploy.imaging import quantise_uint8
from tfsdeploy.inputs import (Triplet, as_triplet, check_fusable, check_scale, check_scale_size, make_condition,
                              upsample)
from tfsdeploy.loopgraph import GraphBackend, WholeFuseGraphs
from tfsdeploy.model import activation_bytes
from tfsdeploy.modelref import ModelRef, resolve_model

Progress = Callable[[int, int], None]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch here")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def torch_denoiser(ckpt: str | Path, device: torch.device, cfg: EngineConfig) -> tuple[Denoiser, Configs]:
    """The torch engine for a checkpoint, on the fast path for its device unless told otherwise."""
    from engines.torch_engine import DTYPES, TorchDenoiser

    cuda = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("fp16" if cuda else "fp32")
    model, ck = build_from_checkpoint(ckpt)
    return TorchDenoiser(model, device, DTYPES[precision], compile=cfg.compile,
                         channels_last=bool(cfg.channels_last),
                         cuda_graph=cuda if cfg.cuda_graph is None else cfg.cuda_graph), ck.configs


def load_denoiser(ckpt: str | Path, cfg: EngineConfig = EngineConfig(),
                  log: Callable[[str], None] = lambda s: None,
                  notice: Callable[[str], None] = lambda s: None) -> tuple[Denoiser, Configs]:
    """The denoiser for a checkpoint or an exported artifact, as `cfg` asks. `auto` never leaves a
    GPU idle: on CUDA it takes a valid TensorRT engine, else a valid AOTInductor package (built now,
    into the cache, when `cfg.build_missing` asks for it), else the torch fast path; on a CPU a valid
    fp32 ONNX export, else torch. `log` hears why a candidate was skipped, `notice` what the user
    should know (a compile about to take a while, or one that failed)."""
    from engines.loader import find_artifact, load_artifact

    device = resolve_device(cfg.device)
    if cfg.export_dir is not None and not Path(cfg.export_dir).is_dir():
        raise UserError(f"--export-dir {cfg.export_dir}: no such folder")
    trt_graph = bool(cfg.cuda_graph)
    kind = artifact_engine(ckpt)
    if kind is not None:
        if cfg.engine not in ("auto", *(e for e in ENGINES if e.startswith(kind))):
            raise UserError(f"{ckpt} is an exported artifact; it cannot run on engine {cfg.engine}")
        return load_artifact(ckpt, cfg.device if kind == "aoti" else device.type, cfg.threads, trt_graph)
    if cfg.engine == "torch":
        return torch_denoiser(ckpt, device, cfg)
    if cfg.engine != "auto":
        return load_artifact(find_artifact(ckpt, cfg.engine, cfg.export_dir, device.type), device.type, cfg.threads,
                             trt_graph)
    for candidate in AUTO_ORDER[device.type]:
        try:
            return load_artifact(find_artifact(ckpt, candidate, cfg.export_dir, device.type), device.type,
                                 cfg.threads, trt_graph)
        except UserError as e:
            log(f"auto: skipping {candidate}: {e}")
    if cfg.build_missing and device.type == "cuda" and not cfg.compile and cfg.precision in ("auto", "fp16"):
        try:
            return build_package(ckpt, notice)
        except UserError as e:
            notice(f"warning: {e}; running the torch engine instead")
        except (OSError, RuntimeError) as e:  # the cache folder, the compiler or the GPU refused
            notice(f"warning: building the AOTInductor package failed ({type(e).__name__}: "
                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); running the torch engine instead")
    return torch_denoiser(ckpt, device, cfg)


def build_package(ckpt: str | Path, notice: Callable[[str], None]) -> tuple[Denoiser, Configs]:
    """Compile this checkpoint's AOTInductor package for this GPU into the cache, and load it: the
    first long job pays the compile, every later process only the load."""
    from engines.aoti_engine import AotiDenoiser
    from export.aoti_export import export_aoti
    from export.onnx_export import default_spec
    from tfsdeploy.artifacts import checkpoint_fingerprint, compiled_cache_dir

    model, ck = build_from_checkpoint(ckpt)
    spec = default_spec(model, max_batch=MAX_BATCH["cuda"])
    del model
    out = compiled_cache_dir(checkpoint_fingerprint(ckpt)["sha256"])
    path, _ = export_aoti(ckpt, out, "cuda", spec, log=notice, remember_failure=True)
    return AotiDenoiser(path), ck.configs


def free_memory(device: torch.device) -> int:
    """Bytes this process may still use on `device`: free GPU memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class FusionPipeline:
    """A loaded model at one scale, ready to fuse. See the module docstring."""

    def __init__(self, denoiser: Denoiser, configs: Configs, scale: int, sample: SampleConfig,
                 source: str | Path = "", whole_loop: bool = True, notice: Callable[[str], None] = lambda s: None,
                 graphs: GraphBackend | None = None, fallback: Callable[[], Denoiser] | None = None):
        """`whole_loop`: record a whole DDIM fuse into one CUDA graph when the engine can be recorded
        (`graphs` replaces the CUDA backend in tests). `notice` hears a capture that failed.
        `fallback` makes the torch engine for a compiled engine that `auto` chose: the pipeline
        switches to it, once and saying why, when the compiled engine cannot take a request (a size
        or batch outside its range) or cannot be recorded and has no graphs of its own (an
        AOTInductor package), rather than refusing or running with a host sync per call."""
        check_scale(scale)
        check_fusable(configs.model, source or "model")
        self.configs = configs
        self.diffusion = Diffusion.from_configs(configs)
        if sample.steps > self.diffusion.schedule.num_steps:
            raise UserError(f"--steps {sample.steps} exceeds the schedule's T = {self.diffusion.schedule.num_steps}")
        self.scale = scale
        self.sample = sample
        self.source = Path(source) if source else None
        self.notice = notice
        self.whole_loop = whole_loop
        self.fallback = fallback
        self._graphs = graphs
        self._use(denoiser)
        if whole_loop and self.loop is None and self._unrecordable_package():
            self._fall_back("this AOTInductor package cannot be recorded into a CUDA graph (this torch has no "
                            "single-threaded package runner)")

    def _use(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        recordable = self.whole_loop and denoiser.capturable and (self._graphs is not None or
                                                                  denoiser.device.type == "cuda")
        self.loop = WholeFuseGraphs(self.diffusion, denoiser, self._graphs) if recordable else None

    def _unrecordable_package(self) -> bool:
        """An AOTInductor package on CUDA that a whole-fuse graph cannot record: it has no graphs of
        its own, so it would run with a host sync at every call."""
        return getattr(self.denoiser, "name", "") == "aoti" and self.denoiser.device.type == "cuda" and not self.loop

    def _fall_back(self, why: str) -> bool:
        """Switch to the torch engine, saying why; False when there is none to switch to."""
        if self.fallback is None:
            return False
        make, self.fallback = self.fallback, None
        if self.loop is not None:
            self.loop.release()
        self.notice(f"warning: {why}; running the torch engine instead")
        self._use(make())
        return True

    def _check_range(self, batch: int, height: int, width: int) -> None:
        """Refuse, or hand to the torch engine, a request outside a compiled engine's range."""
        spec = getattr(self.denoiser, "spec", None)
        if spec is None:
            return
        try:
            spec.check(batch, height, width)
        except UserError as e:
            if not self._fall_back(f"{e} of engine {self.denoiser.describe()}"):
                raise

    @classmethod
    def load(cls, model: str | Path | ModelRef | None, scale: int, sample: SampleConfig = SampleConfig(),
             engine: EngineConfig = EngineConfig(), log: Callable[[str], None] = lambda s: None,
             notice: Callable[[str], None] = lambda s: None) -> "FusionPipeline":
        """The pipeline for `model` (checkpoint, run folder, bundle, exported artifact, None for the
        default model, or a resolved tfsdeploy.modelref.ModelRef) at `scale`: a bundle's member for the
        scale, with its recommended sampler settings where `sample` gives none. `log` hears why `auto`
        skipped an engine; `notice` what a user should see (a first-use compile, a graph capture that
        failed)."""
        check_scale(scale)
        ref = resolve_model(model)
        sample = ref.sample_for(scale, sample)
        member = ref.fusable_member(scale)
        if engine.threads:
            torch.set_num_threads(engine.threads)
        denoiser, configs = load_denoiser(member, engine, log, notice)
        whole_loop = engine.whole_loop and engine.cuda_graph is not False
        fallback = None
        compiled = getattr(denoiser, "name", "torch") != "torch"
        if engine.engine == "auto" and compiled and artifact_engine(member) is None:
            def fallback() -> Denoiser:  # the engine `auto` takes when no compiled one is there
                return torch_denoiser(member, denoiser.device, engine)[0]
        return cls(denoiser, configs, scale, sample, member, whole_loop=whole_loop, notice=notice,
                   fallback=fallback)

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def image_size(self) -> int:
        return self.configs.model.image_size

    @property
    def size_multiple(self) -> int:
        return self.configs.model.size_multiple

    @property
    def steps(self) -> int:
        """Denoiser calls per image (DDPM without a count runs all T)."""
        if self.configs.diffusion.objective == "regression":
            return 1
        return self.sample.steps or self.diffusion.schedule.num_steps

    def describe(self) -> str:
        where = f", model {self.source}" if self.source else ""
        graph = ", one CUDA graph per fuse" if self.loop is not None and self.loop.supports(self.sample) else ""
        gate = self.backproject_gate
        inputs = (f", back-projection {self.backproject:g}" if self.backproject else "") + \
            (f" (less from noise ratio {gate[0]:g}, none from {gate[1]:g})" if gate else "") + \
            (", ensemble of 8 views" if self.sample.ensemble else "")
        return (f"x{self.scale}{inputs}, {self.sample.sampler}-{self.steps}, engine {self.denoiser.describe()}"
                f"{graph}{where}")

    @property
    def backproject(self) -> float:
        """The strength of the back-projection the inputs are upsampled with (tfsdeploy.inputs.upsample)."""
        return self.sample.backproject or 0.0

    @property
    def backproject_gate(self) -> tuple[float, float] | None:
        """The noise gate on that strength (tfsdeploy.inputs.gated_strength), or None."""
        return self.sample.backproject_gate if self.backproject else None

    def upsample(self, lr01: torch.Tensor, size: int) -> torch.Tensor:
        """Low-resolution sources [B,5,h,w] -> the condition [B,5,size,size] this model is fed."""
        return upsample(lr01, size, self.backproject, self.backproject_gate)

    def check_size(self, size: int) -> int:
        """The output side for `size` (0 = the model's training size), validated."""
        size = size or self.image_size
        if size < 1:
            raise UserError(f"--size must be positive, got {size}")
        check_scale_size(self.scale, size, self.size_multiple)
        return size

    def slice_bytes(self, size: int) -> int:
        """Memory one slice of `size` needs: the network's activations in its precision, plus the
        sampler's state (a few [3,size,size] and [5,size,size] fp32 tensors)."""
        elem = torch.tensor([], dtype=self.denoiser.dtype).element_size()
        return activation_bytes(self.configs.model, size, elem) + 40 * 4 * size * size

    def max_batch(self, size: int, cap: int = 0) -> int:
        """The largest batch of `size` slices that fits in half the device's free memory (at most
        `cap`, or MAX_BATCH for the device, and a compiled engine's largest batch). Refuses a size whose
        single slice does not fit."""
        spec = getattr(self.denoiser, "spec", None)  # a compiled engine's I/O range
        if spec is not None:
            cap = min(cap or MAX_BATCH.get(self.device.type, 4), spec.max_batch)
        need, free = self.slice_bytes(size), free_memory(self.device)
        budget = free // 2
        if need > budget:
            raise UserError(f"a {size}x{size} slice needs about {need / 2**30:.1f} GiB with this model, and "
                            f"{free / 2**30:.1f} GiB are free on {self.device.type}; use a smaller --size")
        return max(1, min(cap or MAX_BATCH.get(self.device.type, 4), budget // need))

    # ------------------------------------------------------------------ fusing
    def __call__(self, cond01: torch.Tensor, seeds: list[int] | None = None,
                 progress: Progress | None = None) -> torch.Tensor:
        """Condition [B,5,H,W] in [0, 1] -> fused RGB [B,3,H,W] in [0, 1], on the engine's device.
        Each slice's noise comes from its own seed (`seeds`, else the sampler's seed), so a slice
        comes out the same alone or in any batch. With the sampler's `ensemble`, the mean of the
        fused images of the condition's 8 flips and quarter turns (tfsdeploy.ensemble)."""
        if not self.sample.ensemble:
            return self._fuse(cond01, seeds, progress)
        spec = getattr(self.denoiser, "spec", None)  # a compiled engine takes at most its largest batch
        per_call = MAX_BATCH.get(self.device.type, 4) if spec is None else spec.max_batch
        fused = fuse_views(lambda batch, s: self._fuse(batch, s), cond01, seeds, per_call)
        if progress is not None:
            progress(self.steps, self.steps)
        return fused

    def _fuse(self, cond01: torch.Tensor, seeds: list[int] | None = None,
              progress: Progress | None = None) -> torch.Tensor:
        h, w = cond01.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise UserError(f"image size {h}x{w} is not a multiple of {self.size_multiple} for this model")
        self._check_range(cond01.shape[0], h, w)
        if self.loop is not None and self.loop.supports(self.sample):
            try:
                fused = self.loop.fuse(cond01, self.sample, seeds)
                if progress is not None:
                    progress(self.steps, self.steps)
                return fused
            except RuntimeError as e:  # a driver or an op that cannot be recorded: stay correct
                self.loop.release()
                self.loop = None
                why = (f"recording the whole fuse as one CUDA graph failed ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
                # a package has no graphs of its own: the torch engine's are faster than its calls
                if getattr(self.denoiser, "name", "") == "aoti" and self._fall_back(why):
                    return self._fuse(cond01, seeds, progress)
                self.notice(f"warning: {why}; replaying per call")
        return self.diffusion.fuse(self.denoiser, cond01, self.sample, seeds, progress)

    def fuse_triplet(self, trip: Triplet, size: int = 0, progress: Progress | None = None) -> torch.Tensor:
        """Three registered images -> fused RGB [3,h,w] on the CPU, cropped back to the input's
        aspect ratio (see tfsdeploy.inputs for the input rule)."""
        size = self.check_size(size)
        self.max_batch(size, cap=1)  # refuse, before any work, a size this device cannot hold
        cond01, (top, bottom, left, right) = make_condition(trip, self.scale, size, self.backproject,
                                                            self.backproject_gate)
        return self(cond01, progress=progress)[0, :, top:bottom, left:right].float().cpu()

    def fuse_files(self, t1: str | Path, t2: str | Path, func: str | Path, out: str | Path, size: int = 0,
                   progress: Progress | None = None) -> torch.Tensor:
        """Read three image files, fuse them and write the PNG (atomically); returns the image."""
        from tfsdeploy.imaging import check_writable, write_png
        from tfsdeploy.inputs import read_triplet

        check_writable(out)
        img = self.fuse_triplet(read_triplet(t1, t2, func), size, progress)
        write_png(out, img)
        return img

    def fuse_scan(self, scan, size: int = 0, batch_size: int = 0, progress: Progress | None = None,
                  on_choice: Callable[[BatchChoice], None] = lambda c: None) -> np.ndarray:
        """Every slice of a scan (tfsdeploy.scans.Scan) -> uint8 [N,3,h,w]; only the uint8 result is kept
        for the whole scan. The batch is `batch_size` when given; else on a CPU the fastest measured on
        the scan's first slices (tfsdeploy.batching), on a GPU as many as half its free memory holds;
        `on_choice` hears it once it is chosen."""
        size = self.check_size(size)
        cap = self.max_batch(size)  # also refuses, before any work, a size this device cannot hold
        out: np.ndarray | None = None
        n = len(scan)
        self._check_range(min(batch_size or cap, n), size, size)  # before any work

        def run(start: int, count: int) -> None:
            nonlocal out
            conds, box = [], None
            for i in range(start, start + count):
                s = scan.slice(i)
                cond01, box = make_condition(as_triplet(s.t1, s.t2, s.func), self.scale, size, self.backproject,
                                             self.backproject_gate)
                conds.append(cond01)
            top, bottom, left, right = box
            fused = self(torch.cat(conds))[:, :, top:bottom, left:right]
            u8 = quantise_uint8(fused).cpu().numpy()
            if out is None:
                out = np.empty((n, *u8.shape[1:]), dtype=np.uint8)
            out[start:start + count] = u8
            if progress is not None:
                progress(start + count, n)

        fuse_in_batches(n, run, batch_size, cap, measure=self.device.type == "cpu", on_choice=on_choice)
        assert out is not None  # a scan has at least one slice
        return out


__all__ = ["FusionPipeline", "load_denoiser", "torch_denoiser", "resolve_device", "free_memory", "MAX_BATCH"]
