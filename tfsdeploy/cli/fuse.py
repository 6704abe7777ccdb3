"""`tfsdeploy fuse`: one triplet of images, or every slice of three volumes or folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from tfsdeploy.cli.common import (BACKPROJECT_OPTION, BATCH_SIZE_OPTION, COMPILE_OPTION, CUDA_GRAPH_OPTION,
                                  DEVICE_OPTION, ENGINE_OPTION, ENSEMBLE_OPTION, EXPORT_DIR_OPTION, GRID_OPTION,
                                  MAX_ROTATION_OPTION, MAX_SHIFT_OPTION, MODEL_OPTION, PRECISION_OPTION,
                                  PROGRESS_OPTION, REGISTER_OPTION, SAMPLER_OPTION, SCALE_OPTION, SEED_OPTION,
                                  SIZE_OPTION, SPACING_OPTION, STEPS_OPTION, THREADS_OPTION, VERBOSE_OPTION,
                                  engine_config, long_running, notice, progress_bar, register_bounds, verbose_log)
from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.errors import UserError


def fuse(
    t1: Path = typer.Argument(..., help="MR-T1: an image (PNG, JPEG or TIFF; 8 or 16 bit), a NIfTI volume "
                              "(.nii, .nii.gz), a DICOM series (its folder) or a folder of slices."),
    t2: Path = typer.Argument(..., help="MR-T2 (or PD / Gad / CT), of the same kind (volumes: NIfTI and DICOM mix)."),
    func: Path = typer.Argument(..., help="SPECT or PET, of the same kind; grey images get the built-in colour map."),
    scale: int = SCALE_OPTION,
    model: Optional[Path] = MODEL_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output: a PNG for images (default fused.png), "
                                       "a .nii/.nii.gz for volumes (default fused.nii.gz), a folder for folders "
                                       "(default fused/) and for --format dicom (default fused_dicom/); scans "
                                       "also get OUT_montage.png."),
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
    method: str = typer.Option("diffusion", help="diffusion (the model), or an upsample-then-fuse baseline: "
                               "classical, laplacian, guided."),
    threads: int = THREADS_OPTION,
    adapt: int = typer.Option(0, min=0, max=10_000, help="Test-time adaptation: first fine-tune a copy of the model "
                              "for N steps on pairs made from the input itself (degraded once more by x2), then "
                              "fuse with it; torch engine; 0 = off. The README says what it gains, at which "
                              "scale and step count."),
    grid: str = GRID_OPTION,
    series: list[str] = typer.Option([], "--series", metavar="UID",
                                     help="Volumes: the SeriesInstanceUID to read from a DICOM folder holding "
                                     "several series (repeat it for several folders)."),
    register: bool = REGISTER_OPTION,
    max_rotation: Optional[float] = MAX_ROTATION_OPTION,
    max_shift: Optional[float] = MAX_SHIFT_OPTION,
    save_transforms: Optional[Path] = typer.Option(None, help="With --register: write the transforms into this "
                                                   "folder as ITK .tfm files (t2_to_t1.tfm, func_to_t1.tfm, named "
                                                   "after the --grid volume), once the fuse succeeds."),
    format: str = typer.Option("auto", "--format", help="Volumes: the output's form: auto (NIfTI), nifti, or "
                               "dicom (a DICOM series in the folder --out, default fused_dicom/; RGB Secondary "
                               "Capture slices placed in the patient)."),
    patient_id: Optional[str] = typer.Option(None, help="--format dicom with a NIfTI T1: the patient's ID (a DICOM "
                                             "T1 gives its own patient and study)."),
    patient_name: Optional[str] = typer.Option(None, help="--format dicom with a NIfTI T1: the patient's name "
                                               "(DICOM form, e.g. Doe^Jane)."),
    anonymous: bool = typer.Option(False, "--anonymous", help="--format dicom with a NIfTI T1: the series names "
                                   "no patient."),
    send: Optional[str] = typer.Option(None, "--send", metavar="AE@HOST:PORT", help="--format dicom: C-STORE the "
                                       "written series to this PACS (its AE title, host and DICOM port)."),
    calling_ae: Optional[str] = typer.Option(None, help="With --send: this end's AE title (default TFSDEPLOY)."),
    stow: Optional[str] = typer.Option(None, "--stow", metavar="URL", help="--format dicom: store the written "
                                       "series by DICOMweb STOW-RS at this root (e.g. http://pacs:8042/dicom-web)."),
    progress: bool = PROGRESS_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Fuse three registered low-resolution images (or volumes, or folders of slices) into one
    high-resolution colour image (or volume, or folder). Volumes may be NIfTI files or DICOM series
    folders on different grids; they are resampled onto one grid (and with --register registered)."""
    from tfsdeploy.config import artifact_engine
    from tfsdeploy.inputs import check_scale
    from tfsdeploy.scans import MODALITIES, refuse_volume_options, scan_kind

    check_scale(scale)
    if grid not in MODALITIES:
        raise UserError(f"--grid must be one of {', '.join(MODALITIES)}, got {grid!r}")
    if save_transforms is not None and not register:
        raise UserError("--save-transforms writes the transforms of --register; add --register")
    bounds = register_bounds(max_rotation, max_shift, register)
    for given in (t1, t2, func):  # the inputs first: a missing one is not an output problem
        if not given.exists():
            raise UserError(f"{given}: no such file or folder")
    kind = next((k for k in map(scan_kind, (t1, t2, func)) if k), None)  # a mix is refused by open_scan
    if kind is None:
        refuse_volume_options(grid, series, register, "images")
    dicom_out = _dicom_options(kind, format, patient_id, patient_name, anonymous, send, calling_ae, stow)
    sample = SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed, backproject=backproject,
                          ensemble=ensemble)
    if adapt and model is not None and artifact_engine(model) is not None:
        raise UserError(f"--adapt fine-tunes the model's weights, and {model} is an exported artifact; give the "
                        f"checkpoint or bundle it was exported from")
    if adapt and engine == "auto":
        engine = "torch"  # adaptation fine-tunes the network: only the torch engine has gradients
    job = FuseJob(inputs=(t1, t2, func), scale=scale, model=model, out=out, sample=sample, size=size,
                  engine=engine_config(engine, device, precision, cuda_graph, compile, threads, export_dir),
                  batch_size=batch_size, method=method, adapt=adapt, progress=progress, verbose=verbose,
                  grid=grid, series=tuple(series), register=bounds if register else False,
                  transforms=save_transforms, dicom=dicom_out)
    if kind is not None:
        _fuse_scan(kind, job)
    else:
        _fuse_images(job)


