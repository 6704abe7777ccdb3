"""`tfsdeploy cohort BIDS_DIR OUTPUT_DIR participant`: every participant of a BIDS dataset (or a manifest
CSV) fused into a BIDS derivatives dataset, on this machine or on a Ray cluster, resumably."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import (BACKPROJECT_OPTION, BATCH_SIZE_OPTION, COMPILE_OPTION, CUDA_GRAPH_OPTION,
                                  DEVICE_OPTION, ENGINE_OPTION, ENSEMBLE_OPTION, EXPORT_DIR_OPTION, GRID_OPTION,
                                  MAX_ROTATION_OPTION, MAX_SHIFT_OPTION, MODEL_OPTION, PRECISION_OPTION,
                                  PROGRESS_OPTION, REGISTER_OPTION, SAMPLER_OPTION, SCALE_OPTION, SEED_OPTION,
                                  SIZE_OPTION, SPACING_OPTION, STEPS_OPTION, THREADS_OPTION, VERBOSE_OPTION,
                                  engine_config, long_running, notice, register_bounds, verbose_log)
from tfsdeploy.config import SampleConfig
from tfsdeploy.errors import UserError


def cohort(
    bids_dir: Path = typer.Argument(..., help="A BIDS dataset (its folder), or a manifest CSV with the header "
                                    "id,t1,t2,func (paths to NIfTI files, DICOM series or folders of slices) for "
                                    "data that is not BIDS."),
    output_dir: Path = typer.Argument(..., help="The BIDS derivatives folder (made; a previous cohort's output is "
                                      "resumed). With --ray, a filesystem every node shares."),
    analysis_level: str = typer.Argument(..., help="participant: each participant fused on its own (BIDS Apps)."),
    participant_label: list[str] = typer.Option([], "--participant-label", metavar="LABEL ...",
                                                help="The participants to fuse (01 or sub-01; several after one "
                                                "flag); default: all."),
    session_label: list[str] = typer.Option([], "--session-label", metavar="LABEL ...",
                                            help="The sessions to fuse (1 or ses-1); default: all."),
    run: Optional[int] = typer.Option(None, min=1, max=99, help="Where a modality has several runs, the run to "
                                      "fuse (a participant with several and no --run is skipped)."),
    pet_window: Optional[str] = typer.Option(None, metavar="START:END",
                                             help="A 4-D PET becomes the duration-weighted mean of the frames lying "
                                             "wholly in START:END seconds (FrameTimesStart / FrameDuration); "
                                             "default: every frame."),
    scale: int = SCALE_OPTION,
    model: Optional[Path] = MODEL_OPTION,
    sampler: str = SAMPLER_OPTION,
    steps: int = STEPS_OPTION,
    backproject: Optional[float] = BACKPROJECT_OPTION,
    ensemble: bool = ENSEMBLE_OPTION,
    spacing: str = SPACING_OPTION,
    seed: int = SEED_OPTION,
    size: int = SIZE_OPTION,
    engine: str = ENGINE_OPTION,
    device: str = DEVICE_OPTION,
    precision: str = PRECISION_OPTION,
    cuda_graph: Optional[bool] = CUDA_GRAPH_OPTION,
    compile: bool = COMPILE_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    export_dir: Optional[Path] = EXPORT_DIR_OPTION,
    threads: int = THREADS_OPTION,
    grid: str = GRID_OPTION,
    register: bool = REGISTER_OPTION,
    max_rotation: Optional[float] = MAX_ROTATION_OPTION,
    max_shift: Optional[float] = MAX_SHIFT_OPTION,
    force: bool = typer.Option(False, "--force", help="Fuse again the participants an earlier run finished."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="auto|ADDRESS",
                                      help="Run on a Ray cluster (auto, or the head's HOST:PORT): each participant "
                                      "a task on a worker holding its pipeline (needs tfsdeploy[ray])."),
    workers: int = typer.Option(0, min=0, max=4096, help="With --ray: how many workers (0 = one per GPU, else as "
                                "many as the cluster's CPUs hold, --threads CPUs each)."),
    progress: bool = PROGRESS_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Fuse every participant of a BIDS dataset (T1w, T2w or PDw, PET) into a BIDS derivatives dataset:
    one process here, or a Ray cluster with --ray. Resumable: a finished participant is kept."""
    from tfsdeploy.fileio import removed_if_left_empty
    from tfsdeploy.inputs import check_scale
    from tfsdeploy.scans import MODALITIES
    from tfsdeploy.tools import cohort as lib

    long_running()
    if analysis_level != "participant":
        raise UserError(f"analysis level {analysis_level!r}: only 'participant' is offered (each participant is "
                        "fused on its own; there is no group level)")
    check_scale(scale)
    if grid not in MODALITIES:
        raise UserError(f"--grid must be one of {', '.join(MODALITIES)}, got {grid!r}")
    bounds = register_bounds(max_rotation, max_shift, register)
    window = lib.parse_window(pet_window)
    if ray is not None:
        from tfsdeploy.tools.cohort_ray import check_address

        check_address(ray)
    elif workers:
        raise UserError("--workers sets the number of Ray workers; add --ray")
    if not bids_dir.exists():
        raise UserError(f"{bids_dir}: no such BIDS dataset or manifest CSV")
    lib.check_output_dir(output_dir, bids_dir)
    units = lib.find_participants(bids_dir, participant_label, session_label, run)
    # again with what the dataset names: a manifest's scans may lie anywhere, the model too
    lib.check_output_dir(output_dir, bids_dir, [p for u in units for p in u.inputs.values()] + [model])
    sample = SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed, backproject=backproject,
                          ensemble=ensemble)
    model_id, sample = lib.identify_model(model, scale, sample)
    model_id.check_size(scale, size)
    eng = engine_config(engine, device, precision, cuda_graph, compile, threads, export_dir, long_job=True)
    spec = lib.CohortSpec(scale, sample, size, grid, bounds if register else False, window, run, eng, batch_size)
    pipe = cluster = None
    if ray is not None:  # joined before anything is written
        from tfsdeploy.tools.cohort_ray import connect, plan_workers

        cluster = connect(ray)
        plan_workers(cluster, ray, spec, workers)
    else:  # one pipeline for the whole cohort, loaded before anything is written
        from tfsdeploy.pipeline import FusionPipeline

        pipe = FusionPipeline.load(model, scale, sample, eng, log=verbose_log(verbose), notice=notice)
        pipe.max_batch(pipe.check_size(size), cap=1)  # a size whose one slice does not fit: refused now
    results: list = []
    with removed_if_left_empty(output_dir):
        lib.write_description(output_dir, bids_dir, model_id, spec)
        try:
            with _Bars(progress, len(units)) as bars:
                def finish(res) -> None:
                    results.append(res)
                    bars.participant_done(res.slices)
                    _say(res)

                if ray is None:
                    notice(f"fusing {len(units)} participant(s) ({pipe.describe()})")
                    started = time.time()
                    for unit in units:
                        finish(lib.fuse_unit(pipe, unit, output_dir, model_id, spec, force, progress=bars.slices,
                                             log=verbose_log(verbose), started=started))
                else:
                    from tfsdeploy.tools.cohort_ray import run_on_ray

                    run_on_ray(cluster, ray, units, output_dir, model, model_id, spec, workers, force,
                               on_start=notice, on_result=finish)
        finally:  # an interrupted cohort still reports what it finished
            done = {r.key for r in results}
            lib.write_report(output_dir, results, [u for u in units if u.key not in done],
                             title=f"{bids_dir} -> {output_dir}, x{scale}, model sha256 {model_id.sha256[:16]}")
    counts = {s: sum(r.status == s for r in results) for s in lib.STATUSES}
    typer.echo(f"wrote {output_dir} ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
               f"report {output_dir / lib.REPORT}")
    if counts["failed"]:
        typer.echo(f"error: {counts['failed']} of {len(results)} participant(s) failed; see "
                   f"{output_dir / lib.PARTICIPANTS}", err=True)
        raise typer.Exit(1)


def _say(res) -> None:
    why = f": {res.reason}" if res.reason else ""
    extra = f" ({res.slices} slices, {res.seconds:.1f} s)" if res.status == "done" else ""
    notice(f"{res.key}: {res.status}{extra}{why}")


class _Bars(contextlib.AbstractContextManager):
    """Two progress bars: participants of the cohort, and slices of the participant being fused."""

    def __init__(self, enabled: bool, participants: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), disable=not enabled, transient=True)
        self.people = self.prog.add_task("participants", total=participants)
        self.slice_task = self.prog.add_task("slices", total=None)
        self.total_slices = 0

    def __enter__(self):
        self.prog.__enter__()
        return self

    def __exit__(self, *exc):
        return self.prog.__exit__(*exc)

    def slices(self, done: int, total: int) -> None:
        self.prog.update(self.slice_task, completed=self.total_slices + done)

    def participant_done(self, slices: int) -> None:
        self.total_slices += slices
        self.prog.update(self.slice_task, completed=self.total_slices)
        self.prog.advance(self.people)
