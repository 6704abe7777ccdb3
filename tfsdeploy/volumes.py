"""Volumes from different scanners and sessions: onto one grid, and rigidly registered.

A volume here is what the scan reader holds: a nibabel image, voxel data [i, j, k] plus a
voxel-to-world affine in millimetres, world axes RAS (x to the subject's right, y anterior, z
superior). SimpleITK, which resamples and registers, works in LPS: its physical point is
origin + direction @ (spacing * index) with x to the left and y posterior. `to_itk` and `from_itk`
convert between the two by flipping the first two world axes; nothing else in the project needs to
know about LPS.

SimpleITK and pydicom come with the optional extra `tfsdeploy[scans]` and are imported on first use
(`import_extra`), so `import tfsdeploy` stays light and a missing extra is one line saying what to
install.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from tfsdeploy.config import MAX_ROTATION_DEG, MAX_SHIFT_MM
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.imaging import normalise_volume
from tfsdeploy.scans import AFFINE_TOL_MM

SCANS_EXTRA = "pip install 'tfsdeploy[scans]'"
DICOM_EXTRA = "pip install 'tfsdeploy[dicom]'"
# A volume must cover at least this fraction of the anatomical reference's brain box.
MIN_OVERLAP = 0.5
# RAS <-> LPS: flip the first two world axes (its own inverse).
_FLIP = np.diag([-1.0, -1.0, 1.0])


def import_extra(module: str, purpose: str, extra: str = SCANS_EXTRA):
    """`module` (SimpleITK or pydicom; highdicom or pynetdicom with DICOM_EXTRA) imported when first
    needed; without it, a UserError naming the extra that installs it. `purpose` says what needed it
    ("reading DICOM series", ...)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module}, which is not installed: {extra}") from None


# --------------------------------------------------------------------------- nibabel <-> SimpleITK


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the three voxel axes (the column norms of the affine's 3x3 part)."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def volume_data(img) -> np.ndarray:
    """The voxel data of a nibabel image as float32 [i, j, k] (a trailing singleton axis dropped)."""
    data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    if data.ndim < 3 or any(n != 1 for n in data.shape[3:]):
        raise UserError(f"expected a 3-D volume, got shape {'x'.join(map(str, data.shape))}")
    return data.reshape(data.shape[:3])


def to_itk(img, label: str = "volume"):
    """nibabel image (RAS affine) -> SimpleITK float32 image (LPS), the same voxels in the same places.

    ITK grids have orthonormal axes; a sheared affine is refused (`label` names the volume)."""
    sitk = import_extra("SimpleITK", "resampling volumes")
    affine = np.asarray(img.affine, dtype=float)
    spacing = voxel_sizes(affine)
    if not np.all(spacing > 0):
        raise UserError(f"{label}: its affine has a zero voxel size ({_fmt_mm(spacing)} mm)")
    direction = _FLIP @ affine[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise UserError(f"{label}: its voxel axes are sheared (not perpendicular); resample it onto an "
                        "orthogonal grid first")
    data = volume_data(img)
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # ITK arrays are [k, j, i]
    out.SetSpacing([float(s) for s in spacing])
    out.SetDirection([float(v) for v in direction.ravel()])
    out.SetOrigin([float(v) for v in _FLIP @ affine[:3, 3]])
    return out


def itk_affine(image) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _FLIP @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _FLIP @ np.asarray(image.GetOrigin(), dtype=float)
    return affine


def from_itk(image):
    """SimpleITK image (LPS) -> nibabel Nifti1Image, float32 [i, j, k] with a RAS affine."""
    import nibabel as nib
    import SimpleITK as sitk  # only reached with an ITK image in hand

    data = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).transpose(2, 1, 0)
    img = nib.Nifti1Image(np.ascontiguousarray(data), itk_affine(image))
    img.header.set_xyzt_units("mm")
    return img


# --------------------------------------------------------------------------- grids and extents


def same_grid(a, b) -> bool:
    """True when two images share shape and affine (within the scan reader's rounding tolerance)."""
    return (tuple(a.shape[:3]) == tuple(b.shape[:3])
            and np.allclose(a.affine, b.affine, rtol=0.0, atol=AFFINE_TOL_MM))


def describe_grid(img) -> str:
    """'64x64x64 of 4.00x4.00x4.00 mm' for messages."""
    return f"{'x'.join(str(n) for n in img.shape[:3])} of {_fmt_mm(voxel_sizes(img.affine))} mm"


def world_extent(img) -> np.ndarray:
    """[[xmin, xmax], [ymin, ymax], [zmin, zmax]] in RAS mm: the world box around the voxels' outer edges."""
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in img.shape[:3]], indexing="ij")).reshape(3, -1)
    world = np.asarray(img.affine, dtype=float)[:3, :3] @ corners + np.asarray(img.affine, dtype=float)[:3, 3:4]
    return np.stack([world.min(axis=1), world.max(axis=1)], axis=1)


