"""The `tfsdeploy` command line. Thin on purpose: it parses options into configs and calls the library."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, compile and run TFS-Diff: tri-modal medical image fusion with super-resolution.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect datasets.")
app.add_typer(data_app, name="data")


def user_errors(fn):
    """Turn every error a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None
        except MemoryError:
            typer.echo("error: out of memory; try a smaller --size or --batch-size", err=True)
            raise typer.Exit(2) from None

    return wrapper


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
    size: int = typer.Option(256, help="Side of the high-resolution images."),
    combos: str = typer.Option(",".join(("t1-t2-spect", "t1-t2-pet", "t1-pd-spect", "t1-pd-pet")),
                               help="Tri-modal combinations, comma separated."),
    force: bool = typer.Option(False, help="Rebuild even if the dataset exists."),
) -> None:
    """Cut registered tri-modal slices from the installed SPM templates into ROOT/{train,val,test}/{t1,t2,func,gt}."""
    from rich.progress import Progress

    from training.data import build_spm_dataset, default_data_dir

    out = out or default_data_dir()
    if size % 8 or size < 32:
        raise UserError("--size must be a multiple of 8 and at least 32")
    with Progress(transient=True) as prog:
        task = prog.add_task("cutting slices", total=None)
        summary = build_spm_dataset(out, size=size, combos=[c for c in combos.split(",") if c], force=force,
                                    progress=lambda d, t: prog.update(task, completed=d, total=t))
    counts = summary["counts"]
    typer.echo(f"dataset: {out}")
    typer.echo(f"  {summary['size']}x{summary['size']}, combinations: {', '.join(summary['combos'])}")
    for split in ("train", "val", "test"):
        zs = summary["slices"][split]
        typer.echo(f"  {split:5s}: {counts.get(split, 0):4d} triplets from {len(zs)} axial slices "
                   f"(z in {_ranges(zs)})")
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
    out: Path = typer.Option(Path("runs/small"), "--out", "-o", help="Run folder; an existing run is resumed."),
    preset: str = typer.Option("small", help="Model preset: paper, small or tiny."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (default: the built SPM dataset, built if missing)."),
    steps: Optional[int] = typer.Option(None, help="Total optimisation steps."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
    crop: Optional[int] = typer.Option(None, help="Random crop side (0 = whole image)."),
    scales: Optional[str] = typer.Option(None, help="Scales to train, e.g. 2,4,8."),
    prediction: Optional[str] = typer.Option(None, help="Network output: eps (paper), x0 or v."),
    target: Optional[str] = typer.Option(None, help="Diffused image: fused (paper) or residual over the baseline."),
    residual_scale: Optional[float] = typer.Option(None, help="Multiply the residual by this before diffusion."),
    objective: Optional[str] = typer.Option(None, help="diffusion, or regression (the same network trained "
                                            "deterministically: an upper bound, not a diffusion model)."),
    scale_balance: Optional[bool] = typer.Option(None, "--scale-balance/--no-scale-balance",
                                                 help="Weight the loss per scale by 1 / baseline MSE."),
    tmfa: Optional[str] = typer.Option(None, help="TMFA placement: paper, all (authors' code) or none (ablation)."),
    psf_mse: Optional[float] = typer.Option(None, help="PSF loss weight of MSE on x0_hat (lambda1)."),
    psf_ssim: Optional[float] = typer.Option(None, help="PSF loss weight of 1-SSIM on x0_hat (lambda2); 0 and "
                                             "--psf-mse 0 train without PSF."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay."),
    timesteps: Optional[int] = typer.Option(None, help="Length T of the noise schedule."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Augment the training split."),
    seed: Optional[int] = typer.Option(None, help="Seed for batches, noise and dropout."),
    val_every: Optional[int] = typer.Option(None, help="Validate every N steps (0 = never)."),
    ckpt_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    log_every: Optional[int] = typer.Option(None, help="Log every N steps."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    init: Optional[Path] = typer.Option(None, help="Start a new run from this checkpoint's weights (fine-tuning)."),
    time_limit: Optional[float] = typer.Option(None, help="Stop cleanly after this many minutes; the same "
                                               "command resumes."),
) -> None:
    """Train (or resume) a TFS-Diff model. Run under `torchrun --nproc_per_node N` for DDP."""
    from tfsdeploy.config import model_preset
    from training.data import build_spm_dataset, default_data_dir
    from training.train import has_checkpoint, resolve_configs
    from training.train import train as run_training

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
    configs = resolve_configs(out, model, overrides)
    if has_checkpoint(out) and model != configs.model and _explicit("preset"):
        raise UserError(f"{out} holds a different model than preset {preset!r}; use a new --out for a new run")
    root = Path(configs.data.root) if configs.data.root else None
    if root is None:
        default = default_data_dir()
        if not (default / "summary.json").is_file() and int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"building the SPM dataset in {default} (first use)")
            build_spm_dataset(default)
        _wait_for(default / "summary.json")
        root = default
    if init is not None and has_checkpoint(out):
        raise UserError(f"{out} already holds a run; --init starts a new one (use a new --out)")
    if time_limit is not None and time_limit <= 0:
        raise UserError("--time-limit must be positive (minutes)")
    run_training(out, configs, data_root=root, show_progress=progress, log=typer.echo, init_from=init,
                 time_limit_s=None if time_limit is None else time_limit * 60)


def _explicit(name: str) -> bool:
    ctx = typer.get_current_context()
    src = ctx.get_parameter_source(name)
    return src is not None and src.name != "DEFAULT"


def _wait_for(path: Path, timeout: float = 600.0) -> None:
    """Other DDP ranks wait while rank 0 builds the dataset."""
    import time

    t0 = time.time()
    while not path.is_file():
        if time.time() - t0 > timeout:
            raise UserError(f"timed out waiting for {path}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- fuse


@app.command()
@user_errors
def fuse(
    t1: Path = typer.Argument(..., help="MR-T1 image (PNG, JPEG or TIFF; 8 or 16 bit)."),
    t2: Path = typer.Argument(..., help="MR-T2 (or PD / Gad / CT) image."),
    func: Path = typer.Argument(..., help="SPECT or PET image; a grey one gets the built-in colour map."),
    scale: int = typer.Option(4, help="Super-resolution factor: 2, 4 or 8."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint, run folder or bundle "
                                         "(default: the packaged model, or $TFSDEPLOY_MODEL)."),
    out: Path = typer.Option(Path("fused.png"), "--out", "-o", help="Output PNG."),
    sampler: str = typer.Option("ddim", help="ddim (deterministic) or ddpm (the paper's ancestral sampler)."),
    steps: int = typer.Option(0, help="Denoiser calls; 0 = for DDIM the bundle's recommendation (2 for the "
                              "packaged model) or 10, for DDPM all T."),
    spacing: str = typer.Option("linear", help="Step spacing: linear, quadratic or trailing."),
    seed: int = typer.Option(0, help="Noise seed; the same seed gives the same image."),
    size: int = typer.Option(0, help="Output side in pixels (0 = the model's training size)."),
    engine: str = typer.Option("auto", help="auto, torch, onnx, onnx-fp16 or trt. auto: TensorRT on a GPU, "
                               "else ONNX Runtime fp32, else torch, whichever is exported and valid."),
    export_dir: Optional[Path] = typer.Option(None, help="Where exported engines live (default: CKPT/export)."),
    cuda_graph: bool = typer.Option(False, help="Replay the TensorRT engine from a CUDA graph."),
    compile: bool = typer.Option(False, "--compile", help="torch engine: torch.compile the model first."),
    method: str = typer.Option("diffusion", help="diffusion (the model), or an upsample-then-fuse baseline: "
                               "classical, laplacian, guided."),
    threads: int = typer.Option(0, help="CPU threads for torch and ONNX Runtime (0 = default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say why `auto` skipped an engine."),
) -> None:
    """Fuse three registered low-resolution images into one high-resolution colour image."""
    from tfsdeploy.config import SampleConfig
    from tfsdeploy.imaging import check_writable, write_png
    from tfsdeploy.pipeline import fuse_baseline, read_triplet

    sample = SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed)
    check_writable(out)
    trip = read_triplet(t1, t2, func)
    if method != "diffusion":
        write_png(out, fuse_baseline(trip, scale, size or 256, method))
        typer.echo(f"wrote {out} (bicubic + {method} fusion, x{scale})")
        return
    img, desc = _fuse_with_model(trip, scale, model, sample, size, engine, export_dir, threads, cuda_graph, compile,
                                 progress, verbose)
    write_png(out, img)
    typer.echo(f"wrote {out} ({img.shape[-1]}x{img.shape[-2]}, {desc})")


def _fuse_with_model(trip, scale: int, model: Optional[Path], sample, size: int = 0, engine: str = "auto",
                     export_dir: Optional[Path] = None, threads: int = 0, cuda_graph: bool = False,
                     compile: bool = False, progress: bool = True, verbose: bool = False):
    """The model path of `fuse` (and `demo`): pick the checkpoint and engine, sample, crop back.
    Returns the image [3,h,w] and a one-line description of what ran."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engines.loader import select_engine
    from tfsdeploy.bundle import model_for_scale, sample_for
    from tfsdeploy.diffusion import Diffusion, NoiseSchedule
    from tfsdeploy.pipeline import check_scale_size, fuse_triplet

    sample = sample_for(model, scale, sample)
    model = model_for_scale(model, scale)
    if threads:
        torch.set_num_threads(threads)
    _check_fusable(model)
    denoiser, configs = select_engine(model, engine, export_dir, threads=threads, cuda_graph=cuda_graph,
                                      compile=compile, log=lambda s: typer.echo(s, err=True) if verbose else None)
    mc = configs.model
    size = size or mc.image_size
    check_scale_size(scale, size, mc.size_multiple)
    schedule = NoiseSchedule(configs.schedule)
    if sample.steps > schedule.num_steps:
        raise UserError(f"--steps {sample.steps} exceeds the schedule's T = {schedule.num_steps}")
    diffusion = Diffusion(schedule, configs.diffusion)
    with Progress(TextColumn(f"[bold]{sample.sampler}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=True) as prog:
        task = prog.add_task("fuse", total=None)
        img = fuse_triplet(denoiser, diffusion, trip, scale, size, mc.size_multiple, sample,
                           progress=lambda i, n: prog.update(task, completed=i, total=n))
    n = sample.steps or schedule.num_steps  # DDPM without --steps runs all T
    engine_desc = denoiser.describe() if hasattr(denoiser, "describe") else denoiser.name
    return img, f"x{scale}, {sample.sampler}-{n}, engine {engine_desc}, model {model}"


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
) -> None:
    """Pack one checkpoint per scale into a bundle that fuse, demo, export, evaluate and bench take."""
    from tfsdeploy.bundle import make_bundle

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
    path = make_bundle(members, out, fp16=fp16, notes=notes, ddim_steps=steps)
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    typer.echo(f"wrote {path} ({', '.join(f'x{s}' for s in sorted(members))}; {size:.1f} MB)")


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
    steps: int = typer.Option(0, help="Denoiser calls (0 = the default sampler's)."),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Cut a held-out triplet from the installed SPM templates, fuse it, and show it beside the baseline."""
    import time

    from tfsdeploy.config import SampleConfig
    from tfsdeploy.evaluate import write_montage
    from tfsdeploy.fusion import fuse_condition
    from tfsdeploy.imaging import check_writable, write_png
    from tfsdeploy.metrics import psnr, ssim
    from tfsdeploy.pipeline import fuse_baseline, make_condition, read_triplet, write_triplet
    from training.data import reference_triplet

    size = 256
    if scale not in (2, 4, 8):
        raise UserError(f"--scale must be 2, 4 or 8, got {scale}")
    hr = reference_triplet(size, combo)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create ({e.strerror})") from None
    check_writable(out / "fused.png")
    # The inputs a user would have: the held-out slice at 1/scale of the output size, read back
    # exactly as `fuse` reads them.
    trip = read_triplet(*write_triplet(hr, out, size // scale))
    reference = fuse_condition(hr.stacked()[None])[0]
    baseline = fuse_baseline(trip, scale, size, "classical")
    t0 = time.perf_counter()
    fused, desc = _fuse_with_model(trip, scale, model, SampleConfig(steps=steps, seed=seed), size, engine,
                                   progress=progress)
    took = time.perf_counter() - t0
    write_png(out / "reference.png", reference)
    write_png(out / "baseline.png", baseline)
    write_png(out / "fused.png", fused)
    cond01 = make_condition(trip, scale, size)[0][0]  # the bicubic-upsampled inputs the model sees
    write_montage(out / "side_by_side.png",
                  {scale: {"T1 (LR)": cond01[0:1], "T2 (LR)": cond01[1:2], "functional (LR)": cond01[2:5],
                           "bicubic+classical": baseline, "TFS-Diff": fused, "ground truth": reference}},
                  ["bicubic+classical", "TFS-Diff"])
    for label, img in (("bicubic + classical", baseline), ("TFS-Diff", fused)):
        typer.echo(f"{label:>20}: PSNR {float(psnr(img[None], reference[None])):.2f} dB, "
                   f"SSIM {float(ssim(img[None], reference[None])):.4f} against the HR classical fusion")
    typer.echo(f"fused in {took:.1f} s ({desc})")
    typer.echo(f"wrote {out}/t1.png, t2.png, func.png (inputs, {size // scale} px), fused.png, baseline.png, "
               f"reference.png and side_by_side.png")


def _check_fusable(model: Path) -> None:
    """Refuse a model that does not take 5 condition channels and give 3, before loading weights."""
    from tfsdeploy.artifacts import read_sidecar
    from tfsdeploy.checkpoint import Configs, read_meta
    from tfsdeploy.pipeline import check_fusable

    if model.suffix in (".onnx", ".plan", ".engine"):
        where, meta = model, read_sidecar(model).get("configs", {})
    else:
        where, meta = read_meta(model)
    check_fusable(Configs.from_json(meta).model, where)


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
    steps: int = typer.Option(0, help="Sampler steps (0 = the sampler's default, as in fuse)."),
    spacing: str = typer.Option("linear", help="Step spacing: linear, quadratic or trailing."),
    seed: int = typer.Option(0),
    engine: str = typer.Option("auto", help="Engine for the models (see fuse)."),
    limit: int = typer.Option(0, help="Evaluate at most N images (0 = all)."),
    size: int = typer.Option(0, help="Image side (0 = the first model's training size)."),
    montage_image: str = typer.Option("", help="Image name shown in the montage (default: the middle one)."),
    lpips_backbone: Optional[Path] = typer.Option(None, help="AlexNet weights file for LPIPS."),
    lpips_lin: Optional[Path] = typer.Option(None, help="LPIPS v0.1 alex linear weights file."),
    out: Path = typer.Option(Path("reports/eval"), "--out", "-o", help="Report folder."),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Table-1 style metrics of each baseline and model, per scale, with a Fig-2 style montage."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tfsdeploy.config import SampleConfig
    from tfsdeploy.evaluate import EvalConfig
    from tfsdeploy.evaluate import evaluate as run_evaluation
    from training.data import default_data_dir

    if threads:
        torch.set_num_threads(threads)
    cfg = EvalConfig(split=split, scales=_parse_scales(scales) or (), methods=tuple(m for m in methods.split(",") if m),
                     sample=SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed), engine=engine,
                     limit=limit, size=size, montage_image=montage_image)
    root = data or default_data_dir()
    if data is None and not (root / "summary.json").is_file():
        from training.data import build_spm_dataset

        typer.echo(f"building the SPM dataset in {root} (first use)")
        build_spm_dataset(root)
    with Progress(TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=True) as prog:
        task = prog.add_task("evaluate", total=None)
        summary = run_evaluation(list(model), root, out, cfg, lpips_backbone, lpips_lin,
                                 progress=lambda d, t: prog.update(task, completed=d, total=t), log=typer.echo)
    for scale, tables in summary["tables"].items():
        typer.echo(f"{scale}: " + "; ".join(f"{k} {v['PSNR']:.2f} dB / {v['SSIM']:.4f}"
                                            for k, v in tables["reference"].items()))
    typer.echo(f"wrote {out}/report.md, table1_x*.md/.csv, values.json and montage.png")


# --------------------------------------------------------------------------- export


@app.command()
@user_errors
def export(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint, run folder or bundle (default: the packaged "
                                           "model, or $TFSDEPLOY_MODEL)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Export the fp32 ONNX."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Export the fp16 ONNX (fp32 islands and I/O)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT FP16 engine (needs TensorRT and a GPU)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: CKPT/export)."),
    max_batch: int = typer.Option(4, help="Largest batch the artifacts accept."),
    min_size: int = typer.Option(0, help="Smallest image side (0 = 64, rounded to the model's multiple)."),
    max_size: int = typer.Option(0, help="Largest image side (0 = 512)."),
    opset: int = typer.Option(18, help="ONNX opset (18 or above)."),
    parity_steps: int = typer.Option(10, help="DDIM steps of the fused-image parity check."),
    workspace_gib: float = typer.Option(8.0, help="TensorRT builder workspace."),
) -> None:
    """Export the TMFA + U-Net denoiser to ONNX (fp32, fp16) and TensorRT FP16, each checked for parity.
    A bundle exports every member, each into its own folder."""
    from tfsdeploy.bundle import bundle_members, is_bundle, named_model

    model = named_model(model)
    if is_bundle(model):
        if out is not None:
            raise UserError("--out is per checkpoint; a bundle's members export beside it (or to the cache for "
                            "the packaged model)")
        members = bundle_members(model)
    else:
        members = {0: model}
    for member in members.values():
        _export_one(member, onnx, fp16, trt, out, max_batch, min_size, max_size, opset, parity_steps, workspace_gib)


def _export_one(model: Path, onnx: bool, fp16: bool, trt: bool, out: Optional[Path], max_batch: int,
                min_size: int, max_size: int, opset: int, parity_steps: int, workspace_gib: float) -> None:
    from export.onnx_export import default_spec, export_onnx
    from export.trt_build import build_engine, build_plan, tensorrt_status
    from tfsdeploy.artifacts import default_export_dir
    from tfsdeploy.checkpoint import build_from_checkpoint

    net, _ = build_from_checkpoint(model)
    spec = default_spec(net, max_batch=max_batch, min_size=min_size, max_size=max_size)
    out = out or default_export_dir(model)
    trt_mod, trt_reason = tensorrt_status() if trt else (None, "")
    precisions = [p for p, on in (("fp32", onnx), ("fp16", fp16)) if on]
    if trt_mod is not None and build_plan(trt_mod.__version__).onnx_precision not in precisions:
        precisions.append(build_plan(trt_mod.__version__).onnx_precision)
    if not precisions and not trt:
        raise UserError("nothing to export: pass --onnx, --fp16 or --trt")
    typer.echo(f"exporting {model} -> {out} (batch {spec.min_batch}..{spec.max_batch}, "
               f"size {spec.min_size}..{spec.max_size}, multiple of {spec.size_multiple}, opset {opset})")
    done = {}
    for p in precisions:
        path, rep = export_onnx(model, p, out, spec, opset, parity_steps, log=typer.echo)
        done[p] = path
        typer.echo(f"  {path.name}: parity vs torch fp32: relative L2 {rep['relative_l2']:.2e} "
                   f"(limit {rep['limits']['max_relative_l2']:g}), fused PSNR {rep['fused_psnr_db']:.1f} dB "
                   f"(limit {rep['limits']['min_fused_psnr_db']:g}, DDIM-{rep['ddim_steps']}, {rep['size']}px, "
                   f"{rep['provider']})")
    if trt:
        if trt_mod is None:
            raise UserError(f"--trt: {trt_reason}; the ONNX files above were written")
        onnx_path = done[build_plan(trt_mod.__version__).onnx_precision]
        engine = build_engine(onnx_path, out, workspace_gib, log=typer.echo)
        typer.echo(f"  {engine.name}: TensorRT FP16 engine")


# --------------------------------------------------------------------------- bench


@app.command()
@user_errors
def bench(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint or bundle (its --scale member; "
                                         "default: random weights of --preset; speed does not depend on the "
                                         "weights, except that exported engines are found beside it)."),
    preset: str = typer.Option("small", help="Model preset when no --model is given."),
    engines: str = typer.Option(",".join(("torch", "torch-compile", "onnx-fp32", "onnx-fp16", "trt")),
                                help="Engines to measure; unavailable ones are skipped with the reason."),
    sizes: str = typer.Option("128,256", help="Image sides for the per-call latency."),
    batches: str = typer.Option("1,4", help="Batch sizes for the per-call latency."),
    repeats: int = typer.Option(10, help="Timed calls per engine and shape."),
    warmup: int = typer.Option(2, help="Untimed calls first."),
    fuse_steps: str = typer.Option("10,25,50", help="DDIM step counts for the end-to-end fuse time."),
    ddpm_steps: int = typer.Option(50, help="DDPM levels actually timed, extrapolated to all T."),
    quality: bool = typer.Option(False, "--quality", help="Run the sampler study instead (needs a trained --model)."),
    data: Optional[Path] = typer.Option(None, help="Dataset for --quality (default: the built SPM dataset)."),
    images: int = typer.Option(4, help="--quality: held-out slices."),
    scale: int = typer.Option(4, help="Scale: the --quality study's, and which member of a bundle runs."),
    size: int = typer.Option(256, help="--quality: image side."),
    ddim_steps: str = typer.Option("10,25,50,100,250", help="--quality: DDIM step counts."),
    ddpm_full: int = typer.Option(0, help="--quality: DDPM levels (0 = all T, the paper's sampler)."),
    engine: str = typer.Option("auto", help="--quality: engine (see fuse)."),
    threads: int = typer.Option(0, help="CPU threads (0 = default)."),
    out: Path = typer.Option(Path("benchmarks/reports/latest"), "--out", "-o", help="Report folder."),
) -> None:
    """Measure engines side by side (Markdown, JSON and a PNG plot), or with --quality the sampler study."""
    from tfsdeploy.bench import BenchConfig, StudyConfig, run_bench, sampler_study
    from tfsdeploy.bundle import model_for_scale

    given = model  # a bundle stays a bundle for the command-line fuse timing (its sampler too)
    if model is not None:
        model = model_for_scale(model, scale)
    if quality:
        from training.data import build_spm_dataset, default_data_dir

        if model is None:
            model = model_for_scale(None, scale)
        root = data or default_data_dir()
        if data is None and not (root / "summary.json").is_file():
            typer.echo(f"building the SPM dataset in {root} (first use)")
            build_spm_dataset(root)
        r = sampler_study(model, root, StudyConfig(scale=scale, images=images, size=size,
                                                   ddim_steps=_parse_ints(ddim_steps, "--ddim-steps"),
                                                   ddpm_steps=ddpm_full, engine=engine), out, log=typer.echo)
        met = r["meets_target"]
        typer.echo(f"target ({r['target']}): " + (f"met by {met['sampler']}-{met['steps']}" if met else "not met"))
        typer.echo(f"wrote {out}/study.md, study.json and study.png")
        return
    cfg = BenchConfig(preset=preset, sizes=_parse_ints(sizes, "--sizes"), batches=_parse_ints(batches, "--batches"),
                      engines=tuple(e for e in engines.split(",") if e), repeats=repeats, warmup=warmup,
                      fuse_steps=_parse_ints(fuse_steps, "--fuse-steps"), ddpm_measured_steps=ddpm_steps,
                      threads=threads)
    r = run_bench(model, cfg, out, log=typer.echo, cli_model=given)
    fastest = min((x for x in r["latency"] if x["size"] == max(cfg.sizes) and x["batch"] == min(cfg.batches)),
                  key=lambda x: x["median_ms"])
    typer.echo(f"fastest at {fastest['size']}px batch {fastest['batch']}: {fastest['engine']} "
               f"({fastest['median_ms']:.1f} ms, {_speedup(fastest)} torch eager)")
    typer.echo(f"wrote {out}/bench.md, bench.json and bench.png")


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

    from export.trt_build import tensorrt_status
    from tfsdeploy import __version__
    from training.data import default_data_dir

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
    d = default_data_dir()
    typer.echo(f"SPM dataset: {d} ({'built' if (d / 'summary.json').is_file() else 'not built yet'})")
    try:
        from tfsdeploy.bundle import bundle_scales, default_model, is_bundle

        m = default_model()
        scales = f" (bundle: {', '.join(f'x{s}' for s in bundle_scales(m))})" if is_bundle(m) else ""
        typer.echo(f"default model: {m}{scales}")
    except UserError as e:
        typer.echo(f"default model: none ({e})")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
