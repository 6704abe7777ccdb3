"""User folders as a data source, in the one on-disk layout that every dataset shares:

    ROOT/{train,val,test}/{t1,t2,func,gt}/NAME.png      (a built dataset)
    ROOT/{t1,t2,func}[/gt]/NAME.png                      (a user's folder: one split)

Files are matched across modalities by name, never by order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import IMAGE_SUFFIXES, pad_to_square, read_image, resize
from tfsdeploy.inputs import as_triplet

SPLITS = ("train", "val", "test")
MODALITY_DIRS = ("t1", "t2", "func")


@dataclass
class Sample:
    name: str
    hr: torch.Tensor  # [8,H,W] uint8: t1, t2, func RGB, gt RGB
    gt_made: bool  # the ground truth was made here by the classical fusion


def _index(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in files:
                raise UserError(f"{folder}: two files are named {p.stem} ({files[p.stem].name}, {p.name})")
            files[p.stem] = p
    return files


class FolderSource:
    """A folder ROOT/{t1,t2,func}[/gt]/NAME.* matched by NAME. Missing gt is made classically."""

    def __init__(self, root: str | Path, size: int = 256):
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such dataset folder")
        missing = [d for d in MODALITY_DIRS if not (self.root / d).is_dir()]
        if missing:
            raise UserError(f"{self.root}: missing modality folder(s) {', '.join(missing)} "
                            f"(expected {'/'.join(MODALITY_DIRS)}[/gt]/NAME.png)")
        idx = {d: _index(self.root / d) for d in MODALITY_DIRS}
        self.gt_index = _index(self.root / "gt") if (self.root / "gt").is_dir() else {}
        names = set(idx["t1"])
        for d in MODALITY_DIRS[1:]:
            names &= set(idx[d])
        unmatched = sorted(set().union(*idx.values()) - names)
        if unmatched:
            raise UserError(f"{self.root}: {len(unmatched)} name(s) are not present in all of "
                            f"{', '.join(MODALITY_DIRS)} (e.g. {unmatched[0]})")
        if not names:
            raise UserError(f"{self.root}: no images found")
        self.names = sorted(names)
        self.index = idx
        self.gt_made = not all(n in self.gt_index for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def load(self) -> list[Sample]:
        out = []
        for n in self.names:
            trip = as_triplet(*(read_image(self.index[d][n]) for d in MODALITY_DIRS),
                              names=[str(self.index[d][n]) for d in MODALITY_DIRS])
            src = standardise(trip.stacked(), self.size)
            if n in self.gt_index:
                gt = read_image(self.gt_index[n])
                gt = gt.expand(3, -1, -1) if gt.shape[0] == 1 else gt
                if gt.shape[-2:] != trip.t1.shape[-2:]:
                    raise UserError(f"{self.gt_index[n]}: size differs from its sources")
                gt = standardise(gt, self.size)
                made = False
            else:
                gt = fuse_condition(src[None])[0]
                made = True
            hr = torch.cat([src, gt]).mul(255).round().to(torch.uint8)
            out.append(Sample(n, hr, made))
        return out


def standardise(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C,H,W] -> [C,size,size]: zero-pad to a centred square, bicubic to `size`."""
    sq, _ = pad_to_square(img)
    return resize(sq[None], (size, size))[0]


def open_split(root: str | Path, split: str, size: int = 256) -> FolderSource:
    """ROOT/split if the dataset is split, otherwise ROOT itself (a user's folder is one split)."""
    root = Path(root)
    if (root / split).is_dir():
        return FolderSource(root / split, size)
    if any((root / d).is_dir() for d in MODALITY_DIRS):
        return FolderSource(root, size)  # says which modality folder is missing, if any
    raise UserError(f"{root}: neither a split dataset (with {split}/) nor a {'/'.join(MODALITY_DIRS)} folder")