def describe_extent(box: np.ndarray) -> str:
    """'x -90..90, y -126..90, z -72..108 mm'."""
    return ", ".join(f"{a} {lo:.0f}..{hi:.0f}" for a, (lo, hi) in zip("xyz", box)) + " mm"


def brain_box(img) -> np.ndarray:
    """A robust foreground bounding box of a volume, in voxel coordinates: [[i0, i1], [j0, j1], [k0, k1]].

    Foreground: above 10 % of the robust [0, 1] range (the scan reader's normalisation). The box spans
    the 1st to 99th percentile of the foreground voxels' coordinates along each axis, so a few bright
    voxels far from the head (a marker, noise) do not stretch it.
    """
    data = volume_data(img)
    stride = max(1, math.ceil(max(data.shape) / 96))  # a coarse view is plenty for a box
    fg = np.argwhere(normalise_volume(data[::stride, ::stride, ::stride]) > 0.1) * stride
    if len(fg) == 0:  # a constant volume: all of it
        return np.array([[0.0, n - 1.0] for n in data.shape])
    return np.stack([np.percentile(fg, 1.0, axis=0), np.percentile(fg, 99.0, axis=0)], axis=1)


def coverage(img, anatomy, box: np.ndarray | None = None, points: int = 24) -> float:
    """The fraction of `anatomy`'s brain box (voxel box `box`, default `brain_box(anatomy)`) that lies
    inside `img`'s field of view, estimated on a points^3 lattice through the box."""
    box = brain_box(anatomy) if box is None else box
    axes = [np.linspace(lo, hi, points) for lo, hi in box]
    ijk = np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    world = anatomy.affine[:3, :3] @ ijk + anatomy.affine[:3, 3:4]
    inv = np.linalg.inv(np.asarray(img.affine, dtype=float))
    theirs = inv[:3, :3] @ world + inv[:3, 3:4]
    shape = np.asarray(img.shape[:3], dtype=float)[:, None]
    inside = np.all((theirs >= -0.5) & (theirs <= shape - 0.5), axis=0)
    return float(inside.mean())


def check_overlap(images: Mapping[str, object], anatomy: str, labels: Mapping[str, str] | None = None
                  ) -> dict[str, float]:
    """Refuse volumes that cannot be fused together; return each other volume's coverage of the brain box.

    images: key -> nibabel image; anatomy: the key whose brain box must be covered (the T1);
    labels: key -> name for messages (default: the keys). Refused, in one line each, are a volume whose
    world box does not meet the anatomy's (each volume's extent is given), and one that covers less
    than MIN_OVERLAP of the anatomy's brain box.
    """
    labels = {k: (labels or {}).get(k, k) for k in images}
    ref = images[anatomy]
    ref_box = world_extent(ref)
    box = brain_box(ref)
    fractions = {}
    for key, img in images.items():
        if key == anatomy:
            continue
        theirs = world_extent(img)
        if np.any(theirs[:, 0] >= ref_box[:, 1]) or np.any(theirs[:, 1] <= ref_box[:, 0]):
            raise UserError(f"{labels[key]} and {labels[anatomy]} do not overlap in world space "
                            f"({labels[anatomy]}: {describe_extent(ref_box)}; {labels[key]}: "
                            f"{describe_extent(theirs)}); check their headers or register them first")
        fractions[key] = coverage(img, ref, box)
        if fractions[key] < MIN_OVERLAP:
            brain_world = world_extent_of_box(ref, box)
            raise UserError(f"{labels[key]} covers only {100 * fractions[key]:.0f} % of {labels[anatomy]}'s brain "
                            f"box ({describe_extent(brain_world)}; {labels[key]}: {describe_extent(theirs)}); "
                            f"at least {100 * MIN_OVERLAP:.0f} % is needed")
    return fractions