@dataclasses.dataclass(frozen=True)
class DicomOut:
    """--format dicom: the patient options, and where to send the series (a tfsdeploy.pacs.Destination)."""

    patient_id: Optional[str]
    patient_name: Optional[str]
    anonymous: bool
    send: object = None
    calling_ae: str = ""
    stow: Optional[str] = None  # a DICOMweb root


def _dicom_options(kind: Optional[str], form: str, patient_id: Optional[str], patient_name: Optional[str],
                   anonymous: bool, send: Optional[str], calling_ae: Optional[str],
                   stow: Optional[str] = None) -> Optional[DicomOut]:
    """The DICOM output's options, checked before any input is read; None for another output."""
    forms = ("auto", "nifti", "dicom")
    if form not in forms:
        raise UserError(f"--format must be one of {', '.join(forms)}, got {form!r}")
    if form != "auto" and kind not in ("nifti", "dicom"):
        raise UserError(f"--format {form} applies to volumes (NIfTI files or DICOM series); "
                        f"{'images give a PNG' if kind is None else 'folders of slices give a folder of PNGs'}")
    given = [o for o, on in (("--patient-id", patient_id is not None), ("--patient-name", patient_name is not None),
                             ("--anonymous", anonymous), ("--send", send is not None),
                             ("--calling-ae", calling_ae is not None), ("--stow", stow is not None)) if on]
    if form != "dicom":
        if given:
            raise UserError(f"{given[0]} goes with --format dicom (a DICOM series output)")
        return None
    from tfsdeploy.pacs import DEFAULT_CALLING_AE, Destination, check_ae_title, check_stow_url

    if calling_ae is not None and send is None:
        raise UserError("--calling-ae names this end of a --send; add --send AE@HOST:PORT")
    if send is not None:  # before any work, not once the series is written
        from tfsdeploy.volumes import DICOM_EXTRA, import_extra

        import_extra("pynetdicom", "sending a DICOM series", DICOM_EXTRA)
    return DicomOut(patient_id, patient_name, anonymous, Destination.parse(send) if send is not None else None,
                    check_ae_title(calling_ae, "--calling-ae") if calling_ae is not None else DEFAULT_CALLING_AE,
                    check_stow_url(stow) if stow is not None else None)


