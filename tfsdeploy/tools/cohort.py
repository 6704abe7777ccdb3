"""A cohort: every participant of a BIDS dataset (or of a manifest CSV) fused into a BIDS derivatives
dataset, resumably, one participant at a time, each exactly as `fuse` would fuse it.

Finding the inputs. In a BIDS dataset, pybids finds each participant's (and session's) T1w, T2w
(else PDw) and PET; file names are never parsed here. A modality with no file, or with several
(two runs, two acquisitions) and no `run` that picks one, skips the participant with the reason. A
manifest CSV (`id,t1,t2,func`, paths relative to the CSV) serves data that is not BIDS: NIfTI files,
DICOM series folders or folders of slices, as `fuse` takes them.

A 4-D PET becomes one static image: the duration-weighted mean of the frames lying wholly inside
the window [START, END] seconds (`FrameTimesStart` / `FrameDuration` from its sidecar; default: every
frame; without timing, the plain mean of every frame).

Fusing. One participant is what `fuse T1 T2 PET` does on the same files: `open_scan`, then
`FusionPipeline.fuse_scan`, then `ScanOutput` writes the volume and its montage, so the bytes are the
same. The volume, the montage and the JSON sidecar are published together (tfsdeploy.fileio.
atomic_outputs, sidecar last), so an interrupted cohort leaves each participant either finished or
absent. A participant whose sidecar matches its inputs' sha256, the model's sha256 and the options,
and whose output still has the sha256 the sidecar records, is kept, not fused again.

    OUTPUT_DIR/dataset_description.json      DatasetType derivative, GeneratedBy (version, model, options)
    OUTPUT_DIR/sub-01/[ses-1/]anat/sub-01[_ses-1]_space-T1w_desc-fusedx4_fusion.nii.gz
                                   ..._fusion_montage.png   ..._fusion.json
    OUTPUT_DIR/participants.tsv              status (done, kept, skipped, failed), reason, time, slices
    OUTPUT_DIR/cohort_report.html            the same with a thumbnail per participant
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import html
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_outputs, atomic_path, check_output, check_outputs_spare_inputs

DESCRIPTION = "dataset_description.json"
PARTICIPANTS = "participants.tsv"
REPORT = "cohort_report.html"
MANIFEST_COLUMNS = ("id", "t1", "t2", "func")
# The grid the output lies on, as a BIDS space label.
SPACES = {"t1": "T1w", "t2": "T2w", "func": "PET"}
LABEL = re.compile(r"^[A-Za-z0-9]+$")
NIFTI = [".nii", ".nii.gz"]
STATUSES = ("done", "kept", "skipped", "failed")
# What a cohort writes into OUTPUT_DIR (fileio.owned patterns): the derivatives, the tables, the Ray
# driver's marker. An existing folder that holds anything else is refused and left as it is.
COHORT_FILES = (DESCRIPTION, PARTICIPANTS, REPORT, ".bidsignore", ".tfsdeploy-cohort-*", "sub-*/**")
COHORT_EXTRA = "pip install 'tfsdeploy[cohort]'"
RAY_EXTRA = "pip install 'tfsdeploy[ray]'"


# --------------------------------------------------------------------------- participants


@dataclasses.dataclass(frozen=True)
class Unit:
    """One participant (and session): what is fused into one output.

    inputs: modality (t1, t2, func) -> path, as `fuse` would be given them; empty when `skip` says why
    the participant cannot be fused. sources: modality -> what the sidecar names as its source (a BIDS
    URI, or the path for a manifest). pet_timing: (FrameTimesStart, FrameDuration) of the PET, if known."""

    label: str
    session: Optional[str] = None
    inputs: dict = dataclasses.field(default_factory=dict)
    sources: dict = dataclasses.field(default_factory=dict)
    pet_timing: Optional[tuple] = None
    skip: str = ""

    @property
    def key(self) -> str:
        return f"sub-{self.label}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> Path:
        """The output folder, relative to OUTPUT_DIR."""
        return Path(f"sub-{self.label}", *([f"ses-{self.session}"] if self.session else []), "anat")


def strip_prefix(label: str, prefix: str) -> str:
    return label[len(prefix):] if label.startswith(prefix) else label


def check_labels(labels, option: str, prefix: str) -> list[str]:
    out = []
    for given in labels:
        label = strip_prefix(given, prefix)
        if not LABEL.match(label):
            raise UserError(f"{option} {given!r}: a label is letters and digits (with or without '{prefix}')")
        out.append(label)
    return out


def find_participants(source: Path, participants=(), sessions=(), run: Optional[int] = None) -> list[Unit]:
    """The units of a BIDS dataset (a folder) or a manifest CSV (a file), narrowed to `participants`
    and `sessions` (labels, with or without their sub-/ses- prefix); see the module docstring."""
    participants = check_labels(participants, "--participant-label", "sub-")
    sessions = check_labels(sessions, "--session-label", "ses-")
    if source.is_file():
        if sessions:
            raise UserError("--session-label selects BIDS sessions; a manifest CSV has none")
        units = read_manifest(source)
    elif source.is_dir():
        units = find_bids(source, sessions, run)
    else:
        raise UserError(f"{source}: no such BIDS dataset or manifest CSV")
    if participants:
        have = {u.label for u in units}
        missing = [p for p in participants if p not in have]
        if missing:
            known = ", ".join(sorted(have)[:8]) + (" ..." if len(have) > 8 else "")
            raise UserError(f"--participant-label {missing[0]}: no participant sub-{missing[0]} in {source} "
                            f"(it has {known or 'none'})")
        units = [u for u in units if u.label in participants]
    if not units:
        raise UserError(f"{source}: no participant to fuse")
    return units


def find_bids(root: Path, sessions=(), run: Optional[int] = None) -> list[Unit]:
    """Every participant (and session) of the BIDS dataset at `root`, found by pybids."""
    if not (root / DESCRIPTION).is_file():
        raise UserError(f"{root}: no {DESCRIPTION}, so not a BIDS dataset (data that is not BIDS goes in a "
                        f"manifest CSV: id,t1,t2,func)")
    try:
        json.loads((root / DESCRIPTION).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{root / DESCRIPTION}: not valid JSON ({e})") from None
    try:
        from bids import BIDSLayout
    except ImportError:
        raise UserError(f"reading a BIDS dataset needs pybids, which is not installed: {COHORT_EXTRA}") from None
    try:
        layout = BIDSLayout(str(root), validate=False)
    except Exception as e:  # noqa: BLE001 - pybids refuses a layout with its own error types
        raise UserError(f"{root}: pybids cannot index it ({type(e).__name__}: {' '.join(str(e).split())})") from None
    # One query for the whole dataset, grouped by the entities pybids parsed: a query per participant
    # and modality costs seconds on a few hundred participants.
    images: dict[tuple, list] = {}
    for f in layout.get(extension=NIFTI, datatype=["anat", "pet"], suffix=list(SUFFIXES)):
        images.setdefault((f.entities["subject"], f.entities.get("session")), []).append(f)
    units = []
    found_sessions = {ses for _, ses in images if ses is not None}
    for sub in sorted(layout.get_subjects()):
        for ses in sorted({ses for s, ses in images if s == sub and ses is not None}) or [None]:
            if sessions and ses not in sessions:
                continue
            units.append(_bids_unit(images.get((sub, ses), []), root, sub, ses, run))
    unknown = [s for s in sessions if s not in found_sessions]
    if unknown:
        raise UserError(f"--session-label {unknown[0]}: no session ses-{unknown[0]} in {root}")
    return units


# The BIDS suffixes of each modality, in order of preference (a T2w before a PDw).
SUFFIXES = {"T1w": "t1", "T2w": "t2", "PDw": "t2", "pet": "func"}
MODALITY_NAMES = {"t1": "T1w", "t2": "T2w or PDw", "func": "PET"}


def _bids_unit(files: list, root: Path, sub: str, ses: Optional[str], run: Optional[int]) -> Unit:
    """One participant's unit from its NIfTI files as pybids found them (entities parsed by pybids)."""
    picked, why = {}, []
    for m, name in MODALITY_NAMES.items():
        found: list = []
        for suffix in (s for s, mod in SUFFIXES.items() if mod == m):  # the first suffix present wins
            found = found or [f for f in files if f.entities.get("suffix") == suffix]
        if len(found) > 1 and run is not None:
            found = [f for f in found if f.entities.get("run") is not None and int(f.entities["run"]) == run]
        if len(found) == 1:
            picked[m] = found[0]
        elif not found:
            why.append(f"no {name}" + (f" of run {run}" if run is not None else ""))
        else:
            listed = ", ".join(sorted(Path(f.path).name for f in found))
            why.append(f"{len(found)} {name} files ({listed}); choose one with --run")
    if why:
        return Unit(sub, ses, skip="; ".join(why))
    inputs = {m: Path(f.path) for m, f in picked.items()}
    sources = {m: f"bids:raw:{Path(f.path).relative_to(root.resolve()).as_posix()}" for m, f in picked.items()}
    meta = picked["func"].get_metadata()
    timing = (meta.get("FrameTimesStart"), meta.get("FrameDuration"))
    return Unit(sub, ses, inputs, sources, timing if all(t is not None for t in timing) else None)


