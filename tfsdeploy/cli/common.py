"""What every command shares: the one-line error handling, option parsers, progress bars, logging
and the engine options' config."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import typer
import typer.core

from tfsdeploy.errors import UserError

V = TypeVar("V", int, float)


class OneLineErrors(typer.core.TyperGroup):
    """The command group, with option parsing errors (a missing argument, `--steps abc`, an unknown
    option) printed as one `error:` line and exit code 2, like every other error a user can cause."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        _digits_only(self)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as e:  # the command-line parser's own exception types (vendored or not)
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help is already shown
                sys.exit(0)
            if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
                if type(e).__name__ == "Abort":
                    typer.echo("error: aborted", err=True)
                    sys.exit(1)
                raise
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _digits_only(command) -> None:
    """Make every number option of `command` and its subcommands refuse underscores: Python reads
    "0_5" as 5, which no user means. Done once per parameter, before the parser's own conversion."""
    for param in getattr(command, "params", ()):
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)  # typer's own parser
        kind = str(getattr(getattr(param, "type", None), "name", ""))  # typer on click
        numeric = annotation in (int, float) or kind.startswith(("integer", "float"))
        if numeric and not getattr(param, "_digits_only", False):
            param.process_value = _refusing_underscores(param, param.process_value)
            param._digits_only = True
    for sub in getattr(command, "commands", {}).values():
        _digits_only(sub)


def _refusing_underscores(param, process_value):
    def process(ctx, value):
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, str) and "_" in v:
                raise typer.BadParameter(f"{v!r} is not a number (write it without underscores)", ctx=ctx,
                                         param=param)
        return process_value(ctx, value)

    return process


ALLOCATOR_FAILURES = ("out of memory", "can't allocate memory", "cannot allocate memory", "alloc_cpu")
OUT_OF_MEMORY = "out of memory; try a smaller --size or --batch-size"


def user_errors(fn):
    """Turn every error a user can cause into one line on stderr and a non-zero exit: bad input
    (UserError), an interrupt, running out of memory (CPU or GPU allocator), and the file system
    refusing a read or a write (full disk, no permission)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail(OUT_OF_MEMORY)
        except RuntimeError as e:  # torch.OutOfMemoryError, and the CPU allocator's RuntimeError
            if not any(m in str(e).lower() for m in ALLOCATOR_FAILURES):
                raise
            fail(OUT_OF_MEMORY)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}")

    return wrapper


def fail(message: str, code: int = 2):
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code) from None


def long_running() -> None:
    """Training, evaluation, export, scans and benchmarks run long enough to need the cyclic
    collector, which `main` turns off for one-shot commands."""
    gc.enable()


# --------------------------------------------------------------------------- parsing


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(_number(int, s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise UserError(f"{what} takes numbers separated by commas (got {text!r})") from None


def parse_scales(text: Optional[str]) -> Optional[tuple[int, ...]]:
    return None if text is None else parse_ints(text, "--scales")


def scale_values(text: str, option: str, value: Callable[[str], V], form: str,
                 scale_optional: bool = False) -> Iterator[tuple[str, Optional[int], V]]:
    """The SCALE:VALUE items of a comma-separated option (with `scale_optional`, a bare VALUE too,
    whose scale is None), one (item, scale, value) at a time, so the caller checks each before the
    next is parsed. `form` names the expected items in the error, e.g. "SCALE:STEPS pairs". A scale
    given twice (or two bare values) is refused."""
    seen: dict[Optional[int], str] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        scale_text, _, value_text = item.rpartition(":")
        try:
            parsed = _number(value, value_text)
            if not scale_text and not scale_optional:
                raise ValueError(item)
            scale = _number(int, scale_text) if scale_text else None
        except ValueError:
            raise UserError(f"{option} takes {form} separated by commas (got {item!r})") from None
        if scale in seen:
            which = f"scale {scale}" if scale is not None else "a value for every scale"
            raise UserError(f"{option} gives {which} twice ({seen[scale]!r} and {item!r}); give it once")
        seen[scale] = item
        yield item, scale, parsed


def _number(kind: Callable[[str], V], text: str) -> V:
    """int or float of `text`, refusing the underscores Python allows ("0_5" is not 5 to a user)."""
    if "_" in text:
        raise ValueError(text)
    return kind(text)


def explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given on the command line (not left at its default)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name != "DEFAULT"


# --------------------------------------------------------------------------- engines


ENGINE_HELP = ("auto, torch, onnx, onnx-fp16, trt or aoti. auto: on a GPU a valid TensorRT engine, else a valid "
               "AOTInductor package (scans, evaluate and bench build one on first use), else torch (fp16); a DDIM "
               "fuse runs as one CUDA graph; on a CPU a valid fp32 ONNX export, else torch.")


def engine_config(engine: str = "auto", device: str = "auto", precision: str = "auto",
                  cuda_graph: Optional[bool] = None, compile: bool = False, threads: int = 0,
                  export_dir: Optional[Path] = None, long_job: bool = False):
    """`long_job`: a scan, an evaluation or a benchmark, worth compiling the denoiser for on first use."""
    from tfsdeploy.config import EngineConfig

    return EngineConfig(engine=engine, device=device, precision=precision, cuda_graph=cuda_graph, compile=compile,
                        threads=threads, export_dir=str(export_dir) if export_dir else None, build_missing=long_job)


# --------------------------------------------------------------------------- output


def notice(text: str) -> None:
    typer.echo(text, err=True)


def verbose_log(verbose: bool) -> Callable[[str], None]:
    return notice if verbose else (lambda s: None)


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool, unit: str = ""):
    """A rich progress bar; yields the callback (done, total) the library reports progress to."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), disable=not enabled, transient=True) as prog:
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)