def world_extent_of_box(img, box: np.ndarray) -> np.ndarray:
    """The RAS world box around a voxel box [[i0, i1], [j0, j1], [k0, k1]] of `img`."""
    corners = np.array(np.meshgrid(*box, indexing="ij")).reshape(3, -1)
    world = img.affine[:3, :3] @ corners + img.affine[:3, 3:4]
    return np.stack([world.min(axis=1), world.max(axis=1)], axis=1)


# --------------------------------------------------------------------------- resampling


def resample_onto(moving, reference, registration: Registration | None = None, label: str = "volume"):
    """`moving` resampled onto `reference`'s grid (shape and affine), trilinear, as a float32 Nifti1Image.

    Without `registration` the two are placed by their affines alone; with it, a reference point p takes
    the moving volume's value at the registration's T(p). Outside the moving volume's field of view the
    value is its minimum, so the background stays background after the scan reader's normalisation.
    """
    sitk = import_extra("SimpleITK", "resampling volumes")
    mov = to_itk(moving, label)
    ref = to_itk(reference, "the reference volume")
    transform = registration.itk_transform() if registration is not None else sitk.Transform()
    background = float(sitk.GetArrayViewFromImage(mov).min())
    out = sitk.Resample(mov, ref, transform, sitk.sitkLinear, background, sitk.sitkFloat32)
    return from_itk(out)


def onto_grid(images: Mapping[str, object], reference: str, registrations: Mapping[str, Registration] | None = None,
              labels: Mapping[str, str] | None = None) -> tuple[dict[str, object], list[str]]:
    """Every volume on `reference`'s grid: (images, one line per volume that was resampled).

    A volume already on the reference grid, with no registration, is returned as it is. Call
    `check_overlap` first; `registrations` (key -> Registration to the reference) come from
    `register_rigid`.
    """
    labels = {k: (labels or {}).get(k, k) for k in images}
    registrations = registrations or {}
    ref = images[reference]
    out, lines = {}, []
    for key, img in images.items():
        reg = registrations.get(key)
        if key == reference or (reg is None and same_grid(img, ref)):
            out[key] = img
            continue
        t0 = time.perf_counter()
        out[key] = resample_onto(img, ref, reg, labels[key])
        how = "through its rigid registration" if reg is not None else "by the affines"
        lines.append(f"resampled {labels[key]} from {describe_grid(img)} onto {labels[reference]}'s grid "
                     f"({describe_grid(ref)}), trilinear {how}, in {time.perf_counter() - t0:.1f} s")
    return out, lines


# --------------------------------------------------------------------------- rigid registration


@dataclass(frozen=True)
class RegisterConfig:
    """Rigid (6 degrees of freedom) registration by Mattes mutual information, coarse to fine.

    Both volumes are first block-averaged to voxels of at least `working_mm`, or `follow_moving` times
    the moving volume's largest voxel when that is coarser: detail finer than the moving volume's own
    voxels cannot guide the fit, and skipping it is what makes a 256^3 T1 against a 4 mm SPECT cheap.
    `shrink` and `smooth` (sigmas in working voxels) give the pyramid levels; `sampling` is the fraction
    of voxels the metric draws at each level, at random from `seed` (SimpleITK takes 0 as "seed from
    the clock", so the seed is never 0). The fit runs on one thread: the same inputs give the same
    transform, bit for bit, on any machine.

    A fit whose metric is not better than the headers' placement is not used (the headers' placement is
    kept); one that turns by more than `max_rotation_deg` or shifts the brain's centre by more than
    `max_shift_mm` is refused as implausible for scans of one subject.
    """

    working_mm: float = 2.0
    follow_moving: float = 0.75
    shrink: tuple[int, ...] = (4, 2, 1)
    smooth: tuple[float, ...] = (2.0, 1.0, 0.0)
    sampling: float = 0.1
    bins: int = 32
    iterations: int = 200
    step_mm: float = 2.0
    min_step_mm: float = 0.01
    seed: int = 1
    max_rotation_deg: float = MAX_ROTATION_DEG
    max_shift_mm: float = MAX_SHIFT_MM

    def __post_init__(self):
        if not 0 < self.seed < 2**32:
            raise ValueError(f"seed must be in 1..2^32-1 (0 seeds SimpleITK from the clock), got {self.seed}")
        if not (self.max_rotation_deg > 0 and self.max_shift_mm > 0):
            raise ValueError("the bounds on rotation and shift must be positive")