def read_manifest(path: Path) -> list[Unit]:
    """The units of a manifest CSV: a header `id,t1,t2,func`, one row per participant, paths absolute
    or relative to the CSV's folder. A path that does not exist skips its participant."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a manifest CSV (not text); give a BIDS dataset folder or a CSV "
                        f"with the header {','.join(MANIFEST_COLUMNS)}") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a valid CSV ({e})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    header = tuple(c.strip().lower() for c in rows[0]) if rows else ()
    if header != MANIFEST_COLUMNS:
        raise UserError(f"{path}: a manifest CSV starts with the header {','.join(MANIFEST_COLUMNS)} "
                        f"(got {','.join(header) or 'nothing'})")
    units, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(MANIFEST_COLUMNS):
            raise UserError(f"{path}:{line}: expected {len(MANIFEST_COLUMNS)} columns, got {len(row)}")
        label, *given = (c.strip() for c in row)
        label = strip_prefix(label, "sub-")
        if not LABEL.match(label):
            raise UserError(f"{path}:{line}: id {label!r} is not a BIDS label (letters and digits only)")
        if label in seen:
            raise UserError(f"{path}:{line}: id {label} appears twice")
        seen.add(label)
        inputs = {m: (p if p.is_absolute() else path.parent / p) for m, p in zip(MANIFEST_COLUMNS[1:],
                                                                                 map(Path, given))}
        missing = [f"{m}: {p} does not exist" for m, p in inputs.items() if not p.exists()]
        if missing:
            units.append(Unit(label, skip="; ".join(missing)))
            continue
        timing = _sidecar_timing(inputs["func"])
        units.append(Unit(label, None, inputs, {m: str(p.resolve()) for m, p in inputs.items()}, timing))
    return units


def _sidecar_timing(pet: Path) -> Optional[tuple]:
    """The frame timing in a BIDS-style sidecar beside a manifest's NIfTI PET (NAME.json), if any."""
    name = pet.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            sidecar = pet.with_name(name[: -len(suffix)] + ".json")
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                return None
            timing = (meta.get("FrameTimesStart"), meta.get("FrameDuration"))
            return timing if all(t is not None for t in timing) else None
    return None


