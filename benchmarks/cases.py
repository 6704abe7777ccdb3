"""The proxy test cases the benchmark studies share: slices with their ground truth, the degradations
that make their low-resolution inputs, and how a fused image is scored against the ground truth.

Sets (names as benchmarks/transfer_study.py takes them; `load_cases` makes each):

  spm-test   the default dataset's SPM test split, bicubic down (as in training);
  spm-val    its SPM validation split, bicubic down;
  spm-blur   the SPM test slices degraded otherwise (`degrade_blur`);
  icbm       axial slices synthesised from the 1 mm ICBM 2009a T1 and grey / white matter maps that
             ship inside the nilearn wheel (read from the wheel; nilearn itself is not needed): T1 as
             is, a T2-like image from the tissue maps (CSF bright, grey > white), and a SPECT- or
             PET-like image from blurred grey matter with smooth regional variation, alternately,
             colour-mapped. Finer anatomy than the 2 mm SPM templates. Ground truth: the classical
             fusion of the 8-bit 256 px sources; inputs: bicubic down by the scale;
  icbm-blur  the same ICBM slices degraded as spm-blur is;
  icbm-cor   coronal ICBM slices (top of the head up), bicubic down;
  synth      the test split of `data build`'s synthetic source, bicubic down.

    pip download nilearn --no-deps -d /tmp/nl            # once: the ICBM volumes
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tfsdeploy.data.spm import brain_slices, slice_to_image
from tfsdeploy.fileio import atomic_dir
from tfsdeploy.data.synth import gaussian_blur
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import normalise_volume, quantise_uint8, resize, write_png
from tfsdeploy.inputs import Triplet, as_triplet, fuse_baseline
from tfsdeploy.metrics import score_image

ROOT = Path(__file__).resolve().parents[1]  # the project: studies run the CLI from here
SIZE = 256
SETS = ("spm-test", "spm-val", "spm-blur", "icbm", "icbm-blur", "icbm-cor", "synth")
ICBM_SETS = ("icbm", "icbm-blur", "icbm-cor")
WHEEL_GLOB = "/tmp/nl/nilearn-*.whl"
ICBM = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass
class Case:
    """One slice: the triplet a user would hand to `fuse` and the ground truth. The triplet is low
    resolution, or (fine-tuning's test slices) the 256 px sources, which the input rule brings down
    by the scale as training does."""

    name: str
    lr: Triplet
    gt01: torch.Tensor  # [3,SIZE,SIZE]


# --------------------------------------------------------------------------- degradations


def as_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] as an 8-bit file holds them, back in [0, 1] (float)."""
    return quantise_uint8(x).float() / 255


def degrade_blur(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    """[B,C,H,W] in [0, 1] -> low resolution, degraded unlike training: Gaussian blur (sigma 0.7 x
    scale px), area down, Gaussian noise (sigma 0.01, seeded), 8-bit."""
    lr = F.avg_pool2d(gaussian_blur(hr, 0.7 * scale), scale)
    gen = torch.Generator().manual_seed(int(seed))
    return as_8bit(lr + 0.01 * torch.randn(lr.shape, generator=gen))


# --------------------------------------------------------------------------- SPM and synthetic slices


def pick_samples(split: str, n: int, synthetic: bool = False, root: Path | None = None) -> list[tuple[int, object]]:
    """`n` samples spread evenly over a split of the dataset at `root` (None: the default dataset),
    SPM (or, with `synthetic`, synthetic) slices only, each with its place among them; [] for none."""
    from tfsdeploy.data import ensure_dataset, open_split

    samples = [s for s in open_split(ensure_dataset(root, log=lambda s: None), split, SIZE).load()
               if s.name.startswith("synth-") == synthetic]
    picks = np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(int)
    return [(int(i), samples[int(i)]) for i in picks]


def split_cases(scale: int, n: int, as_trained: bool = False, synthetic: bool = False,
                split: str = "test") -> list[Case]:
    """`n` slices spread over the default dataset's test split (or `split`), from the SPM templates
    (or, with `synthetic`, from the synthetic source), degraded unlike training (`degrade_blur`,
    seeded by the slice's place; or, with `as_trained`, bicubic down as training degrades)."""
    picked = pick_samples(split, n, synthetic)
    if not picked:
        sys.exit(f"the default dataset has no {'synthetic' if synthetic else 'SPM'} {split} slices: "
                 f"tfsdeploy data build --force")
    cases = []
    for i, s in picked:
        hr = s.hr.float()[None] / 255
        if as_trained:
            lr = resize(hr[:, :5], (SIZE // scale, SIZE // scale))[0]
        else:
            lr = degrade_blur(hr[:, :5], scale, i)[0]
        cases.append(Case(s.name if synthetic else f"spm-{s.name}", Triplet(lr[:1], lr[1:2], lr[2:5]), hr[0, 5:]))
    return cases


# --------------------------------------------------------------------------- ICBM slices


def find_wheel(given: str = "") -> Path | None:
    """The nilearn wheel: `given`, else the newest match of WHEEL_GLOB; None when there is none."""
    found = given or next(iter(sorted(glob.glob(WHEEL_GLOB))), None)
    return Path(found) if found else None


def require_wheel(wheel: Path | None) -> Path:
    if wheel is None or not wheel.is_file():
        sys.exit("icbm needs the nilearn wheel: pip download nilearn --no-deps -d /tmp/nl (or pass --wheel)")
    return wheel


def read_wheel_volumes(wheel: Path) -> dict[str, np.ndarray]:
    """ICBM 2009a T1, GM and WM from the nilearn wheel as float32 [z, y (anterior up), x] in [0, 1]."""
    import nibabel as nib

    out = {}
    with zipfile.ZipFile(wheel) as z:
        for key in ("t1", "gm", "wm"):
            img = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(z.read(ICBM.format(key)))))
            a = np.asarray(img.get_fdata(dtype=np.float32)) / 255.0
            out[key] = np.ascontiguousarray(np.transpose(a, (2, 1, 0))[:, ::-1, :])
    return out


def icbm_volumes(wheel: Path) -> dict[str, np.ndarray]:
    """T1, a T2-like image and SPECT- and PET-like images, each normalised like the SPM templates, and
    the grey matter map (which slices hold brain). Computed once per wheel and process."""
    if wheel in _ICBM:
        return _ICBM[wheel]
    from scipy import ndimage

    v = read_wheel_volumes(wheel)
    gm, wm = v["gm"], v["wm"]
    # the intracranial space: tissue, holes filled, grown by 2 mm to take in the outer CSF
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.5, iterations=3))
    inside = ndimage.gaussian_filter(ndimage.binary_dilation(inside, iterations=2).astype(np.float32), 1.0)
    csf = np.clip(inside - gm - wm, 0, 1)
    scalp = v["t1"] * (1 - inside)
    t2 = 1.0 * csf + 0.55 * gm + 0.3 * wm + 0.5 * scalp
    field = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(gm.shape).astype(np.float32), 12)
    field /= np.abs(field).max()
    uptake = gm * (1 + 0.4 * field) + 0.3 * wm
    _ICBM[wheel] = {"t1": normalise_volume(v["t1"]), "t2": normalise_volume(t2),
                    "spect": normalise_volume(ndimage.gaussian_filter(uptake, 5.0)),
                    "pet": normalise_volume(ndimage.gaussian_filter(uptake, 2.5)), "gm": gm}
    return _ICBM[wheel]


