"""`tfsdeploy bench`: the engines side by side, or with --quality the sampler study."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import engine_config, explicit, long_running, notice, parse_ints
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import check_output


def bench(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint or bundle (its --scale member; "
                                         "default: random weights of --preset; speed does not depend on the "
                                         "weights, except that exported engines are found beside it)."),
    preset: str = typer.Option("small", help="Model preset when no --model is given."),
    engines: str = typer.Option("torch-fp32,torch,torch-compile,onnx,onnx-fp16,trt,aoti",
                                help="Engines to measure, named as in fuse (torch: fp16 with CUDA graphs on a GPU), "
                                "and torch-fp32 (eager fp32, the reference of every ratio) and torch-compile; "
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
    long_running()
    from tfsdeploy.data import reference_triplet
    from tfsdeploy.inputs import check_scale
    from tfsdeploy.modelref import resolve_model
    from tfsdeploy.tools.bench import REPORT_FILES
    from tfsdeploy.tools.study import STUDY_FILES

    check_scale(scale)
    check_output(out, [model, data], owns=(*REPORT_FILES, *STUDY_FILES), what="a benchmark report's file")
    engine_cfg = engine_config(engine, threads=threads, long_job=True)
    study_steps = parse_ints(ddim_steps, "--ddim-steps")
    if quality and (not study_steps or min(study_steps) < 1):
        raise UserError(f"--ddim-steps takes positive step counts, got {ddim_steps!r}")
    ignored = [n for n in ("data", "images", "size", "ddim_steps", "ddpm_full", "engine") if explicit(ctx, n)]
    if ignored and not quality:
        raise UserError(f"--{ignored[0].replace('_', '-')} applies to --quality only")
    if quality:
        from tfsdeploy.data import ensure_dataset, open_split
        from tfsdeploy.pipeline import FusionPipeline
        from tfsdeploy.tools.study import StudyConfig, sampler_study

        pipe = FusionPipeline.load(model, scale, engine=engine_cfg, notice=notice)
        samples = open_split(ensure_dataset(data, log=typer.echo), "test", size).load()
        r = sampler_study(pipe, samples, StudyConfig(images=images, size=size, ddim_steps=study_steps,
                                                     ddpm_full=ddpm_full), out, log=typer.echo)
        met = r["meets_target"]
        typer.echo(f"target ({r['target']}): " + (f"met by {met['sampler']}-{met['steps']}" if met else "not met"))
        typer.echo(f"wrote {out}/study.md, study.json and study.png")
        return
    from tfsdeploy.tools.bench import BenchConfig, run_bench

    names = tuple(e for e in engines.split(",") if e)
    if not any(e.strip() for e in names):
        raise UserError("--engines: name at least one engine")
    cfg = BenchConfig(preset=preset, sizes=parse_ints(sizes, "--sizes"), batches=parse_ints(batches, "--batches"),
                      engines=names, repeats=repeats, warmup=warmup,
                      fuse_steps=parse_ints(fuse_steps, "--fuse-steps"), ddpm_steps=ddpm_steps,
                      threads=threads, cli_repeats=cold_runs)
    ckpt = resolve_model(model).member(scale) if model is not None else None  # a bundle's member for --scale
    r = run_bench(ckpt, cfg, out, reference_triplet(cfg.fuse_size), log=typer.echo, cli_model=model)
    fastest = min((x for x in r["latency"] if x["size"] == max(cfg.sizes) and x["batch"] == min(cfg.batches)),
                  key=lambda x: x["median_ms"])
    typer.echo(f"fastest at {fastest['size']}px batch {fastest['batch']}: {fastest['engine']} "
               f"({fastest['median_ms']:.1f} ms, {_speedup(fastest)} torch eager)")
    typer.echo(f"wrote {out}/bench.md, bench.json" + (f" and {r['plot']}" if r.get("plot") else ""))


def _speedup(row: dict) -> str:
    s = row.get("speedup_vs_torch_fp32")
    return f"{s:.2f}x" if s else "n/a vs"