@dataclass(frozen=True)
class Registration:
    """A rigid transform that maps a point of the fixed (reference) volume to the moving volume.

    rotation_deg: Euler angles about the R, A, S axes, composed as ITK's Euler3DTransform does
    (R = Rz @ Rx @ Ry), turning around `center_mm`; translation_mm: (R, A, S) shift in mm.
    metric_start / metric: Mattes mutual information before and after (negative; lower is better),
    both on the same samples. moved: False when the fit was not better than the start and the
    headers' placement (the identity) was kept; then `metric` is the rejected fit's.
    itk_parameters / itk_center: the same transform as ITK holds it, in LPS (what the .tfm file stores).
    """

    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    metric_start: float
    metric: float
    iterations: int
    seconds: float
    stop: str
    itk_parameters: tuple[float, ...]
    itk_center: tuple[float, float, float]
    moved: bool = True

    @classmethod
    def from_itk(cls, transform, **kw) -> Registration:
        ax, ay, az, tx, ty, tz = transform.GetParameters()
        c = transform.GetCenter()
        return cls(rotation_deg=(-math.degrees(ax), -math.degrees(ay), math.degrees(az)),
                   translation_mm=(-tx, -ty, tz), center_mm=(-c[0], -c[1], c[2]),
                   itk_parameters=tuple(transform.GetParameters()), itk_center=tuple(c), **kw)

    def itk_transform(self):
        sitk = import_extra("SimpleITK", "registration")
        t = sitk.Euler3DTransform()
        t.SetCenter(self.itk_center)
        t.SetParameters(self.itk_parameters)
        return t

    def matrix(self) -> np.ndarray:
        """The 4x4 RAS matrix of the transform (fixed point -> moving point)."""
        lps = np.eye(4)
        t = self.itk_transform()
        lps[:3, :3] = np.asarray(t.GetMatrix()).reshape(3, 3)
        c = np.asarray(self.itk_center)
        lps[:3, 3] = np.asarray(t.GetTranslation()) + c - lps[:3, :3] @ c
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ lps @ flip

    def with_matrix(self, matrix: np.ndarray) -> Registration:
        """This registration's record (metric, time) holding another rigid RAS matrix, about the same centre:
        what an inverse or a chain of registrations is written as."""
        sitk = import_extra("SimpleITK", "registration")
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        lps = flip @ np.asarray(matrix, dtype=float) @ flip
        t = sitk.Euler3DTransform()
        t.SetCenter(self.itk_center)
        t.SetMatrix([float(v) for v in lps[:3, :3].ravel()], 1e-6)
        c = np.asarray(self.itk_center)
        t.SetTranslation([float(v) for v in lps[:3, 3] - c + lps[:3, :3] @ c])
        keep = {k: getattr(self, k) for k in ("metric_start", "metric", "iterations", "seconds", "stop", "moved")}
        return Registration.from_itk(t, **keep)

    def rotation_angle(self) -> float:
        """The angle of the rotation, in degrees, whatever its axis."""
        r = self.matrix()[:3, :3]
        return math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))

    def shift(self) -> float:
        """How far the transform moves its centre (the fixed volume's brain box centre), in mm."""
        return float(np.linalg.norm(self.translation_mm))

    def describe_metric(self) -> str:
        seconds = f"{self.iterations} iterations at the finest level, {self.seconds:.1f} s"
        if not self.moved:
            return (f"kept the headers' placement: the fit's Mattes mutual information {self.metric:.4f} is not "
                    f"better than the start's {self.metric_start:.4f} ({seconds})")
        return f"Mattes mutual information {self.metric_start:.4f} -> {self.metric:.4f} (lower is better), {seconds}"

    def describe_transform(self) -> str:
        r, t = self.rotation_deg, self.translation_mm
        return (f"rotation {r[0]:+.2f} {r[1]:+.2f} {r[2]:+.2f} deg about R/A/S, "
                f"translation {t[0]:+.2f} {t[1]:+.2f} {t[2]:+.2f} mm (R/A/S)")

    def write_tfm(self, path: str | Path) -> Path:
        """Write the transform in ITK's text format (.tfm), atomically; ITK-SNAP and Slicer read it."""
        sitk = import_extra("SimpleITK", "writing transforms")
        path = Path(path)
        if path.suffix.lower() != ".tfm":
            raise UserError(f"{path}: an ITK transform file needs the .tfm suffix")
        # ITK picks the format from the file name, so write under a real name first, then move it in.
        with tempfile.TemporaryDirectory() as d, atomic_path(path) as tmp:
            staged = Path(d) / "transform.tfm"
            sitk.WriteTransform(self.itk_transform(), str(staged))
            shutil.copyfile(staged, tmp)
        return path