@dataclasses.dataclass(frozen=True)
class FuseJob:
    """The options of one `fuse`, parsed and checked."""

    inputs: tuple[Path, Path, Path]  # t1, t2, func
    scale: int
    model: Optional[Path]
    out: Optional[Path]
    sample: SampleConfig
    size: int
    engine: EngineConfig
    batch_size: int
    method: str
    adapt: int
    progress: bool
    verbose: bool
    grid: str  # volumes: the grid the others are resampled onto, and what to read and register
    series: tuple[str, ...]
    register: object  # False, True or a tfsdeploy.volumes.RegisterConfig (bounds given)
    transforms: Optional[Path]
    dicom: Optional[DicomOut] = None  # volumes written as a DICOM series (--format dicom)

    def load_pipeline(self, engine: EngineConfig):
        from tfsdeploy.pipeline import FusionPipeline

        return FusionPipeline.load(self.model, self.scale, self.sample, engine, log=verbose_log(self.verbose),
                                   notice=notice)


def _fuse_images(job: FuseJob) -> None:
    """`fuse` on three images."""
    from tfsdeploy.fileio import check_output
    from tfsdeploy.imaging import check_writable, write_png
    from tfsdeploy.inputs import fuse_baseline, read_triplet

    out = job.out or Path("fused.png")
    check_writable(out)
    check_output(out, [*job.inputs, job.model])
    if job.method != "diffusion":
        if job.adapt:
            raise UserError("--adapt adapts the model; the upsample-then-fuse baselines have none")
        if job.sample.ensemble:
            raise UserError("--ensemble averages the model's fused images; the upsample-then-fuse baselines have no "
                            "model")
        write_png(out, fuse_baseline(read_triplet(*job.inputs), job.scale, job.size or 256, job.method))
        typer.echo(f"wrote {out} (bicubic + {job.method} fusion, x{job.scale})")
        return
    pipe = job.load_pipeline(job.engine)
    if job.adapt:
        pipe = _adapted(pipe, [read_triplet(*job.inputs)], job)
    with progress_bar(job.sample.sampler, job.progress) as bar:
        img = pipe.fuse_files(*job.inputs, out, job.size, progress=bar)
    typer.echo(f"wrote {out} ({img.shape[-1]}x{img.shape[-2]}, {pipe.describe()})")