# --------------------------------------------------------------------------- 4-D PET


def parse_window(text: Optional[str]) -> Optional[tuple[float, float]]:
    """`--pet-window START:END` in seconds -> (START, END); None keeps every frame."""
    if text is None:
        return None
    start, sep, end = text.partition(":")
    try:
        window = (float(start), float(end))
        if not sep or not all(math.isfinite(v) for v in window):
            raise ValueError(text)
    except ValueError:
        raise UserError(f"--pet-window takes START:END in seconds, e.g. 0:600 (got {text!r})") from None
    if not 0 <= window[0] < window[1]:
        raise UserError(f"--pet-window {text}: START must be at least 0 and below END")
    return window


def pet_frames(n: int, timing: Optional[tuple], window: Optional[tuple[float, float]]) -> tuple[list[int], list[float],
                                                                                               str]:
    """Which of `n` frames a static PET averages and their weights, and the rule in words. Frames lying
    wholly inside `window` (seconds), weighted by duration; without a window every frame; without
    timing (FrameTimesStart / FrameDuration) every frame, equally (a window then cannot be applied)."""
    if timing is None:
        if window is not None:
            raise UserError(f"the PET has {n} frames and no FrameTimesStart / FrameDuration, so --pet-window "
                            "cannot pick frames")
        return list(range(n)), [1.0] * n, f"mean of all {n} frames (no frame timing)"
    starts, durations = ([float(v) for v in t] for t in timing)
    if len(starts) != n or len(durations) != n:
        raise UserError(f"the PET has {n} frames but its sidecar times {len(starts)} (FrameTimesStart) and "
                        f"{len(durations)} (FrameDuration)")
    lo, hi = window if window is not None else (-math.inf, math.inf)
    eps = 1e-6
    picks = [i for i in range(n) if starts[i] >= lo - eps and starts[i] + durations[i] <= hi + eps]
    if not picks:
        raise UserError(f"no PET frame lies wholly inside --pet-window {lo:g}:{hi:g} s (frames start at "
                        f"{', '.join(f'{s:g}' for s in starts)} s)")
    a, b = starts[picks[0]], starts[picks[-1]] + durations[picks[-1]]
    return picks, [durations[i] for i in picks], (f"duration-weighted mean of frames {picks[0] + 1}-{picks[-1] + 1} "
                                                   f"of {n} ({a:g}-{b:g} s)")


