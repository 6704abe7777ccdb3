"""The `tfsdeploy` command line. Thin on purpose: it parses options into configs and calls the library."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core

from tfsdeploy.config import COMBOS, DEFAULT_DATA_SOURCES
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import check_folder_target

class OneLineErrors(typer.core.TyperGroup):
    """The command group, with option parsing errors (a missing argument, `--steps abc`, an unknown
    option) printed as one `error:` line and exit code 2, like every other error a user can cause."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
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


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, compile and run TFS-Diff: tri-modal medical image fusion with super-resolution.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect datasets.")
app.add_typer(data_app, name="data")

ALLOCATOR_FAILURES = ("out of memory", "can't allocate memory", "cannot allocate memory", "alloc_cpu")


def user_errors(fn):
    """Turn every error a user can cause into one line on stderr and a non-zero exit: bad input
    (UserError), an interrupt, running out of memory (CPU or GPU allocator), and the file system
    refusing a read or a write (full disk, no permission)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail(OUT_OF_MEMORY)
        except RuntimeError as e:  # torch.OutOfMemoryError, and the CPU allocator's RuntimeError
            if not any(m in str(e).lower() for m in ALLOCATOR_FAILURES):
                raise
            _fail(OUT_OF_MEMORY)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}")

    return wrapper


OUT_OF_MEMORY = "out of memory; try a smaller --size or --batch-size"


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code) from None


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise UserError(f"{what} takes numbers separated by commas (got {text!r})") from None


def _parse_scales(text: Optional[str]) -> Optional[tuple[int, ...]]:
    return None if text is None else _parse_ints(text, "--scales")


# --------------------------------------------------------------------------- data


@data_app.command("build")
@user_errors
def data_build(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset folder (default: the user cache)."),
    size: int = typer.Option(256, min=32, max=4096, help="Side of the high-resolution images."),
    combos: str = typer.Option(",".join(COMBOS), help="Tri-modal combinations, comma separated."),
    sources: str = typer.Option(",".join(DEFAULT_DATA_SOURCES), help="Where slices come from, comma separated: spm (the registered "
                                "SPM templates), synth (patient-like slices synthesised from the SPM label and "
                                "tissue maps: skull, texture, noise, bias field, lesions)."),
    seed: int = typer.Option(0, min=0, max=2**31 - 1, help="Seed of the synthetic slices."),
    force: bool = typer.Option(False, help="Rebuild even if the dataset exists."),
) -> None:
    """Write the training dataset into ROOT/{train,val,test}/{t1,t2,func,gt}: registered tri-modal slices
    cut from the installed SPM templates and synthesised from its label maps."""
    _long_running()
    from rich.progress import Progress

    from tfsdeploy.data import build_dataset, default_data_dir

    out = out or default_data_dir()
    if size % 8:
        raise UserError(f"--size must be a multiple of 8, got {size}")
    wanted = [c for c in combos.split(",") if c]
    if not any(c.strip() for c in wanted):
        raise UserError("--combos: give at least one combination")
    with Progress(transient=True) as prog:
        task = prog.add_task("making slices", total=None)
        summary = build_dataset(out, size=size, combos=wanted, sources=sources.split(","), seed=seed, force=force,
                                progress=lambda d, t: prog.update(task, completed=d, total=t))
    counts = summary["counts"]
    typer.echo(f"dataset: {out}")
    typer.echo(f"  {summary['size']}x{summary['size']}, combinations: {', '.join(summary['combos'])}")
    for split in ("train", "val", "test"):
        typer.echo(f"  {split:5s}: {counts.get(split, 0):4d} triplets")
        for name, info in summary["sources"].items():
            zs = info["slices"][split]
            typer.echo(f"         {name:5s} {info['count'][split]:4d} from {len(zs)} axial slices (z in {_ranges(zs)})")
    typer.echo(f"  ground truth: {summary['ground_truth']}")


def _ranges(zs: list[int]) -> str:
    parts, start = [], None
    for i, z in enumerate(zs):
        if start is None:
            start = z
        if i + 1 == len(zs) or zs[i + 1] != z + 1:
            parts.append(f"{start}-{z}" if z != start else f"{z}")
            start = None
    return ", ".join(parts)


# --------------------------------------------------------------------------- train


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/small"), "--out", "-o", help="Run folder; an existing run is resumed."),
    preset: str = typer.Option("small", help="Model preset: paper, small or tiny."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (default: the built SPM dataset, built if missing)."),
    steps: Optional[int] = typer.Option(None, min=1, max=10**9, help="Total optimisation steps."),
    batch_size: Optional[int] = typer.Option(None, min=1, max=4096, help="Batch size per process."),
    lr: Optional[float] = typer.Option(None, max=1.0, help="Adam learning rate."),
    crop: Optional[int] = typer.Option(None, min=0, max=4096, help="Random crop side (0 = whole image)."),
    scales: Optional[str] = typer.Option(None, help="Scales to train, e.g. 2,4,8."),
    prediction: Optional[str] = typer.Option(None, help="Network output: eps (paper), x0 or v."),
    target: Optional[str] = typer.Option(None, help="Diffused image: fused (paper) or residual over the baseline."),
    residual_scale: Optional[float] = typer.Option(None, max=1000.0,
                                                   help="Multiply the residual by this before diffusion."),
    objective: Optional[str] = typer.Option(None, help="diffusion, or regression (the same network trained "
                                            "deterministically: an upper bound, not a diffusion model)."),
    scale_balance: Optional[bool] = typer.Option(None, "--scale-balance/--no-scale-balance",
                                                 help="Weight the loss per scale by 1 / baseline MSE."),
    tmfa: Optional[str] = typer.Option(None, help="TMFA placement: paper, all (authors' code) or none (ablation)."),
    psf_mse: Optional[float] = typer.Option(None, max=1000.0, help="PSF loss weight of MSE on x0_hat (lambda1)."),
    psf_ssim: Optional[float] = typer.Option(None, max=1000.0,
                                             help="PSF loss weight of 1-SSIM on x0_hat (lambda2); 0 and "
                                             "--psf-mse 0 train without PSF."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay."),
    timesteps: Optional[int] = typer.Option(None, min=2, max=100_000, help="Length T of the noise schedule."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Augment the training split."),
    seed: Optional[int] = typer.Option(None, min=0, max=2**63 - 1, help="Seed for batches, noise and dropout."),
    val_every: Optional[int] = typer.Option(None, min=0, help="Validate every N steps (0 = never)."),
    ckpt_every: Optional[int] = typer.Option(None, min=1, help="Checkpoint every N steps."),
    log_every: Optional[int] = typer.Option(None, min=1, help="Log every N steps."),
    threads: Optional[int] = typer.Option(None, min=0, max=1024, help="CPU threads for torch (0 = default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    init: Optional[Path] = typer.Option(None, help="Fine-tune: start a new run from this checkpoint, run folder or "
                                        "bundle (`default` = the packaged model; a bundle's member for --scales), "
                                        "with its model and parameterisation."),
    time_limit: Optional[float] = typer.Option(None, max=10**7, help="Stop cleanly after this many minutes; the same "
                                               "command resumes."),
) -> None:
    """Train (or resume) a TFS-Diff model. Run under `torchrun --nproc_per_node N` for DDP."""
    _long_running()
    from tfsdeploy.config import model_preset
    from tfsdeploy.data import ensure_dataset
    from training.train import has_checkpoint, init_checkpoint, resolve_configs, started_from
    from training.train import train as run_training

    check_folder_target(out)
    model = model_preset(preset)
    overrides = {
        "model": {"tmfa": tmfa},
        "schedule": {"num_steps": timesteps},
        "diffusion": {"prediction": prediction, "target": target, "residual_scale": residual_scale,
                      "objective": objective},
        "data": {"root": str(data) if data else None, "scales": _parse_scales(scales), "crop": crop,
                 "augment": augment},
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "psf_mse": psf_mse, "psf_ssim": psf_ssim,
                  "ema_decay": ema_decay, "seed": seed, "val_every": val_every, "ckpt_every": ckpt_every,
                  "log_every": log_every, "threads": threads,
                  "scale_balance": scale_balance},
    }
    init_from = init_checkpoint(init, _parse_scales(scales)) if init is not None else None
    if init_from is not None and has_checkpoint(out):
        if not started_from(out, init_from):
            raise UserError(f"{out} already holds a run that did not start from {init}; --init starts a new "
                            f"one (use a new --out)")
        init_from = None  # the same command again: resume the fine-tune
    configs = resolve_configs(out, model, overrides, init=init_from)
    if (has_checkpoint(out) or init_from) and model != configs.model and _explicit(ctx, "preset"):
        where = out if has_checkpoint(out) else f"--init {init}"
        raise UserError(f"{where} holds a different model than preset {preset!r}; drop --preset "
                        f"(or use a new --out for a new run)")
    root = ensure_dataset(configs.data.root, log=typer.echo)
    if time_limit is not None and not time_limit > 0:
        raise UserError(f"--time-limit must be a positive number of minutes, got {time_limit}")
    run_training(out, configs, data_root=root, show_progress=progress, log=typer.echo, init_from=init_from,
                 time_limit_s=None if time_limit is None else time_limit * 60)


def _explicit(ctx: typer.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src.name != "DEFAULT"


# --------------------------------------------------------------------------- fuse


ENGINE_HELP = ("auto, torch, onnx, onnx-fp16, trt or aoti. auto: on a GPU a valid TensorRT engine, else a valid "
               "AOTInductor package (scans, evaluate and bench build one on first use), else torch (fp16); a DDIM "
               "fuse runs as one CUDA graph; on a CPU a valid fp32 ONNX export, else torch.")


def _engine_config(engine: str = "auto", device: str = "auto", precision: str = "auto",
                   cuda_graph: Optional[bool] = None, compile: bool = False, threads: int = 0,
                   export_dir: Optional[Path] = None, long_job: bool = False):
    """`long_job`: a scan, an evaluation or a benchmark, worth compiling the denoiser for on first use."""
    from tfsdeploy.config import EngineConfig

    return EngineConfig(engine=engine, device=device, precision=precision, cuda_graph=cuda_graph, compile=compile,
                        threads=threads, export_dir=str(export_dir) if export_dir else None, build_missing=long_job)


def _notice(text: str) -> None:
    typer.echo(text, err=True)


@app.command()
@user_errors
def fuse(
    t1: Path = typer.Argument(..., help="MR-T1: an image (PNG, JPEG or TIFF; 8 or 16 bit), a NIfTI volume "
                              "(.nii, .nii.gz), a DICOM series (its folder) or a folder of slices."),
    t2: Path = typer.Argument(..., help="MR-T2 (or PD / Gad / CT), of the same kind (volumes: NIfTI and DICOM mix)."),
    func: Path = typer.Argument(..., help="SPECT or PET, of the same kind; grey images get the built-in colour map."),
    scale: int = typer.Option(4, help="Super-resolution factor: 2, 4 or 8."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint, run folder or bundle "
                                         "(default: the packaged model, or $TFSDEPLOY_MODEL)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output: a PNG for images (default fused.png), "
                                       "a .nii/.nii.gz for volumes (default fused.nii.gz), a folder for folders "
                                       "(default fused/); scans also get OUT_montage.png."),
    sampler: str = typer.Option("ddim", help="ddim (deterministic) or ddpm (the paper's ancestral sampler)."),
    steps: int = typer.Option(0, min=0, help="Denoiser calls; 0 = for DDIM the bundle's recommendation (2 for the "
                              "packaged model) or 10, for DDPM all T."),
    spacing: str = typer.Option("linear", help="Step spacing: linear, quadratic or trailing."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1,
                             help="Noise seed; the same seed gives the same image (every slice of a scan "
                             "uses it)."),
    size: int = typer.Option(0, min=0, help="Output side in pixels (0 = the model's training size)."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    precision: str = typer.Option("auto", help="torch engine: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph",
                                              help="Replay denoiser calls from CUDA graphs (default: on for torch "
                                              "on CUDA, off for TensorRT)."),
    compile: bool = typer.Option(False, "--compile", help="torch engine: torch.compile the model first (tens of "
                                 "seconds once per process; worth it for long scans on a GPU)."),
    batch_size: int = typer.Option(0, min=0, max=4096,
                                   help="Scans: slices per batch (0 = as many as half the free memory holds)."),
    export_dir: Optional[Path] = typer.Option(None, help="Where exported engines live (default: beside the model)."),
    method: str = typer.Option("diffusion", help="diffusion (the model), or an upsample-then-fuse baseline: "
                               "classical, laplacian, guided."),
    threads: int = typer.Option(0, min=0, max=1024, help="CPU threads for torch and ONNX Runtime (0 = default)."),
    adapt: int = typer.Option(0, min=0, max=10_000, help="Test-time adaptation: first fine-tune a copy of the model "
                              "for N steps on pairs made from the input itself (degraded once more by x2), then "
                              "fuse with it; torch engine; 0 = off. 10 helps at x4 on scans unlike the templates "
                              "(about +0.3 dB); more steps, or x8, can cost quality."),
    grid: str = typer.Option("t1", help="Volumes: whose grid the others are resampled onto (trilinear, through "
                             "their affines) and the output lies on: t1, t2 or func."),
    series: list[str] = typer.Option([], "--series", metavar="UID",
                                     help="Volumes: the SeriesInstanceUID to read from a DICOM folder holding "
                                     "several series (repeat it for several folders)."),
    register: bool = typer.Option(False, "--register", help="Volumes: rigidly register the other two volumes to "
                                  "the --grid one first (6 DOF, mutual information; needs tfsdeploy[scans])."),
    save_transforms: Optional[Path] = typer.Option(None, help="With --register: write the transforms into this "
                                                   "folder as ITK .tfm files (T2_to_T1.tfm ...), once the fuse "
                                                   "succeeds."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say why `auto` skipped an engine."),
) -> None:
    """Fuse three registered low-resolution images (or volumes, or folders of slices) into one
    high-resolution colour image (or volume, or folder). Volumes may be NIfTI files or DICOM series
    folders on different grids; they are resampled onto one grid (and with --register registered)."""
    from tfsdeploy.config import SampleConfig, artifact_engine
    from tfsdeploy.fileio import check_outputs_spare_inputs
    from tfsdeploy.imaging import check_writable, write_png
    from tfsdeploy.inputs import check_scale, fuse_baseline, read_triplet
    from tfsdeploy.pipeline import FusionPipeline
    from tfsdeploy.scans import MODALITIES, refuse_volume_options, scan_kind

    check_scale(scale)
    if grid not in MODALITIES:
        raise UserError(f"--grid must be one of {', '.join(MODALITIES)}, got {grid!r}")
    if save_transforms is not None and not register:
        raise UserError("--save-transforms writes the transforms of --register; add --register")
    for given in (t1, t2, func):  # the inputs first: a missing one is not an output problem
        if not given.exists():
            raise UserError(f"{given}: no such file or folder")
    kind = next((k for k in map(scan_kind, (t1, t2, func)) if k), None)  # a mix is refused by open_scan
    if kind is None:
        refuse_volume_options(grid, series, register, "images")
    sample = SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed)
    if adapt and model is not None and artifact_engine(model) is not None:
        raise UserError(f"--adapt fine-tunes the model's weights, and {model} is an exported artifact; give the "
                        f"checkpoint or bundle it was exported from")
    if adapt and engine == "auto":
        engine = "torch"  # adaptation fine-tunes the network: only the torch engine has gradients
    engine_cfg = _engine_config(engine, device, precision, cuda_graph, compile, threads, export_dir)
    if kind is not None:
        volume_opts = dict(grid=grid, series=tuple(series), register=register, transforms=save_transforms)
        _fuse_scan(kind, t1, t2, func, scale, model, out, sample, size, engine_cfg, batch_size, method, adapt,
                   progress, verbose, **volume_opts)
        return
    out = out or Path("fused.png")
    check_writable(out)
    check_outputs_spare_inputs([out], [t1, t2, func])
    if method != "diffusion":
        if adapt:
            raise UserError("--adapt adapts the model; the upsample-then-fuse baselines have none")
        trip = read_triplet(t1, t2, func)
        write_png(out, fuse_baseline(trip, scale, size or 256, method))
        typer.echo(f"wrote {out} (bicubic + {method} fusion, x{scale})")
        return
    pipe = FusionPipeline.load(model, scale, sample, engine_cfg, log=_verbose_log(verbose), notice=_notice)
    if adapt:
        pipe = _adapted(pipe, [read_triplet(t1, t2, func)], size, adapt, seed, progress)
    with _progress_bar(sample.sampler, progress) as bar:
        img = pipe.fuse_files(t1, t2, func, out, size, progress=bar)
    typer.echo(f"wrote {out} ({img.shape[-1]}x{img.shape[-2]}, {pipe.describe()})")


def _adapted(pipe, trips: list, size: int, steps: int, seed: int, progress: bool):
    """A pipeline whose model copy was fine-tuned on `trips` for `steps` steps (--adapt)."""
    from tfsdeploy.tools.adapt import AdaptConfig, adapt

    with _progress_bar("adapt", progress, "steps") as bar:
        res = adapt(pipe, trips, size, AdaptConfig(steps=steps, seed=seed), progress=bar)
    typer.echo(f"adapted to the input in {res.seconds:.1f} s ({steps} steps on {res.pairs} internal pairs of "
               f"{res.lr_side} px, {res.seconds_per_step:.2f} s a step)", err=True)
    return res.pipeline


ADAPT_SLICES = 16


def _verbose_log(verbose: bool):
    return (lambda s: typer.echo(s, err=True)) if verbose else (lambda s: None)


@contextlib.contextmanager
def _progress_bar(label: str, enabled: bool, unit: str = ""):
    """A rich progress bar; yields the callback (done, total) the library reports progress to."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), disable=not enabled, transient=True) as prog:
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def _fuse_scan(kind: str, t1: Path, t2: Path, func: Path, scale: int, model: Optional[Path], out: Optional[Path],
               sample, size: int, engine_cfg, batch_size: int, method: str, adapt: int, progress: bool,
               verbose: bool, grid: str = "t1", series: tuple[str, ...] = (), register: bool = False,
               transforms: Optional[Path] = None) -> None:
    """`fuse` on three volumes (NIfTI or DICOM) or three folders of slices: every axial slice, in batches."""
    _long_running()
    from tfsdeploy.inputs import output_box
    from tfsdeploy.pipeline import FusionPipeline
    from tfsdeploy.scans import ScanOutput, check_transform_folder, open_scan

    if method != "diffusion":
        raise UserError("--method applies to single images; scans are fused with the model")
    if batch_size < 0:
        raise UserError(f"--batch-size must be >= 0, got {batch_size}")
    if transforms is not None:  # before registering: the output's own checks follow once the scan is read
        check_transform_folder(transforms, [], [t1, t2, func])
    read: list[str] = []  # what was read, registered and resampled: said once every check has passed
    scan = open_scan(t1, t2, func, grid=grid, series=series, register=register, log=read.append)
    output = ScanOutput(scan, out, transforms=transforms)
    output.check()
    out, montage = output.path, output.montage
    engine_cfg = dataclasses.replace(engine_cfg, build_missing=not adapt)  # a scan is a long job
    pipe = FusionPipeline.load(model, scale, sample, engine_cfg, log=_verbose_log(verbose), notice=_notice)
    output_box(*scan.shape, pipe.check_size(size))
    batch = batch_size or pipe.max_batch(pipe.check_size(size))
    for line in read:
        _notice(line)
    if adapt:  # one adapted model for the whole scan, from up to ADAPT_SLICES slices spread over it
        from tfsdeploy.inputs import as_triplet

        k = min(len(scan), ADAPT_SLICES)
        picks = sorted({round(i * (len(scan) - 1) / max(k - 1, 1)) for i in range(k)})
        trips = [as_triplet(s.t1, s.t2, s.func) for s in map(scan.slice, picks)]
        pipe = _adapted(pipe, trips, size, adapt, sample.seed, progress)
    typer.echo(f"fusing {len(scan)} slices of {scan.shape[1]}x{scan.shape[0]} in batches of {batch} "
               f"({pipe.describe()})", err=True)
    with _progress_bar("fuse", progress, "slices") as bar:
        fused = pipe.fuse_scan(scan, size, batch, progress=bar)
    written = output.publish(fused)
    where = out if scan.output_kind == "nifti" else f"{out}/ ({len(written)} PNGs)"
    typer.echo(f"wrote {where} and {montage} ({len(scan)} slices, {fused.shape[-1]}x{fused.shape[-2]}, "
               f"{pipe.describe()})")
    if output.transform_files:
        typer.echo(f"wrote {transforms}/ ({', '.join(p.name for p in output.transform_files)})")