_ICBM: dict[Path, dict[str, np.ndarray]] = {}


def icbm_sources(vols: dict[str, np.ndarray], z: int, func: str, coronal: bool = False) -> torch.Tensor:
    """Slice `z` (axial, or coronal with the top of the head up) of the ICBM volumes as the 8-bit
    256 px sources a dataset would hold: [5,SIZE,SIZE] (T1, T2, `func` colour-mapped) in [0, 1]."""
    t1, t2, f = (slice_to_image(vols[k][::-1, z] if coronal else vols[k][z], SIZE) for k in ("t1", "t2", func))
    return as_8bit(as_triplet(t1, t2, f).stacked())


def icbm_cases(wheel: Path, scale: int, n: int, blur: bool = False, coronal: bool = False) -> list[Case]:
    """`n` axial slices spread over the brain (or, with `coronal`, coronal slices, top of the head up),
    alternately SPECT- and PET-like, bicubic down (or, with `blur`, degraded as `degrade_blur` does)."""
    vols = icbm_volumes(wheel)
    # brain_slices counts over the last two axes: for coronal slices, bring y to the front
    zs = brain_slices(vols["gm"].transpose(1, 0, 2) if coronal else vols["gm"])
    lo, hi = zs[0] + 0.2 * (zs[-1] - zs[0]), zs[0] + 0.85 * (zs[-1] - zs[0])
    cases = []
    for i, z in enumerate(np.linspace(lo, hi, n).round().astype(int)):
        func = "spect" if i % 2 == 0 else "pet"
        hr = icbm_sources(vols, z, func, coronal)
        gt = fuse_condition(hr[None])[0]
        lr = degrade_blur(hr[None], scale, i)[0] if blur else resize(hr[None], (SIZE // scale, SIZE // scale))[0]
        view = "cor" if coronal else "z"
        cases.append(Case(f"icbm-{func}_{view}{z:03d}", Triplet(lr[:1], lr[1:2], lr[2:]), gt))
    return cases


def load_cases(name: str, scale: int, n: int, wheel: Path | None = None) -> list[Case]:
    """Up to `n` cases of the set `name` (one of SETS) at `scale`; the ICBM sets need the wheel."""
    if name == "spm-test":
        return split_cases(scale, n, as_trained=True)
    if name == "spm-val":
        return split_cases(scale, n, as_trained=True, split="val")
    if name == "spm-blur":
        return split_cases(scale, n)
    if name in ICBM_SETS:
        return icbm_cases(require_wheel(wheel), scale, n, blur=name == "icbm-blur", coronal=name == "icbm-cor")
    if name == "synth":
        return split_cases(scale, n, as_trained=True, synthetic=True)
    raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")


# --------------------------------------------------------------------------- scoring


def score_baseline(case: Case, scale: int) -> dict[str, float]:
    """PSNR / SSIM of the "upsample, then fuse" baseline (bicubic up, classical fusion) against the
    ground truth."""
    return score_image(fuse_baseline(case.lr, scale, SIZE), case.gt01)


# --------------------------------------------------------------------------- running the CLI (studies)


def sh(cmd: list[str], log: Path) -> tuple[int, str, float]:
    """Run a CLI command (one thread), append its output to `log`; (rc, output, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{text}\n[rc {p.returncode}, {wall:.1f} s]\n\n")
    return p.returncode, text, wall


# --------------------------------------------------------------------------- split ICBM datasets (fine-tuning studies)


def plan_slices(gm: np.ndarray, test_n: int, gap: int, span: int) -> dict[str, list[int]]:
    """Test: `test_n` slices, every 2nd, centred on the brain's middle; train: every 2nd slice from
    `gap` below / above the test range outwards, `span` slices each way, inside the brain."""
    zs = brain_slices(gm)
    z0, z1 = zs[0], zs[-1]
    mid = (z0 + z1) // 2
    test = [mid - (test_n - 1) + 2 * i for i in range(test_n)]
    below = list(range(test[0] - gap, max(z0, test[0] - gap - span) - 1, -2))[::-1]
    above = list(range(test[-1] + gap, min(z1, test[-1] + gap + span) + 1, 2))
    return {"train": below + above, "test": test}


def build_icbm(out: Path, wheel: Path, test_n: int, gap: int, span: int, coronal: bool = False) -> dict:
    """The split ICBM dataset (axial slices, or with `coronal` coronal ones) at `out`, once."""
    summary_file = out / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    vols = icbm_volumes(wheel)
    splits = plan_slices(vols["gm"].swapaxes(0, 1) if coronal else vols["gm"], test_n, gap, span)
    summary = {"source": f"ICBM 2009a 1 mm T1/GM/WM from {wheel.name}, synthesised as in benchmarks/cases.py"
                         + (", coronal slices" if coronal else ""),
               "size": SIZE, "slices": splits, "counts": {s: len(v) for s, v in splits.items()},
               "min_gap_slices": min(abs(a - b) for a in splits["train"] for b in splits["test"]),
               "ground_truth": "classical fusion (tfsdeploy.fusion.fuse_condition) of the 8-bit HR sources"}
    with atomic_dir(out) as tmp:
        for split, zlist in splits.items():
            for d in ("t1", "t2", "func", "gt"):
                (tmp / split / d).mkdir(parents=True)
            for i, z in enumerate(zlist):
                func = "spect" if i % 2 == 0 else "pet"
                hr = icbm_sources(vols, z, func, coronal)  # the sources as 8-bit PNGs hold them
                gt = fuse_condition(hr[None])[0]
                name = f"icbm-{func}_{'cor' if coronal else 'z'}{z:03d}"
                for d, img in (("t1", hr[:1]), ("t2", hr[1:2]), ("func", hr[2:]), ("gt", gt)):
                    write_png(tmp / split / d / f"{name}.png", img)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
