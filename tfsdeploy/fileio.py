"""Atomic writes: a reader never sees a half-written file or folder.

Outputs, checkpoints, bundles, exported graphs and engines all go through these two helpers: the
content is written under a temporary name beside its destination and renamed into place only
when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tfsdeploy.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_path:
    """Context manager giving a temporary path beside `path`; renamed onto `path` only on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"{self.path}: directory {parent} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write here ({e.strerror})") from None
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.replace(self.tmp, self.path)
                return
            except OSError as e:
                self.tmp.unlink(missing_ok=True)
                raise UserError(f"{self.path}: cannot write here ({e.strerror})") from None
        self.tmp.unlink(missing_ok=True)


def first_existing(path: str | Path) -> Path | None:
    """`path` itself or its nearest ancestor that exists (None when not even the root does)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists()), None)


def check_folder_target(path: str | Path) -> None:
    """Refuse, before any work, a folder output whose path (or a parent of it) is a regular file."""
    path = Path(path)
    found = first_existing(path)
    if found is not None and not found.is_dir():
        raise UserError(f"{path}: {'it' if found == path else found} is a file; the output is a folder")


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path` (a previous version
    is removed first), on failure it is deleted. A reader never sees a half-written directory."""
    path = Path(path)
    check_folder_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise UserError(f"{path}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        mask = current_umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
