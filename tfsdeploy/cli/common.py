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

from tfsdeploy.config import BACKPROJECT_MAX, MAX_ROTATION_DEG, MAX_SHIFT_LIMIT_MM, MAX_SHIFT_MM
from tfsdeploy.errors import UserError

V = TypeVar("V", int, float)


class OneLineErrors(typer.core.TyperGroup):
    """The command group, with option parsing errors (a missing argument, `--steps abc`, an unknown
    option) printed as one `error:` line and exit code 2, like every other error a user can cause."""

    def main(self, args=None, *rest, standalone_mode: bool = True, **kwargs):
        args = spread_values(sys.argv[1:] if args is None else list(args))
        return self._main(args, *rest, standalone_mode=standalone_mode, **kwargs)

    def _main(self, *args, standalone_mode: bool = True, **kwargs):
        _digits_only(self)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as e:  # the command-line parser's own exception types (vendored or not)
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help is already shown
                sys.exit(0)
            if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
                if type(e).__name__ == "Abort":  # the parser's name for an interrupt or an end of input
                    cause = e.__cause__ or e.__context__
                    if cause is None or isinstance(cause, KeyboardInterrupt):
                        typer.echo("error: interrupted", err=True)
                        sys.exit(130)
                    typer.echo(f"error: {' '.join(f'aborted ({type(cause).__name__}: {cause})'.split())}", err=True)
                    sys.exit(2)
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


# Options that take several values after one flag, as BIDS Apps spell them (`--participant-label 01 02`).
MULTI_VALUE_OPTIONS = ("--participant-label", "--session-label")


def spread_values(argv: list[str]) -> list[str]:
    """`--participant-label 01 02` -> `--participant-label 01 --participant-label 02`: every word after a
    MULTI_VALUE_OPTIONS flag, up to the next option, is one more value of it (argparse's nargs="+")."""
    out: list[str] = []
    current = None
    for i, word in enumerate(argv):
        if word == "--":
            return out + argv[i:]
        if word.startswith("-") and len(word) > 1:
            current = word if word in MULTI_VALUE_OPTIONS else None
        elif current is not None and out[-1] != current:
            out.append(current)
        out.append(word)
    return out


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


# --------------------------------------------------------------------------- fusing options
# The model and sampling options of `fuse`, defined once: every command that fuses scans takes them.

SCALE_OPTION = typer.Option(4, help="Super-resolution factor: 2, 4 or 8.")
MODEL_OPTION = typer.Option(None, "--model", "-m", help="Checkpoint, run folder or bundle "
                            "(default: the packaged model, or $TFSDEPLOY_MODEL).")
SAMPLER_OPTION = typer.Option("ddim", help="ddim (deterministic) or ddpm (the paper's ancestral sampler).")
STEPS_OPTION = typer.Option(0, min=0, help="Denoiser calls; 0 = for DDIM the bundle's recommendation (see "
                            "MODEL_CARD.md for the packaged model) or 10, for DDPM all T.")
BACKPROJECT_OPTION = typer.Option(None, min=0, max=BACKPROJECT_MAX,
                                  help="Sharpen the upsampled inputs by back-projection of this "
                                  "strength before the model sees them (0 = plain bicubic; "
                                  "default: the bundle's recommendation for the scale). It assumes "
                                  "the inputs were shrunk bicubically; noisy inputs lose by it.")
ENSEMBLE_OPTION = typer.Option(False, "--ensemble", help="Average the fused images of the inputs' 8 flips and "
                               "quarter turns: 8 network calls per step instead of 1 (cheap on a GPU, slow on "
                               "a CPU); see MODEL_CARD.md for what it gains.")
SPACING_OPTION = typer.Option("linear", help="Step spacing: linear, quadratic or trailing.")
SEED_OPTION = typer.Option(0, min=0, max=2**63 - 1,
                           help="Noise seed; the same seed gives the same image (every slice of a scan "
                           "uses it).")
SIZE_OPTION = typer.Option(0, min=0, help="Output side in pixels (0 = the model's training size).")
ENGINE_OPTION = typer.Option("auto", help=ENGINE_HELP)
DEVICE_OPTION = typer.Option("auto", help="auto (CUDA when present), cpu or cuda.")
PRECISION_OPTION = typer.Option("auto", help="torch engine: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")
CUDA_GRAPH_OPTION = typer.Option(None, "--cuda-graph/--no-cuda-graph",
                                 help="Replay denoiser calls from CUDA graphs (default: on for torch "
                                 "on CUDA, off for TensorRT).")
COMPILE_OPTION = typer.Option(False, "--compile", help="torch engine: torch.compile the model first (tens of "
                              "seconds once per process; worth it for long scans on a GPU).")
BATCH_SIZE_OPTION = typer.Option(0, min=0, max=4096,
                                 help="Scans: slices per batch (0 = on a CPU the fastest measured on the scan's "
                                 "first slices, on a GPU as many as half its free memory holds).")
EXPORT_DIR_OPTION = typer.Option(None, help="Where exported engines live (default: beside the model).")
THREADS_OPTION = typer.Option(0, min=0, max=1024, help="CPU threads for torch and ONNX Runtime (0 = default).")
GRID_OPTION = typer.Option("t1", help="Volumes: whose grid the others are resampled onto (trilinear, through "
                           "their affines) and the output lies on: t1, t2 or func.")
REGISTER_OPTION = typer.Option(False, "--register", help="Volumes: rigidly register the other two volumes first "
                               "(6 DOF, mutual information; needs pip install 'tfsdeploy\\[scans]'). Each is fitted "
                               "to the T1; the same inputs give the same transforms on every run.")
MAX_ROTATION_OPTION = typer.Option(None, metavar="DEG", help="With --register: refuse a fit that "
                                   f"turns by more (default {MAX_ROTATION_DEG:g}; at most 180).")
MAX_SHIFT_OPTION = typer.Option(None, metavar="MM", help="With --register: refuse a fit that shifts "
                                f"the brain's centre by more (default {MAX_SHIFT_MM:g}; at most "
                                f"{MAX_SHIFT_LIMIT_MM:g}).")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress")
VERBOSE_OPTION = typer.Option(False, "--verbose", "-v", help="Say why `auto` skipped an engine.")


def register_bounds(max_rotation: Optional[float], max_shift: Optional[float], register: bool):
    """The registration's config with the bounds given (None: the defaults); refused without --register."""
    given = [(o, v) for o, v in (("--max-rotation", max_rotation), ("--max-shift", max_shift)) if v is not None]
    if not given:
        return True
    if not register:
        raise UserError(f"{given[0][0]} bounds the fit of --register; add --register")
    for option, value, top in (("--max-rotation", max_rotation, 180.0),
                               ("--max-shift", max_shift, MAX_SHIFT_LIMIT_MM)):
        if value is not None and not 0 < value <= top:
            raise UserError(f"{option} must be above 0 and at most {top:g}, got {value:g}")
    from tfsdeploy.volumes import RegisterConfig

    return RegisterConfig(max_rotation_deg=MAX_ROTATION_DEG if max_rotation is None else max_rotation,
                          max_shift_mm=MAX_SHIFT_MM if max_shift is None else max_shift)


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
