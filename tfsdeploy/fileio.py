"""Atomic writes: a reader never sees a half-written file or folder.

Outputs, checkpoints, bundles, exported graphs and engines all go through these helpers: the
content is written under a temporary name beside its destination and renamed into place only
when complete. Temporary names are `.NAME.PID.XXXXXXXX.tmp`; one left behind by a process that was
killed outright (kill -9, power loss) is removed by the next write of the same NAME.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tfsdeploy.errors import UserError

# Failures of the file system itself while writing: these blame the output's path, never the input's.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` left by processes that no longer run; returns them."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    for tmp in parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def write_error(path: str | Path, e: OSError) -> UserError:
    """The one line for the file system refusing to write `path`."""
    return UserError(f"{path}: cannot write here ({e.strerror or e})")


class atomic_path:
    """Context manager giving a temporary path beside `path`; renamed onto `path` only on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"{self.path}: directory {parent} does not exist")
        remove_stale_temporaries(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(self.path), suffix=".tmp", dir=parent)
        except OSError as e:
            raise write_error(self.path, e) from None
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
                raise write_error(self.path, e) from None
        self.tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(self.path, exc) from None


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
def atomic_outputs(*paths: str | Path):
    """Publish several outputs of one parent folder together or not at all.

    Yields one staging path per destination, inside a temporary folder beside them; the caller
    writes each (a file, or a folder it creates). On success every destination is replaced by its
    staged version (an existing one is moved aside first and removed only once all are in place;
    should a rename fail, the old ones are put back). On failure or interrupt nothing changes.
    A full disk or a refused write is one error naming the first destination.
    """
    dests = [Path(p) for p in paths]
    parent = dests[0].parent
    if any(d.parent != parent for d in dests):
        raise ValueError(f"outputs published together must share one folder: {dests}")
    for d in dests:
        remove_stale_temporaries(d)
    created = _missing_ancestors(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(dests[0]), suffix=".tmp", dir=parent))
    except OSError as e:
        _remove_empty(created)
        raise write_error(dests[0], e) from None
    try:
        try:
            yield [stage / d.name for d in dests]
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise write_error(dests[0], e) from None
            raise
        _swap_in(stage, dests)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, dests: list[Path]) -> None:
    """Rename each staged output onto its destination; all of them, or (after a failure) none."""
    old = stage / ".replaced"
    old.mkdir()
    moved: list[Path] = []  # destinations whose previous version sits in `old`
    placed: list[Path] = []
    try:
        for d in dests:
            if d.exists() or d.is_symlink():
                os.replace(d, old / d.name)
                moved.append(d)
            os.replace(stage / d.name, d)
            placed.append(d)
    except OSError as e:
        for d in placed:  # undo: the new ones out, the old ones back
            os.replace(d, stage / d.name)
        for d in moved:
            os.replace(old / d.name, d)
        raise write_error(dests[0], e) from None


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    out = []
    for p in (folder, *folder.parents):
        if p.exists() or p == p.parent:
            break
        out.append(p)
    return out


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:  # deepest first
        try:
            f.rmdir()
        except OSError:
            return


@contextmanager
def removed_if_left_empty(folder: str | Path):
    """Run the block; if it fails, remove `folder` (and the parents made for it) when the block
    created it and left it empty, so a failed command leaves no empty output folder behind."""
    created = _missing_ancestors(Path(folder))
    try:
        yield
    except BaseException:
        _remove_empty(created)
        raise


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path` (a previous version
    is removed), on failure it is deleted. A reader never sees a half-written directory."""
    path = Path(path)
    check_folder_target(path)
    with atomic_outputs(path) as (tmp,):
        tmp.mkdir()
        yield tmp


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as OSError with their errno, so
    the atomic writer around it names the destination rather than a temporary name."""
    import re

    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors reports I/O failures as its own error type
        if type(e).__name__ != "SafetensorError":
            raise
        code = re.search(r"(?:os error|code:) (\d+)", str(e))
        if code is None:
            raise UserError(f"{path}: cannot write ({e})") from None
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None


def check_outputs_spare_inputs(outputs: list[str | Path], inputs: list[str | Path]) -> None:
    """Refuse, before any work, an output that is an input, lies inside an input folder, or is a
    folder holding an input (replacing it would delete the input); links are followed."""
    ins = [(Path(p), Path(p).resolve()) for p in inputs]
    for out in map(Path, outputs):
        real = out.resolve()
        for given, src in ins:
            same = real == src or (out.exists() and given.exists() and os.path.samefile(out, given))
            if same or real.is_relative_to(src):
                raise UserError(f"{out}: is the input {given}{'' if same else ' or lies inside it'}; "
                                f"writing there would destroy it, choose another --out")
            if src.is_relative_to(real):
                raise UserError(f"{out}: holds the input {given}; replacing it would destroy the input, "
                                f"choose another --out")
