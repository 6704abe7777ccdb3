"""The AOTInductor engine: a `.pt2` package that `torch.export` + `aoti_compile_and_package` built
ahead of time (export/aoti_export.py), loaded in seconds and run without Python in the loop.

A package is native code for one machine: CUDA kernels for one GPU architecture, or C++ for one CPU
instruction set, linked against one torch. Its sidecar records all three, and a package built by
another torch, for another GPU or for another CPU instruction set is refused with the reason,
never loaded (a CPU package compiled for AVX-512 would crash on an AVX2-only CPU).

A package is loaded with torch's single-threaded runner where torch has one: the default runner
checks, with an event query, that its previous call finished, which a stream being captured
refuses, so only a single-threaded package can be recorded into a whole-fuse CUDA graph. Loading
extracts the package into a temporary folder; it goes into the tfsdeploy cache and is removed
when the engine is (or, after a process killed outright, by the next load).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

from tfsdeploy.artifacts import read_sidecar
from tfsdeploy.errors import UserError, quiet
from tfsdeploy.fileio import _temp_prefix, remove_stale_temporaries
from tfsdeploy.iospec import IOSpec
from tfsdeploy.paths import cache_dir


def device_identity(device_type: str) -> dict[str, str]:
    """What a package is native to on this machine: the GPU and its compute capability, or the CPU's
    architecture and the vector instruction set Inductor generates code for."""
    if device_type == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"device": "cuda", "gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"device": "cpu", "machine": platform.machine(), "cpu_isa": str(pick_vec_isa()) or "none"}


def identity_text(ident: dict[str, Any]) -> str:
    if ident.get("device") == "cuda":
        return f"{ident.get('gpu')} (sm {ident.get('compute_capability')})"
    return f"a CPU ({ident.get('machine')}, {ident.get('cpu_isa')})"


def check_package_meta(meta: dict[str, Any], where: str | Path) -> dict[str, str]:
    """Refuse a package built by another torch or for another device; returns this machine's identity."""
    fix = "rebuild it with `tfsdeploy export --aoti`"
    if meta.get("kind") != "aoti":
        raise UserError(f"{where}: not an AOTInductor package")
    if meta.get("torch") != torch.__version__:
        raise UserError(f"{where} was built with torch {meta.get('torch')}, this is torch {torch.__version__}; {fix}")
    device = meta.get("device")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{where} was built for {identity_text(meta)}, and no CUDA GPU is available here")
    if device not in ("cuda", "cpu"):
        raise UserError(f"{where}: unknown device {device!r} in its sidecar")
    here = device_identity(device)
    if any(meta.get(k) != v for k, v in here.items()):
        raise UserError(f"{where} was built for {identity_text(meta)}, this is {identity_text(here)}; {fix}")
    return here


# torch.export and Inductor print progress and warnings meant for their developers
COMPILER_LOGGERS = ("torch._inductor", "torch._dynamo", "torch.export", "torch._export", "torch.fx")


class AotiDenoiser:
    """A loaded AOTInductor package behind the Denoiser protocol (fp32 in and out, whatever it
    computes in)."""

    name = "aoti"

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None):
        """`meta` is the sidecar; pass it only for a package being verified before its sidecar exists."""
        self.path = Path(path)
        self.meta = meta if meta is not None else read_sidecar(self.path)
        check_package_meta(self.meta, self.path)
        self.spec = IOSpec.from_json(self.meta["io"])
        self.precision = self.meta.get("precision", "fp32")
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        cuda = self.meta["device"] == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        try:
            with quiet(*COMPILER_LOGGERS):
                self.runner, self.single_threaded, self._scratch = load_runner(self.path)
        except Exception as e:  # noqa: BLE001 - a corrupt package, or a library it links against is missing
            raise UserError(f"{self.path}: cannot load the AOTInductor package ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        # Its kernels run on the current stream and allocate from torch's caching allocator; loaded
        # single-threaded, it checks no event, so a whole-fuse CUDA graph can record its calls.
        self.capturable = cuda and self.single_threaded
        if self._scratch is not None:
            weakref.finalize(self, shutil.rmtree, self._scratch, True)

    def describe(self) -> str:
        where = self.meta.get("gpu") if self.device.type == "cuda" else f"cpu, {self.meta.get('cpu_isa')}"
        return f"aoti {self.precision} ({where})"

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        self.spec.check(b, h, w)
        args = [t.to(self.device, torch.float32).contiguous() for t in (x_t, cond, noise_level)]
        with torch.inference_mode():
            out = self.runner(*args)
        return out.float()


def load_runner(path: Path) -> tuple[Any, bool, Path | None]:
    """(the loaded package, whether its runner is single-threaded, the folder it was extracted into)."""
    from engines.torch_engine import use_compile_cache

    use_compile_cache()  # what Inductor writes while loading goes to the tfsdeploy cache too
    load = torch._inductor.aoti_load_package
    single = "run_single_threaded" in inspect.signature(load).parameters
    with extraction_folder() as scratch:
        runner = load(str(path), run_single_threaded=True) if single else load(str(path))
    return runner, single, scratch


@contextlib.contextmanager
def extraction_folder() -> Iterator[Path | None]:
    """Point the temporary folder that torch's package loader extracts into (its TMPDIR) at a new
    folder in the tfsdeploy cache, and yield it; first remove the ones of processes that no longer
    run. None, and the system's temporary folder, when the cache cannot be written."""
    root = cache_dir() / "aoti-load"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root / "run")
        scratch = Path(tempfile.mkdtemp(prefix=_temp_prefix(root / "run"), suffix=".tmp", dir=root))
    except OSError:
        yield None
        return
    tempfile.gettempdir()  # Python's own choice is made (and kept) before TMPDIR changes
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before


__all__ = ["AotiDenoiser", "load_runner", "check_package_meta", "device_identity", "identity_text", "COMPILER_LOGGERS"]
