"""`tfsdeploy train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import explicit, long_running, parse_scales
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import ANYTHING, check_output


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
    degradation: Optional[str] = typer.Option(None, help="Training inputs: bicubic (the paper's bicubic down) or "
                                              "varied (half of them blurred, shrunk otherwise, noisy and 8-bit)."),
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
    long_running()
    from tfsdeploy.config import model_preset
    from tfsdeploy.data import ensure_dataset
    from training.train import RUN_FILES, has_checkpoint, init_checkpoint, resolve_configs, started_from
    from training.train import train as run_training

    # A run is resumed, and what else its folder holds is left alone; any other folder becomes a run
    # only when it holds nothing but a run's files (an empty one, or what a failed start left).
    check_output(out, [data, init], owns=ANYTHING if has_checkpoint(out) else RUN_FILES, what="part of a training run")
    model = model_preset(preset)
    overrides = {
        "model": {"tmfa": tmfa},
        "schedule": {"num_steps": timesteps},
        "diffusion": {"prediction": prediction, "target": target, "residual_scale": residual_scale,
                      "objective": objective},
        "data": {"root": str(data) if data else None, "scales": parse_scales(scales), "crop": crop,
                 "augment": augment, "degradation": degradation},
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "psf_mse": psf_mse, "psf_ssim": psf_ssim,
                  "ema_decay": ema_decay, "seed": seed, "val_every": val_every, "ckpt_every": ckpt_every,
                  "log_every": log_every, "threads": threads,
                  "scale_balance": scale_balance},
    }
    init_from, shipped = init_checkpoint(init, parse_scales(scales)) if init is not None else (None, None)
    if shipped:  # a fine-tune trains on the inputs the member it starts from is fed, and validates as it runs
        overrides["data"]["backproject"] = shipped["backproject"]
        overrides["train"]["val_steps"] = shipped.get("ddim_steps")
    if init_from is not None and has_checkpoint(out):
        if not started_from(out, init_from):
            raise UserError(f"{out} already holds a run that did not start from {init}; --init starts a new "
                            f"one (use a new --out)")
        init_from = None  # the same command again: resume the fine-tune
    configs = resolve_configs(out, model, overrides, init=init_from)
    if (has_checkpoint(out) or init_from) and model != configs.model and explicit(ctx, "preset"):
        where = out if has_checkpoint(out) else f"--init {init}"
        raise UserError(f"{where} holds a different model than preset {preset!r}; drop --preset "
                        f"(or use a new --out for a new run)")
    root = ensure_dataset(configs.data.root, log=typer.echo)
    if time_limit is not None and not time_limit > 0:
        raise UserError(f"--time-limit must be a positive number of minutes, got {time_limit}")
    run_training(out, configs, data_root=root, show_progress=progress, log=typer.echo, init_from=init_from,
                 time_limit_s=None if time_limit is None else time_limit * 60, shipped=shipped)