def register_rigid(fixed, moving, config: RegisterConfig = RegisterConfig(), label: str = "moving",
                   fixed_label: str = "the reference volume") -> Registration:
    """Rigidly register `moving` to `fixed` (both nibabel images) by Mattes mutual information.

    The start is the headers' placement (identity in world space), turning around the centre of the
    fixed volume's brain box: scans from one subject are placed roughly right by their headers, while
    aligning the volumes' centres would move a small field of view onto the wrong place. The metric
    of the start and of the fit are measured on the same samples; a fit that is not better keeps the
    start (`Registration.moved` False). A fit beyond the config's bounds on rotation or shift is
    refused (UserError). The same inputs give the same transform on every run and thread count.
    """
    sitk = import_extra("SimpleITK", "registration")
    t0 = time.perf_counter()
    working_mm = max(config.working_mm, config.follow_moving * float(voxel_sizes(moving.affine).max()))
    with _one_thread(sitk):
        moving_itk = _working_copy(to_itk(moving, label), working_mm, label, config)
        why = (f", the working voxel that {label}'s {voxel_sizes(moving.affine).max():.1f} mm voxels call for"
               if working_mm > config.working_mm else "")
        fixed_itk = _working_copy(to_itk(fixed, fixed_label), working_mm, fixed_label, config, why)
        box = world_extent_of_box(fixed, brain_box(fixed))
        transform = sitk.Euler3DTransform()
        transform.SetCenter([float(v) for v in _FLIP @ box.mean(axis=1)])
        identity = sitk.Euler3DTransform(transform)

        reg = _method(sitk, config)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=config.step_mm, minStep=config.min_step_mm,
                                                     numberOfIterations=config.iterations,
                                                     gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(config.shrink))
        reg.SetSmoothingSigmasPerLevel(list(config.smooth))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(transform, inPlace=True)
        try:
            reg.Execute(fixed_itk, moving_itk)
            start = _metric(sitk, config, fixed_itk, moving_itk, identity)
            end = _metric(sitk, config, fixed_itk, moving_itk, transform)
        except RuntimeError as e:  # ITK's message for e.g. too few samples in the overlap
            reason = str(e).strip().splitlines()[-1]
            raise UserError(f"registering {label} failed: {reason}") from None
    moved = end < start
    found = Registration.from_itk(transform if moved else identity, metric_start=start, metric=end,
                                  iterations=int(reg.GetOptimizerIteration()), seconds=time.perf_counter() - t0,
                                  stop=reg.GetOptimizerStopConditionDescription(), moved=moved)
    check_plausible(found, config, label, fixed_label)
    return found


def check_plausible(reg: Registration, config: RegisterConfig, label: str, fixed_label: str) -> None:
    """Refuse a registration that turns or shifts more than the config allows, in one line naming both."""
    angle, shift = reg.rotation_angle(), reg.shift()
    if angle > config.max_rotation_deg or shift > config.max_shift_mm:
        what = (f"a rotation of {angle:.1f} deg (the bound is {config.max_rotation_deg:g})"
                if angle > config.max_rotation_deg else
                f"a shift of {shift:.1f} mm (the bound is {config.max_shift_mm:g})")
        raise UserError(f"registering {label} to {fixed_label} gave {what}, too far for scans of one subject; "
                        f"check the headers, or raise --max-rotation / --max-shift if the motion is real")