def static_pet(path: Path, timing: Optional[tuple], window: Optional[tuple[float, float]]):
    """A 4-D PET NIfTI reduced to one 3-D image by `pet_frames`: (nibabel image, rule in words), or
    (None, "") for a 3-D PET, which is fused as it is."""
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from None
    shape = img.shape
    if len(shape) < 4 or all(n == 1 for n in shape[3:]):
        if window is not None and len(shape) >= 3:
            return None, "one frame (static PET; --pet-window does not apply)"
        return None, ""
    if len(shape) > 4:
        raise UserError(f"{path}: a PET of shape {'x'.join(map(str, shape))}; expected 3-D or 4-D (frames last)")
    picks, weights, rule = pet_frames(shape[3], timing, window)
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    data = np.zeros(shape[:3], dtype=np.float64)
    for i, wi in zip(picks, w):
        data += wi * np.asarray(img.dataobj[..., i], dtype=np.float64)
    return nib.Nifti1Image(data.astype(np.float32), img.affine, img.header), rule


def write_static_pet(path: Path, timing: Optional[tuple], window: Optional[tuple[float, float]], out: Path) -> str:
    """Write `static_pet` of `path` as a 3-D NIfTI at `out` (the file `fuse` is given); returns the rule."""
    import nibabel as nib

    img, rule = static_pet(path, timing, window)
    if img is None:
        raise UserError(f"{path}: already a 3-D PET")
    img.header.set_data_dtype("float32")
    nib.save(img, out)
    return rule


# --------------------------------------------------------------------------- options and identity


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """What decides a participant's output, beside its inputs and the model: recorded in the sidecar and
    compared on resume. `sample` is already resolved for the model (its recommended steps and
    back-projection filled in), so a rerun that spells the defaults out matches."""

    scale: int
    sample: SampleConfig
    size: int = 0
    grid: str = "t1"
    register: object = False  # False, True or a tfsdeploy.volumes.RegisterConfig (bounds given), as open_scan takes
    pet_window: Optional[tuple[float, float]] = None
    run: Optional[int] = None
    engine: EngineConfig = EngineConfig()
    batch_size: int = 0

    def options(self) -> dict:
        s = self.sample
        return {"scale": self.scale, "sampler": s.sampler, "steps": s.steps, "spacing": s.spacing, "seed": s.seed,
                "backproject": s.backproject,
                "backproject_gate": list(s.backproject_gate) if s.backproject_gate else None,
                "ensemble": s.ensemble, "size": self.size, "grid": self.grid,
                "register": self.register is not False,
                "register_bounds": ([self.register.max_rotation_deg, self.register.max_shift_mm]
                                    if not isinstance(self.register, bool) else None),
                "pet_window": list(self.pet_window) if self.pet_window else None,
                "run": self.run, "engine": self.engine.engine, "precision": self.engine.precision}

    def base_name(self, unit: Unit) -> str:
        return f"{unit.key}_space-{SPACES[self.grid]}_desc-fusedx{self.scale}_fusion"


@dataclasses.dataclass(frozen=True)
class ModelId:
    """The model a cohort fuses with: the file that runs at the scale, its sha256, and its training
    size and size multiple (so a driver that loads no weights can check --size)."""

    path: str
    sha256: str
    image_size: int
    size_multiple: int

    def check_size(self, scale: int, size: int) -> int:
        """The output side for `size` (0 = the model's training size), validated as the pipeline does."""
        from tfsdeploy.inputs import check_scale_size

        size = size or self.image_size
        check_scale_size(scale, size, self.size_multiple)
        return size