def _fuse_scan(kind: str, job: FuseJob) -> None:
    """`fuse` on three volumes (NIfTI or DICOM) or three folders of slices: every axial slice, in batches."""
    long_running()
    from tfsdeploy.inputs import output_box
    from tfsdeploy.scans import ScanOutput, check_transform_folder, open_scan
    from tfsdeploy.tools.adapt import scan_triplets

    if job.method != "diffusion":
        raise UserError("--method applies to single images; scans are fused with the model")
    if job.transforms is not None:  # before registering: the output's own checks follow once the scan is read
        check_transform_folder(job.transforms, [], [*job.inputs, job.model])
    read: list[str] = []  # what was read, registered and resampled: said once every check has passed
    scan = open_scan(*job.inputs, grid=job.grid, series=job.series, register=job.register, log=read.append)
    plan = _plan_series(scan, job) if job.dicom is not None else None
    output = ScanOutput(scan, job.out, transforms=job.transforms, dicom=plan)
    output.check(also=[job.model])
    out, montage = output.path, output.montage
    pipe = job.load_pipeline(dataclasses.replace(job.engine, build_missing=not job.adapt))  # a scan is a long job
    if plan is not None:
        output.dicom = plan.with_model(pipe.describe(), pipe.source)
    output_box(*scan.shape, pipe.check_size(job.size))
    pipe.max_batch(pipe.check_size(job.size))  # refuse a size this device cannot hold before adapting
    for line in read:
        notice(line)
    _say_if_an_export_would_pay(pipe, len(scan), job)
    if job.adapt:  # one adapted model for the whole scan, from slices spread over it
        pipe = _adapted(pipe, scan_triplets(scan), job)

    def say_batch(choice) -> None:  # a measured batch is known once the first slices are fused
        typer.echo(f"fusing {len(scan)} slices of {scan.shape[1]}x{scan.shape[0]} in batches of {choice.batch} "
                   f"({choice.describe()}; {pipe.describe()})", err=True)

    with progress_bar("fuse", job.progress, "slices") as bar:
        fused = pipe.fuse_scan(scan, job.size, job.batch_size, progress=bar, on_choice=say_batch)
    written = output.publish(fused)
    where = (f"{out}/ (DICOM series, {len(written)} files)" if plan is not None else out
             if scan.output_kind == "nifti" else f"{out}/ ({len(written)} PNGs)")
    typer.echo(f"wrote {where} and {montage} ({len(scan)} slices, {fused.shape[-1]}x{fused.shape[-2]}, "
               f"{pipe.describe()})")
    if output.transform_files:
        typer.echo(f"wrote {job.transforms}/ ({', '.join(p.name for p in output.transform_files)})")
    if job.dicom is not None:
        _send(written, out, job.dicom)


def _plan_series(scan, job: FuseJob):
    from tfsdeploy.dicomout import plan_series

    d = job.dicom
    return plan_series(scan.series, job.grid, job.scale, patient_id=d.patient_id, patient_name=d.patient_name,
                       anonymous=d.anonymous)


def _send(files: list[Path], folder: Path, dicom: DicomOut) -> None:
    """C-STORE (--send), then STOW-RS (--stow), the written series; a failure is one line that says the
    series stays on disk (a failed C-STORE leaves the STOW-RS untried)."""
    from tfsdeploy.pacs import send_series, stow_series

    try:
        if dicom.send is not None:
            stored = send_series(files, dicom.send, dicom.calling_ae)
            typer.echo(f"sent {stored} of {len(files)} instances to {dicom.send} (C-STORE from {dicom.calling_ae})")
        if dicom.stow is not None:
            stored = stow_series(files, dicom.stow)
            typer.echo(f"sent {stored} of {len(files)} instances to {dicom.stow} (STOW-RS)")
    except UserError as e:
        raise UserError(f"{e}; the series stays in {folder}/") from None


def _say_if_an_export_would_pay(pipe, slices: int, job: FuseJob) -> None:
    """`auto` on a CPU with no export runs torch; past ONNX_PAYS_AFTER_CALLS calls an export pays."""
    from engines.torch_engine import TorchDenoiser
    from tfsdeploy import config

    calls = slices * pipe.steps * (8 if job.sample.ensemble else 1)
    if (job.engine.engine == "auto" and not job.adapt and pipe.device.type == "cpu"
            and isinstance(pipe.denoiser, TorchDenoiser) and calls >= config.ONNX_PAYS_AFTER_CALLS):
        notice(f"note: this scan makes {calls} denoiser calls, and on a CPU an ONNX export pays for itself after "
               f"about {config.ONNX_PAYS_AFTER_CALLS}: `tfsdeploy export{' ' + str(job.model) if job.model else ''}` "
               "once, and later runs use it")


def _adapted(pipe, trips: list, job: FuseJob):
    """A pipeline whose model copy was fine-tuned on `trips` for --adapt steps."""
    from tfsdeploy.tools.adapt import AdaptConfig, adapt

    with progress_bar("adapt", job.progress, "steps") as bar:
        res = adapt(pipe, trips, job.size, AdaptConfig(steps=job.adapt, seed=job.sample.seed), progress=bar)
    typer.echo(f"adapted to the input in {res.seconds:.1f} s ({job.adapt} steps on {res.pairs} internal pairs of "
               f"{res.lr_side} px, {res.seconds_per_step:.2f} s a step)", err=True)
    return res.pipeline