# --------------------------------------------------------------------------- bundle


@app.command()
@user_errors
def bundle(
    out: Path = typer.Argument(..., help="Bundle folder to write."),
    x2: Optional[Path] = typer.Option(None, help="Checkpoint for x2."),
    x4: Optional[Path] = typer.Option(None, help="Checkpoint for x4."),
    x8: Optional[Path] = typer.Option(None, help="Checkpoint for x8."),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="Store the weights in half precision."),
    notes: str = typer.Option("", help="Free text stored in bundle.json."),
    ddim_steps: str = typer.Option("", help="Recommended DDIM steps per scale, e.g. 2:2,4:2,8:2 (from a "
                                   "sampler study); used when fuse runs DDIM without --steps."),
    blend: str = typer.Option("", help="Store fine-tuned members (train --init) as a blend with the model each "
                              "started from: (1 - A) * start + A * fine-tuned, 0 < A < 1. One A for every "
                              "fine-tuned member, or per scale, e.g. 4:0.3,8:0.5. Keeps more of the start model's behaviour on data "
                              "neither was tuned for."),
) -> None:
    """Pack one checkpoint per scale into a bundle that fuse, demo, export, evaluate and bench take."""
    _long_running()
    from tfsdeploy.bundle import make_bundle

    check_folder_target(out)
    members = {s: p for s, p in ((2, x2), (4, x4), (8, x8)) if p is not None}
    if not members:
        raise UserError("give at least one of --x2, --x4, --x8")
    steps = {}
    for item in (x for x in ddim_steps.split(",") if x.strip()):
        try:
            k, v = (int(t) for t in item.split(":"))
        except ValueError:
            raise UserError(f"--ddim-steps takes SCALE:STEPS pairs separated by commas (got {item!r})") from None
        if k not in members or v < 1:
            raise UserError(f"--ddim-steps {item!r}: no --x{k} model given, or steps < 1")
        steps[k] = v
    path = make_bundle(members, out, fp16=fp16, notes=notes, ddim_steps=steps, blend=_blend_option(blend, members))
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    typer.echo(f"wrote {path} ({', '.join(f'x{s}' for s in sorted(members))}; {size:.1f} MB)")