def register_volumes(images: Mapping[str, object], reference: str, anatomy: str = "t1",
                     config: RegisterConfig = RegisterConfig(), labels: Mapping[str, str] | None = None
                     ) -> tuple[dict[str, Registration], list[str]]:
    """Register every volume but `reference` to it: (key -> Registration from the reference, log lines).

    Every other volume is fitted to the anatomy (`anatomy`, the T1: the sharpest, whose brain box the
    overlap check measures), whatever the reference grid; when the reference is another volume, the
    transforms onto its grid are derived from those fits (the inverse of the reference's fit, chained
    with each other volume's), so the fits do not change with --grid. A functional volume, blurred and
    without a skull outline, makes a poor fixed volume: fitting the T1 to a SPECT directly lands
    farther off than the fit the other way round.
    """
    labels = {k: (labels or {}).get(k, k) for k in images}
    fits, lines = {}, []
    for key in images:
        if key == anatomy:
            continue
        fits[key] = register_rigid(images[anatomy], images[key], config, labels[key], labels[anatomy])
        lines.append(f"registered {labels[key]} to {labels[anatomy]}: {fits[key].describe_metric()}")
        lines.append(f"{labels[key]} -> {labels[anatomy]}: {fits[key].describe_transform()}")
    if reference == anatomy:
        return fits, lines
    # A reference point p: the anatomy's point is inv(fit[reference]) p, and another volume's is fit[key] of that.
    back = np.linalg.inv(fits[reference].matrix())
    out = {anatomy: fits[reference].with_matrix(back)}
    for key, fit in fits.items():
        if key != reference:
            out[key] = fit.with_matrix(fit.matrix() @ back)
    for key, reg in out.items():
        lines.append(f"{labels[key]} -> {labels[reference]} (through {labels[anatomy]}): {reg.describe_transform()}")
    return out, lines


@contextlib.contextmanager
def _one_thread(sitk):
    """SimpleITK on one thread for the block: a threaded metric sums its parts in an order that varies."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _method(sitk, config: RegisterConfig):
    """An ImageRegistrationMethod with the config's metric and sampling, on one thread."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(config.sampling, config.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _metric(sitk, config: RegisterConfig, fixed, moving, transform) -> float:
    """The metric of `transform` at full working resolution, on the config's samples (the same for every
    transform, so two values compare)."""
    reg = _method(sitk, config)
    reg.SetInitialTransform(sitk.Euler3DTransform(transform), inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def save_transforms(folder: str | Path, registrations: Mapping[str, Registration], reference: str) -> list[Path]:
    """Write each registration as FOLDER/KEY_to_REFERENCE.tfm (the folder is made if needed)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file; the transforms go into a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the folder ({e.strerror or e})") from None
    return [reg.write_tfm(folder / f"{key}_to_{reference}.tfm") for key, reg in registrations.items()]


@contextlib.contextmanager
def quiet_readers(sitk=None):
    """Readers' warnings kept off the terminal: Python warnings (pydicom), nibabel's log lines ("setting
    0 dims to 1"), and with `sitk`, ITK's warnings and whatever its C libraries print on the process's
    stderr. What matters is checked and said in one line by the caller."""
    from nibabel.imageglobals import logger as nibabel_log

    was = nibabel_log.disabled
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        nibabel_log.disabled = True
        stack.callback(setattr, nibabel_log, "disabled", was)
        if sitk is not None:
            shown = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
            stack.callback(sitk.ProcessObject.SetGlobalWarningDisplay, shown)
            stack.enter_context(_stderr_dropped())
        yield


@contextlib.contextmanager
def _stderr_dropped():
    """File descriptor 2 pointed at a scratch file for the block (C libraries write there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to drop
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _working_copy(image, working_mm: float, label: str, config: RegisterConfig, why: str = ""):
    """Block-average an ITK image to voxels of at least `working_mm` along each axis (never finer), after
    refusing one that cannot guide a fit: constant, or too small for the coarsest pyramid level."""
    sitk = import_extra("SimpleITK", "registration")
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise UserError(f"{label}: every voxel is {lo:g}, so there is nothing to register it by; check the volume")
    factors = [max(1, int(working_mm / s + 1e-6)) for s in image.GetSpacing()]
    need = 2 * max(config.shrink)
    if min(n // f for n, f in zip(image.GetSize(), factors)) < need:
        raise UserError(f"{label}: {'x'.join(map(str, image.GetSize()))} voxels are too few to register (at "
                        f"{working_mm:.1f} mm a voxel{why}, each axis needs at least {need})")
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _fmt_mm(v) -> str:
    return "x".join(f"{float(s):.2f}" for s in v)


__all__ = ["SCANS_EXTRA", "MIN_OVERLAP", "import_extra", "to_itk", "from_itk", "itk_affine", "voxel_sizes",
           "volume_data", "same_grid", "describe_grid", "world_extent", "describe_extent", "brain_box", "coverage",
           "check_overlap", "world_extent_of_box", "resample_onto", "onto_grid", "RegisterConfig", "Registration", "register_rigid", "register_volumes", "check_plausible",
           "quiet_readers",
           "save_transforms"]