def identify_model(model, scale: int, sample: SampleConfig) -> tuple[ModelId, SampleConfig]:
    """The model's member for `scale` and its sha256 (a checkpoint's weights, an exported artifact's
    file), and `sample` with the model's recommendations filled in: read without loading weights."""
    from tfsdeploy.artifacts import checkpoint_fingerprint, read_sidecar
    from tfsdeploy.checkpoint import Configs, read_meta, sha256_file
    from tfsdeploy.config import artifact_engine
    from tfsdeploy.modelref import resolve_model

    ref = resolve_model(model)
    member = ref.fusable_member(scale)
    if artifact_engine(member) is not None:
        sha, meta = sha256_file(member), read_sidecar(member).get("configs", {})
    else:
        sha, meta = checkpoint_fingerprint(member)["sha256"], read_meta(member)[1]
    cfg = Configs.from_json(meta).model
    return ModelId(str(member), sha, cfg.image_size, cfg.size_multiple), ref.sample_for(scale, sample)


def hash_input(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    from tfsdeploy.checkpoint import sha256_file

    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _version() -> str:
    from tfsdeploy import __version__

    return __version__


# --------------------------------------------------------------------------- the output dataset


def check_output_dir(out: Path, source: Path, inputs: Optional[list] = None) -> None:
    """Refuse, before any work, an output folder that lies in the input dataset or holds it. Given the
    `inputs` the dataset names (the participants' scans, the model), also one that is, holds or lies
    inside one of them, that is a file, or that holds anything but a cohort's output (`COHORT_FILES`;
    a previous cohort's output is resumed)."""
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise UserError(f"{out}: lies inside the input dataset {source}; the derivatives go in a folder of their "
                        f"own (e.g. beside it)")
    check_outputs_spare_inputs([out], [source, *(p for p in inputs or () if p is not None)], "OUTPUT_DIR")
    if inputs is None:
        return
    check_output(out, [], COHORT_FILES, "a cohort's output", "OUTPUT_DIR")
    if (out / DESCRIPTION).exists():  # a raw BIDS dataset holds a description and sub-*/ too
        try:
            kind = json.loads((out / DESCRIPTION).read_text()).get("DatasetType")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "derivative":
            raise UserError(f"{out}: exists and is not a cohort's output (its {DESCRIPTION} is not a derivative's); "
                            f"give a new or empty folder")


def generated_by(model: ModelId, spec: CohortSpec) -> dict:
    return {"Name": "tfsdeploy", "Version": _version(),
            "Description": "TFS-Diff tri-modal fusion (T1, T2/PD, PET) with super-resolution",
            "ModelSHA256": model.sha256, "Options": spec.options()}


def write_description(out: Path, source: Path, model: ModelId, spec: CohortSpec) -> None:
    """dataset_description.json of the derivatives, its GeneratedBy listing every (version, model,
    options) that has written into it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / DESCRIPTION
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError):
        desc = {}
    entry = generated_by(model, spec)
    runs = [g for g in desc.get("GeneratedBy", []) if g != entry] + [entry]
    link = source.resolve().as_uri() if source.is_dir() else source.resolve().parent.as_uri()
    desc = {"Name": desc.get("Name", f"tfsdeploy fusion of {source.name}"), "BIDSVersion": "1.9.0",
            "DatasetType": "derivative", "GeneratedBy": runs,
            "SourceDatasets": [{"URL": link}], "DatasetLinks": {"raw": link}}
    text = json.dumps(desc, indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return  # as it is: concurrent runs (array tasks) of one cohort leave it alone
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@dataclasses.dataclass
class Result:
    """What happened to one unit. status: done (fused now), kept (finished by an earlier run), skipped
    (cannot be fused: reason), failed (reason). output, montage: relative to OUTPUT_DIR."""

    key: str
    label: str
    session: Optional[str]
    status: str
    reason: str = ""
    seconds: float = 0.0
    slices: int = 0
    output: str = ""
    montage: str = ""


@dataclasses.dataclass(frozen=True)
class Outputs:
    folder: Path
    volume: Path
    montage: Path
    sidecar: Path


def outputs_for(out: Path, unit: Unit, spec: CohortSpec, kind: str = "nifti") -> Outputs:
    from tfsdeploy.scans import montage_path

    folder = out / unit.folder
    base = spec.base_name(unit)
    volume = folder / (base + (".nii.gz" if kind == "nifti" else ""))
    return Outputs(folder, volume, montage_path(volume), folder / (base + ".json"))


def expected_record(unit: Unit, model: ModelId, spec: CohortSpec) -> dict:
    """What a finished output's sidecar must say for it to be kept."""
    return {"InputHashes": {m: hash_input(p) for m, p in unit.inputs.items()}, "ModelSHA256": model.sha256,
            "Options": spec.options()}


def finished(unit: Unit, out: Path, model: ModelId, spec: CohortSpec,
             record: Optional[dict] = None) -> Optional[tuple[Outputs, dict]]:
    """The outputs of `unit` and their sidecar when an earlier run (or attempt) finished them with these
    inputs, model and options and they still hold what it wrote, else None."""
    try:
        side = json.loads(outputs_for(out, unit, spec).sidecar.read_text())
    except (OSError, ValueError):
        return None
    record = record or expected_record(unit, model, spec)
    if not isinstance(side, dict) or any(side.get(k) != v for k, v in record.items()):
        return None
    for kind in ("nifti", "folder"):
        paths = outputs_for(out, unit, spec, kind)
        if paths.volume.exists() and paths.montage.is_file() and \
                side.get("Output", {}).get("sha256") == hash_input(paths.volume):
            return paths, side
    return None


Progress = Callable[[int, int], None]


def fuse_unit(pipe, unit: Unit, out: Path, model: ModelId, spec: CohortSpec, force: bool = False,
              progress: Optional[Progress] = None, log: Callable[[str], None] = lambda s: None,
              started: Optional[float] = None) -> Result:
    """Fuse one unit into OUTPUT_DIR `out` (see the module docstring), or keep it when finished. A unit
    that cannot be fused is a skipped or failed Result, never an exception (but for an interrupt).

    `started`: when this cohort run began (time.time()). An output written since then is this run's own
    (a retried task whose first attempt died after publishing): it counts as done, and `force` does not
    fuse it a second time."""
    t0 = time.perf_counter()
    res = Result(unit.key, unit.label, unit.session, "skipped", unit.skip)
    if unit.skip:
        return res
    try:
        record = expected_record(unit, model, spec)
        done = finished(unit, out, model, spec, record)
        ours = done is not None and started is not None and done[1]["Output"].get("written", 0) >= started
        if done is not None and (ours or not force):
            res.status, res.reason = ("done", "written by an earlier attempt of this run") if ours else (
                "kept", "finished by an earlier run with these inputs, model and options")
            res.slices = done[1]["Output"].get("slices", 0) if ours else 0
            res.output, res.montage = (str(p.relative_to(out)) for p in (done[0].volume, done[0].montage))
            return res
        with tempfile.TemporaryDirectory(prefix="tfsdeploy-pet-") as tmp:
            func, rule = unit.inputs["func"], ""
            if func.is_file() and func.name.lower().endswith((".nii", ".nii.gz")):
                img, rule = static_pet(func, unit.pet_timing, spec.pet_window)
                if img is not None:
                    func = Path(tmp) / "pet_static.nii.gz"
                    img.header.set_data_dtype("float32")
                    img.to_filename(func)
            paths = _fuse_and_publish(pipe, unit, out, func, model, spec, record, rule, progress, log)
    except KeyboardInterrupt:
        raise
    except UserError as e:
        res.status, res.reason = "failed", " ".join(str(e).split())
    except Exception as e:  # noqa: BLE001 - one participant's failure is one line, not the end of the cohort
        res.status, res.reason = "failed", f"{type(e).__name__}: {' '.join(str(e).split())}"
    else:
        res.status, res.reason = "done", rule
        res.slices = paths[1]
        res.output, res.montage = (str(p.relative_to(out)) for p in (paths[0].volume, paths[0].montage))
    res.seconds = time.perf_counter() - t0
    return res


def _fuse_and_publish(pipe, unit: Unit, out: Path, func: Path, model: ModelId, spec: CohortSpec, record: dict,
                      rule: str, progress: Optional[Progress], log) -> tuple[Outputs, int]:
    """What `fuse T1 T2 PET` does (open_scan, fuse_scan, ScanOutput), its outputs published with the
    sidecar as one."""
    from tfsdeploy.inputs import output_box
    from tfsdeploy.scans import ScanOutput, open_scan

    t0 = time.perf_counter()
    scan = open_scan(unit.inputs["t1"], unit.inputs["t2"], func, grid=spec.grid, register=spec.register, log=log)
    paths = outputs_for(out, unit, spec, scan.output_kind)
    size = pipe.check_size(spec.size)
    output_box(*scan.shape, size)
    fused = pipe.fuse_scan(scan, spec.size, spec.batch_size, progress=progress)  # 0: measured on a CPU, as fuse
    with atomic_outputs(paths.volume, paths.montage, paths.sidecar) as staged:  # the sidecar is renamed last
        output = ScanOutput(scan, staged[0])
        output.check()
        output.publish(fused)
        sidecar = {
            "Description": "T1, T2 (or PD) and PET fused into one colour volume with x"
                           f"{spec.scale} in-plane super-resolution (TFS-Diff)",
            "Sources": [unit.sources[m] for m in ("t1", "t2", "func")],
            "SourceModalities": dict(unit.sources),
            **record,
            "Model": {"path": model.path, "sha256": model.sha256},
            "Pipeline": pipe.describe(),
            "PETReduction": rule or "static PET, used as it is",
            "Output": {"file": paths.volume.name, "sha256": hash_input(staged[0]), "slices": len(scan),
                       "montage": paths.montage.name, "written": time.time()},
            "GeneratedBy": {"Name": "tfsdeploy", "Version": _version()},
            "DateCreated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "Seconds": round(time.perf_counter() - t0, 3),
        }
        staged[2].write_text(json.dumps(sidecar, indent=2) + "\n")
    return paths, len(scan)


# --------------------------------------------------------------------------- the report


def write_report(out: Path, results: list[Result], pending: list[Unit] = (), title: str = "") -> None:
    """participants.tsv and cohort_report.html: one row per unit (status, reason, time, slices), the
    report with each finished participant's montage as a thumbnail; `pending` units were not reached."""
    rows = list(results) + [Result(u.key, u.label, u.session, "not run", "the cohort was interrupted first")
                            for u in pending]
    tsv = ["participant_id\tsession_id\tstatus\treason\tseconds\tslices\toutput"]
    for r in rows:
        reason = r.reason.replace("\t", " ").replace("\n", " ") or "n/a"
        tsv.append(f"sub-{r.label}\t{'ses-' + r.session if r.session else 'n/a'}\t{r.status}\t{reason}\t"
                   f"{r.seconds:.1f}\t{r.slices}\t{r.output or 'n/a'}")
    counts = {s: sum(r.status == s for r in rows) for s in (*STATUSES, "not run")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    cells = []
    for r in rows:
        thumb = (f'<a href="{html.escape(r.montage)}"><img src="{html.escape(r.montage)}" width="192"></a>'
                 if r.montage else "")
        cells.append(f"<tr class=\"{r.status.replace(' ', '-')}\"><td>{html.escape(r.key)}</td><td>{r.status}</td>"
                     f"<td>{html.escape(r.reason)}</td><td>{r.seconds:.1f}</td><td>{r.slices}</td>"
                     f"<td>{thumb}</td></tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tfsdeploy cohort</title>
<style>body{{font-family:sans-serif}} td{{padding:4px 8px;vertical-align:top}} .failed{{background:#fdd}}
.skipped{{background:#ffd}} .not-run{{background:#eee}}</style></head><body>
<h1>tfsdeploy cohort</h1><p>{html.escape(title)}</p><p>{len(rows)} participants: {summary}.</p>
<table><tr><th>participant</th><th>status</th><th>reason</th><th>seconds</th><th>slices</th><th>montage</th></tr>
{chr(10).join(cells)}
</table></body></html>
"""
    with atomic_outputs(out / PARTICIPANTS, out / REPORT) as (tsv_tmp, html_tmp):
        tsv_tmp.write_text("\n".join(tsv) + "\n")
        html_tmp.write_text(page)
    bidsignore = out / ".bidsignore"
    if not bidsignore.exists():
        with atomic_path(bidsignore) as tmp:
            tmp.write_text(f"{REPORT}\n*_montage.png\n")


__all__ = ["Unit", "CohortSpec", "ModelId", "Result", "Outputs", "COHORT_EXTRA", "RAY_EXTRA", "find_participants",
           "find_bids", "read_manifest", "parse_window", "pet_frames", "static_pet", "write_static_pet",
           "identify_model", "check_output_dir", "write_description", "outputs_for", "finished", "fuse_unit",
           "write_report", "hash_input"]