def _blend_option(text: str, members: dict[int, Path]) -> dict[int, float]:
    """--blend: "A" for every fine-tuned member, or "SCALE:A,..."; each A in (0, 1)."""
    from tfsdeploy.checkpoint import read_meta

    text = text.strip()
    if not text:
        return {}
    tuned = [s for s, p in members.items() if read_meta(p)[1].get("init")]
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        scale_text, _, value = item.rpartition(":")
        try:
            alpha = float(value)
            scales = [int(scale_text)] if scale_text else tuned
        except ValueError:
            raise UserError(f"--blend takes A or SCALE:A pairs separated by commas (got {item!r})") from None
        if not 0.0 < alpha < 1.0:
            raise UserError(f"--blend {item!r}: A must lie strictly between 0 and 1")
        if not scales:
            raise UserError("--blend: none of the models given is a fine-tune (train --init)")
        for scale in scales:
            if scale not in members:
                raise UserError(f"--blend {item!r}: no --x{scale} model given")
            out[scale] = alpha
    return out


# --------------------------------------------------------------------------- demo


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Output folder."),
    scale: int = typer.Option(4, help="Super-resolution factor: 2, 4 or 8."),
    combo: str = typer.Option("t1-t2-spect", help="Which SPM templates: t1-t2-spect, t1-t2-pet, t1-pd-spect "
                              "or t1-pd-pet."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint, run folder or bundle "
                                         "(default: the packaged model)."),
    engine: str = typer.Option("auto", help="auto, torch, onnx, onnx-fp16 or trt (see fuse)."),
    steps: int = typer.Option(0, min=0, help="Denoiser calls (0 = the default sampler's)."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Cut a held-out triplet from the installed SPM templates, fuse it, and show it beside the baseline."""
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.data import reference_triplet
    from tfsdeploy.inputs import check_scale
    from tfsdeploy.pipeline import FusionPipeline
    from tfsdeploy.tools.demo import run_demo

    size = 256
    check_scale(scale)
    check_folder_target(out)
    pipe = FusionPipeline.load(model, scale, SampleConfig(steps=steps, seed=seed), _engine_config(engine))
    with _progress_bar("demo", progress):
        r = run_demo(pipe, reference_triplet(size, combo), out, size)
    for label, v in r["scores"].items():
        typer.echo(f"{label:>20}: PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f} against the HR classical fusion")
    typer.echo(f"fused in {r['seconds']:.1f} s ({pipe.describe()})")
    typer.echo(f"wrote {out}/t1.png, t2.png, func.png (inputs, {r['input_side']} px), fused.png, baseline.png, "
               f"reference.png and side_by_side.png")


# --------------------------------------------------------------------------- evaluate


@app.command()
@user_errors
def evaluate(
    model: list[Path] = typer.Option([], "--model", "-m", help="Checkpoint, run folder or exported artifact; "
                                     "repeat for several (ablations)."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (default: the built SPM dataset)."),
    split: str = typer.Option("test", help="Split to evaluate: train, val or test."),
    scales: str = typer.Option("2,4,8", help="Scales, comma separated."),
    methods: str = typer.Option("classical,laplacian,guided", help="Upsample-then-fuse baselines."),
    sampler: str = typer.Option("ddim", help="ddim or ddpm."),
    steps: int = typer.Option(0, min=0, help="Sampler steps (0 = the sampler's default, as in fuse)."),
    spacing: str = typer.Option("linear", help="Step spacing: linear, quadratic or trailing."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1),
    engine: str = typer.Option("auto", help="Engine for the models (see fuse)."),
    limit: int = typer.Option(0, min=0, help="Evaluate at most N images (0 = all)."),
    size: int = typer.Option(0, min=0, max=4096, help="Image side (0 = the first model's training size)."),
    montage_image: str = typer.Option("", help="Image name shown in the montage (default: the middle one)."),
    lpips_backbone: Optional[Path] = typer.Option(None, help="AlexNet weights file for LPIPS."),
    lpips_lin: Optional[Path] = typer.Option(None, help="LPIPS v0.1 alex linear weights file."),
    out: Path = typer.Option(Path("reports/eval"), "--out", "-o", help="Report folder."),
    threads: int = typer.Option(0, min=0, max=1024, help="CPU threads for torch (0 = default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Table-1 style metrics of each baseline and model, per scale, with a Fig-2 style montage."""
    _long_running()
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.tools.evaluate import EvalConfig
    from tfsdeploy.tools.evaluate import evaluate as run_evaluation

    check_folder_target(out)
    cfg = EvalConfig(split=split, scales=_parse_scales(scales) or (), methods=tuple(m for m in methods.split(",") if m),
                     sample=SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed), engine=engine,
                     limit=limit, size=size, montage_image=montage_image)
    if limit < 0:
        raise UserError(f"--limit must be >= 0, got {limit}")
    entries, samples = evaluation_inputs(list(model), data, cfg, _engine_config(engine, threads=threads, long_job=True),
                                         typer.echo)
    with _progress_bar("evaluate", progress) as bar:
        summary = run_evaluation(entries, samples, out, cfg, lpips_backbone, lpips_lin, progress=bar, log=typer.echo)
    for scale, tables in summary["tables"].items():
        typer.echo(f"{scale}: " + "; ".join(f"{k} {v['PSNR']:.2f} dB / {v['SSIM']:.4f}"
                                            for k, v in tables["reference"].items()))
    typer.echo(f"wrote {out}/report.md, table1_x*.md/.csv, values.json and montage.png")


