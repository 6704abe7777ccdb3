"""`tfsdeploy data build`: write the training dataset from its sources, in the one on-disk layout
ROOT/{train,val,test}/{t1,t2,func,gt}/NAME.png, atomically.

Sources (each split by contiguous z-blocks, so no split holds a neighbour of another's slice):
- `spm`: the registered SPM templates (tfsdeploy.data.spm);
- `synth`: patient-like slices synthesised from the SPM label and tissue maps (tfsdeploy.data.synth).
The ground truth of every triplet is the classical tri-modal fusion of its high-resolution sources.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from tfsdeploy.config import COMBOS, DATA_SOURCES as SOURCES, DEFAULT_DATA_SOURCES as DEFAULT_SOURCES
from tfsdeploy.data.folder import MODALITY_DIRS, SPLITS
from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_dir, check_folder_target, check_output
from tfsdeploy.fusion import fuse_trimodal
from tfsdeploy.imaging import write_png
from tfsdeploy.paths import cache_dir

# What a dataset folder holds: `--force` replaces one that holds nothing else.
_FOLDERS = [f"{s}/{d}" for s in SPLITS for d in (*MODALITY_DIRS, "gt")]
DATASET_FILES = ("summary.json", *(f"{s}/" for s in SPLITS), *(f"{f}/" for f in _FOLDERS),
                 *(f"{f}/*.png" for f in _FOLDERS))


def _plan(source: str, combos: list[str], size: int, seed: int):
    if source == "spm":
        from tfsdeploy.data.spm import spm_plan

        return spm_plan(combos, size)
    from tfsdeploy.data.synth import synth_plan

    return synth_plan(combos, size, seed)


def check_sources(sources: Iterable[str]) -> list[str]:
    sources = list(dict.fromkeys(s.strip() for s in sources if s.strip()))
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise UserError(f"unknown source(s) {bad}; choose from {', '.join(SOURCES)}" if bad
                        else f"give at least one source ({', '.join(SOURCES)})")
    return sources


def build_dataset(out: str | Path, size: int = 256, combos: Iterable[str] = COMBOS,
                  sources: Iterable[str] = DEFAULT_SOURCES, seed: int = 0, force: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the dataset to `out` and return its summary (also written as summary.json).

    The whole dataset is written under a temporary name and renamed at the end, so an interrupted
    build never leaves a half dataset that looks complete. An existing dataset is kept unless
    `force`."""
    out = Path(out)
    check_folder_target(out)
    combos = list(combos)
    twice = sorted({c for c in combos if combos.count(c) > 1})
    if twice:
        raise UserError(f"--combos names {', '.join(twice)} more than once; give each combination once")
    bad = [c for c in combos if c not in COMBOS]
    if bad:
        raise UserError(f"unknown combination(s) {bad}; choose from {', '.join(COMBOS)}")
    sources = check_sources(sources)
    if (out / "summary.json").is_file() and not force:
        return json.loads((out / "summary.json").read_text())
    check_output(out, owns=DATASET_FILES, what="part of a dataset")
    if out.exists() and any(out.iterdir()) and not (out / "summary.json").is_file() and not force:
        raise UserError(f"{out} exists and is not a dataset built by tfsdeploy; pick another --out or use --force")

    plans = {s: _plan(s, combos, size, seed) for s in sources}
    total = sum(sum(info["count"].values()) for _, info in plans.values())
    with atomic_dir(out) as tmp:
        counts: dict[str, int] = {}
        done = 0
        for source, (splits, _) in plans.items():
            for split, triplets in splits.items():
                for d in (*MODALITY_DIRS, "gt"):
                    (tmp / split / d).mkdir(parents=True, exist_ok=True)
                for name, (t1, mr2, func), clean in triplets:
                    gt = fuse_trimodal(*(x[None] for x in clean))[0]
                    for d, img in zip((*MODALITY_DIRS, "gt"), (t1, mr2, func, gt)):
                        write_png(tmp / split / d / f"{name}.png", img)
                    counts[split] = counts.get(split, 0) + 1
                    done += 1
                    if progress:
                        progress(done, total)
        summary = {
            "sources": {s: info for s, (_, info) in plans.items()},
            "size": size, "combos": combos, "counts": counts,
            "ground_truth": "classical tri-modal fusion of the high-resolution sources (tfsdeploy.fusion)",
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def default_data_dir() -> Path:
    return cache_dir() / "dataset"


def ensure_dataset(root: str | Path | None = None, log: Callable[[str], None] = print,
                   timeout_s: float = 600.0) -> Path:
    """The dataset to read: `root` as given, or the default dataset, built on first use. Under
    torchrun only rank 0 builds it; the other ranks wait for its summary."""
    if root is not None:
        return Path(root)
    root = default_data_dir()
    summary = root / "summary.json"
    if not summary.is_file() and int(os.environ.get("RANK", "0")) == 0:
        log(f"building the dataset in {root} (first use)")
        build_dataset(root)
    t0 = time.time()
    while not summary.is_file():
        if time.time() - t0 > timeout_s:
            raise UserError(f"timed out waiting for {summary}")
        time.sleep(0.5)
    return root