def evaluation_inputs(models: list[Path], data: Optional[Path], cfg, engine_cfg, log=lambda s: None):
    """What `evaluate` is handed: one entry per model (its pipeline at every scale) and the split's
    samples, at --size or the first model's training size."""
    from tfsdeploy.bundle import named_model
    from tfsdeploy.data import ensure_dataset, open_split
    from tfsdeploy.pipeline import FusionPipeline
    from tfsdeploy.tools.evaluate import model_entry

    entries, labels, first_size = [], set(), 0
    for path in (named_model(m) for m in models):
        pipes = {s: FusionPipeline.load(path, s, cfg.sample, engine_cfg, notice=log) for s in cfg.scales}
        first_size = first_size or pipes[cfg.scales[0]].image_size
        entries.append(model_entry(path, pipes, cfg, labels))
    samples = open_split(ensure_dataset(data, log=log), cfg.split, cfg.size or first_size or 256).load()
    return entries, samples


# --------------------------------------------------------------------------- export


@app.command()
@user_errors
def export(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint, run folder or bundle (default: the packaged "
                                           "model, or $TFSDEPLOY_MODEL)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Export the fp32 ONNX."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Export the fp16 ONNX (fp32 islands and I/O)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT FP16 engine (needs TensorRT and a GPU)."),
    aoti: bool = typer.Option(False, "--aoti", help="Also build an AOTInductor package for this machine: fp16 on "
                              "a GPU, fp32 on a CPU (minutes on a CPU; `--no-onnx --no-fp16 --aoti` builds only it)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: CKPT/export)."),
    max_batch: int = typer.Option(4, min=1, max=1024, help="Largest batch the artifacts accept."),
    min_size: int = typer.Option(0, min=0, max=8192,
                                 help="Smallest image side (0 = 64, rounded to the model's multiple)."),
    max_size: int = typer.Option(0, min=0, max=8192, help="Largest image side (0 = 512)."),
    opset: int = typer.Option(18, min=18, max=30, help="ONNX opset (18 or above)."),
    parity_steps: int = typer.Option(10, min=1, max=1000, help="DDIM steps of the fused-image parity check."),
    workspace_gib: float = typer.Option(8.0, max=1024.0, help="TensorRT builder workspace."),
) -> None:
    """Export the TMFA + U-Net denoiser to ONNX (fp32, fp16), TensorRT FP16 and AOTInductor, each checked
    for parity. A bundle exports every member, each into its own folder."""
    _long_running()
    from tfsdeploy.artifacts import default_export_dir
    from tfsdeploy.bundle import bundle_members, is_bundle, named_model
    from tfsdeploy.fileio import removed_if_left_empty

    if not workspace_gib > 0:
        raise UserError(f"--workspace-gib must be positive, got {workspace_gib}")
    model = named_model(model)
    if is_bundle(model):
        if out is not None:
            raise UserError("--out is per checkpoint; a bundle's members export beside it (or to the cache for "
                            "the packaged model)")
        members = bundle_members(model)
    else:
        members = {0: model}
    for member in members.values():
        with removed_if_left_empty(out or default_export_dir(member)):  # a failed export leaves no empty folder
            _export_one(member, onnx, fp16, trt, aoti, out, max_batch, min_size, max_size, opset, parity_steps,
                        workspace_gib)


def _export_one(model: Path, onnx: bool, fp16: bool, trt: bool, aoti: bool, out: Optional[Path], max_batch: int,
                min_size: int, max_size: int, opset: int, parity_steps: int, workspace_gib: float) -> None:
    from engines.trt_engine import tensorrt_status
    from export.onnx_export import default_spec, export_onnx
    from export.trt_build import build_engine, build_plan
    from tfsdeploy.artifacts import default_export_dir
    from tfsdeploy.checkpoint import build_from_checkpoint
    from tfsdeploy.data import reference_triplet

    net, _ = build_from_checkpoint(model)
    spec = default_spec(net, max_batch=max_batch, min_size=min_size, max_size=max_size)
    out = out or default_export_dir(model)
    check_folder_target(out)
    trt_mod, trt_reason = tensorrt_status() if trt else (None, "")
    precisions = [p for p, on in (("fp32", onnx), ("fp16", fp16)) if on]
    if trt_mod is not None and build_plan(trt_mod.__version__).onnx_precision not in precisions:
        precisions.append(build_plan(trt_mod.__version__).onnx_precision)
    if not precisions and not trt and not aoti:
        raise UserError("nothing to export: pass --onnx, --fp16, --trt or --aoti")
    typer.echo(f"exporting {model} -> {out} (batch {spec.min_batch}..{spec.max_batch}, "
               f"size {spec.min_size}..{spec.max_size}, multiple of {spec.size_multiple}, opset {opset})")
    done = {}
    parity_image = reference_triplet(spec.opt_size)  # a held-out slice, for the fused-image parity check
    for p in precisions:
        path, rep = export_onnx(model, p, out, spec, opset, parity_steps, parity_image, log=typer.echo)
        done[p] = path
        typer.echo(f"  {path.name}: parity vs torch fp32: relative L2 {rep['relative_l2']:.2e} "
                   f"(limit {rep['limits']['max_relative_l2']:g}), fused PSNR {rep['fused_psnr_db']:.1f} dB "
                   f"(limit {rep['limits']['min_fused_psnr_db']:g}, DDIM-{rep['ddim_steps']}, {rep['size']}px, "
                   f"{rep['provider']})")
    if trt:
        if trt_mod is None:
            written = "; the ONNX files above were written" if done else ""
            raise UserError(f"--trt: {trt_reason}{written}")
        onnx_path = done[build_plan(trt_mod.__version__).onnx_precision]
        engine = build_engine(onnx_path, out, model, workspace_gib, parity_steps, parity_image, log=typer.echo)
        typer.echo(f"  {engine.name}: TensorRT FP16 engine")
    if aoti:
        from export.aoti_export import export_aoti

        package, rep = export_aoti(model, out, "auto", spec, parity_steps, parity_image, log=typer.echo)
        typer.echo(f"  {package.name}: AOTInductor package, parity vs torch fp32: relative L2 "
                   f"{rep['relative_l2']:.2e}, fused PSNR {rep['fused_psnr_db']:.1f} dB")


# --------------------------------------------------------------------------- bench


@app.command()
@user_errors
def bench(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint or bundle (its --scale member; "
                                         "default: random weights of --preset; speed does not depend on the "
                                         "weights, except that exported engines are found beside it)."),
    preset: str = typer.Option("small", help="Model preset when no --model is given."),
    engines: str = typer.Option("torch,torch-fast,torch-compile,onnx,onnx-fp16,trt,aoti",
                                help="Engines to measure (torch is eager fp32, torch-fast the default GPU path); "
                                "unavailable ones are skipped with the reason."),
    sizes: str = typer.Option("128,256", help="Image sides for the per-call latency."),
    batches: str = typer.Option("1,4", help="Batch sizes for the per-call latency."),
    repeats: int = typer.Option(10, min=1, max=10_000, help="Timed calls per engine and shape."),
    warmup: int = typer.Option(2, min=0, max=1000, help="Untimed calls first."),
    fuse_steps: str = typer.Option("10,25,50", help="DDIM step counts for the end-to-end fuse time."),
    ddpm_steps: int = typer.Option(50, min=1, max=100_000, help="DDPM levels actually timed, extrapolated to all T."),
    cold_runs: int = typer.Option(3, min=0, max=100,
                                  help="With --model: one-shot fuse processes timed per engine setting "
                                  "(0 = none)."),
    quality: bool = typer.Option(False, "--quality", help="Run the sampler study instead (needs a trained --model)."),
    data: Optional[Path] = typer.Option(None, help="Dataset for --quality (default: the built SPM dataset)."),
    images: int = typer.Option(4, min=1, max=10_000, help="--quality: held-out slices."),
    scale: int = typer.Option(4, help="Scale: the --quality study's, and which member of a bundle runs."),
    size: int = typer.Option(256, min=32, max=4096, help="--quality: image side."),
    ddim_steps: str = typer.Option("10,25,50,100,250", help="--quality: DDIM step counts."),
    ddpm_full: int = typer.Option(0, min=0, max=100_000,
                                  help="--quality: DDPM levels (0 = all T, the paper's sampler)."),
    engine: str = typer.Option("auto", help="--quality: engine (see fuse)."),
    threads: int = typer.Option(0, min=0, max=1024, help="CPU threads (0 = default)."),
    out: Path = typer.Option(Path("benchmarks/reports/latest"), "--out", "-o", help="Report folder."),
) -> None:
    """Measure engines side by side (Markdown, JSON and a PNG plot), or with --quality the sampler study."""
    _long_running()
    from tfsdeploy.bundle import model_for_scale
    from tfsdeploy.data import reference_triplet
    from tfsdeploy.inputs import check_scale

    check_scale(scale)
    check_folder_target(out)
    engine_cfg = _engine_config(engine, threads=threads, long_job=True)
    study_steps = _parse_ints(ddim_steps, "--ddim-steps")
    if quality and (not study_steps or min(study_steps) < 1):
        raise UserError(f"--ddim-steps takes positive step counts, got {ddim_steps!r}")
    ignored = [n for n in ("data", "images", "size", "ddim_steps", "ddpm_full", "engine") if _explicit(ctx, n)]
    if ignored and not quality:
        raise UserError(f"--{ignored[0].replace('_', '-')} applies to --quality only")
    if quality:
        from tfsdeploy.data import ensure_dataset, open_split
        from tfsdeploy.pipeline import FusionPipeline
        from tfsdeploy.tools.study import StudyConfig, sampler_study

        pipe = FusionPipeline.load(model, scale, engine=engine_cfg, notice=_notice)
        samples = open_split(ensure_dataset(data, log=typer.echo), "test", size).load()
        r = sampler_study(pipe, samples, StudyConfig(images=images, size=size, ddim_steps=study_steps,
                                                     ddpm_steps=ddpm_full), out, log=typer.echo)
        met = r["meets_target"]
        typer.echo(f"target ({r['target']}): " + (f"met by {met['sampler']}-{met['steps']}" if met else "not met"))
        typer.echo(f"wrote {out}/study.md, study.json and study.png")
        return
    from tfsdeploy.tools.bench import BenchConfig, run_bench

    names = tuple(e for e in engines.split(",") if e)
    if not any(e.strip() for e in names):
        raise UserError("--engines: name at least one engine")
    cfg = BenchConfig(preset=preset, sizes=_parse_ints(sizes, "--sizes"), batches=_parse_ints(batches, "--batches"),
                      engines=names, repeats=repeats, warmup=warmup,
                      fuse_steps=_parse_ints(fuse_steps, "--fuse-steps"), ddpm_measured_steps=ddpm_steps,
                      threads=threads, cli_repeats=cold_runs)
    ckpt = model_for_scale(model, scale) if model is not None else None  # a bundle's member for --scale
    r = run_bench(ckpt, cfg, out, reference_triplet(cfg.fuse_size), log=typer.echo, cli_model=model)
    fastest = min((x for x in r["latency"] if x["size"] == max(cfg.sizes) and x["batch"] == min(cfg.batches)),
                  key=lambda x: x["median_ms"])
    typer.echo(f"fastest at {fastest['size']}px batch {fastest['batch']}: {fastest['engine']} "
               f"({fastest['median_ms']:.1f} ms, {_speedup(fastest)} torch eager)")
    typer.echo(f"wrote {out}/bench.md, bench.json" + (f" and {r['plot']}" if r.get("plot") else ""))


def _speedup(row: dict) -> str:
    s = row.get("speedup_vs_torch")
    return f"{s:.2f}x" if s else "n/a vs"


# --------------------------------------------------------------------------- info


@app.command()
@user_errors
def info() -> None:
    """Engines, providers, GPUs, versions and threads."""
    import platform

    import torch

    from engines.trt_engine import tensorrt_status
    from tfsdeploy import __version__
    from tfsdeploy.data import default_data_dir

    typer.echo(f"tfsdeploy {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    typer.echo(f"cpu threads (torch): {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            typer.echo(f"gpu {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        typer.echo("gpu: none (torch.cuda.is_available() is False)")
    typer.echo("engines:")
    typer.echo(f"  torch: yes ({'cuda' if torch.cuda.is_available() else 'cpu'})")
    try:
        import onnxruntime as ort

        typer.echo(f"  onnx: onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}")
    except ImportError:
        typer.echo("  onnx: no (pip install 'tfsdeploy[onnx]')")
    trt, reason = tensorrt_status()
    typer.echo(f"  trt: tensorrt {trt.__version__}" if trt is not None else f"  trt: no ({reason})")
    from engines.aoti_engine import device_identity, identity_text

    here = device_identity("cuda" if torch.cuda.is_available() else "cpu")
    typer.echo(f"  aoti: torch {torch.__version__}, packages built here run on {identity_text(here)}")
    d = default_data_dir()
    typer.echo(f"dataset: {d} ({'built' if (d / 'summary.json').is_file() else 'not built yet'})")
    from tfsdeploy.bundle import default_model, describe_model

    try:
        m = default_model()
    except UserError as e:
        typer.echo(f"default model: none ({e})")
    else:
        try:
            typer.echo(f"default model: {m} ({describe_model(m)})")
        except UserError as e:  # e.g. $TFSDEPLOY_MODEL names something that is not a model
            typer.echo(f"default model: {m} (NOT USABLE: {e})")


def main() -> None:
    # A one-shot command spends about a second of its life in the cyclic garbage collector: while
    # torch's thousands of modules are imported, and again at exit. Reference counting frees the
    # tensors of a fuse by itself, so the collector is off until a long-running command turns it
    # back on (`_long_running`), and what is alive at exit is frozen instead of traversed.
    gc.disable()
    try:
        app()
    finally:
        gc.freeze()


def _long_running() -> None:
    """Training, evaluation, export and benchmarks run long enough to need the cyclic collector."""
    gc.enable()


if __name__ == "__main__":
    sys.exit(main())
