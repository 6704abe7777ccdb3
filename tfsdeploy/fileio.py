"""Atomic writes: a reader never sees a half-written file or folder.

Outputs, checkpoints, bundles, exported graphs and engines all go through these helpers: the
content is written under a temporary name beside its destination and renamed into place only
when complete. Temporary names are `.NAME.PID.XXXXXXXX.tmp`; one left behind by a process that was
killed outright (kill -9, power loss) is removed by the next write of the same NAME.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import re
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
    the atomic writer around it names the destination rather than a temporary name. The file gets
    the permissions of any other output (save_file makes it 0600)."""
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
    os.chmod(path, 0o666 & ~current_umask())


def check_outputs_spare_inputs(outputs: list[str | Path], inputs: list[str | Path], option: str = "--out") -> None:
    """Refuse, before any work, an output that is an input, lies inside an input folder, or is a
    folder holding an input (replacing it would delete the input); links are followed."""
    ins = [(Path(p), Path(p).resolve()) for p in inputs]
    for out in map(Path, outputs):
        real = out.resolve()
        for given, src in ins:
            same = real == src or (out.exists() and given.exists() and os.path.samefile(out, given))
            if same or real.is_relative_to(src):
                raise UserError(f"{out}: is the input {given}{'' if same else ' or lies inside it'}; "
                                f"writing there would destroy it, choose another {option}")
            if src.is_relative_to(real):
                raise UserError(f"{out}: holds the input {given}; replacing it would destroy the input, "
                                f"choose another {option}")


# --------------------------------------------------------------------------- the rule of every output

# `owns` of a folder written into that keeps whatever else it holds (a run folder being resumed).
ANYTHING = ("**",)


def check_output(path: str | Path, inputs: list[str | Path | None] = (), owns: tuple[str, ...] | None = None,
                 what: str = "", option: str = "--out") -> None:
    """The rule every command that writes follows, checked before any work.

    * An output that is an input, lies inside an input folder or holds an input (links followed) is
      refused: writing it would destroy the input.
    * A folder output (`owns` given) must not be a file, and an existing one is replaced, or
      written into, only when everything in it is what the command writes: each path in it,
      relative to it, matches one of the `owns` patterns (`owned`). Anything else is named in one
      line and left untouched. `what` names the command's files in that line. The folder (or,
      until it exists, the nearest folder above it) must take a new file (`probe_writable`).
    * A file output (`owns` None) that exists is replaced: naming it asks for that (its own checks,
      such as `imaging.check_writable`, probe its folder).
    """
    path = Path(path)
    check_outputs_spare_inputs([path], [p for p in inputs if p is not None], option)
    if owns is None:
        return
    check_folder_target(path)
    if path.is_dir() and owns != ANYTHING:
        stranger = foreign_entry(path, owns)
        if stranger is not None:
            raise UserError(f"{path}: exists and holds {stranger}, which is not {what}; an existing {option} is "
                            f"replaced only when it holds nothing else, so give a new one")
    where = first_existing(path)
    if where is not None:
        probe_writable(where, path)


def probe_writable(folder: Path, path: str | Path) -> None:
    """Fail before any long work if no file can be created in `folder`, where `path` is to be
    written (permission bits do not tell everything: root, read-only mounts; so try it)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(path, e) from None


def foreign_entry(folder: Path, owns: tuple[str, ...], within: tuple[str, ...] = ()) -> str | None:
    """The first path in `folder` (relative, in name order; None if none) that `owns` does not match."""
    for p in sorted(folder.iterdir()):
        parts, is_dir = (*within, p.name), p.is_dir() and not p.is_symlink()
        if not owned(parts, is_dir, owns):
            return "/".join(parts) + ("/" if is_dir else "")
        inner = foreign_entry(p, owns, parts) if is_dir else None
        if inner is not None:
            return inner
    return None


def owned(parts: tuple[str, ...], is_dir: bool, owns: tuple[str, ...]) -> bool:
    """Whether a path (its parts, relative to an output folder) is one a command writes there.

    A pattern is a relative path whose parts are shell patterns, matched case-insensitively:
    `report.md`, `table1_x*.csv` (files), `train/` (a folder, whose content the other patterns
    must match), `ckpt-*/**` (a folder and everything in it; `ANYTHING`: the whole folder). A hidden
    temporary (`.NAME.PID.XXXXXXXX.tmp`, left by a writer that was killed) counts as its NAME."""
    parts = tuple(_untemp(p) for p in parts)
    for pattern in owns:
        pat = pattern.rstrip("/").split("/")
        whole = pat[-1] == "**"
        if whole:
            pat = pat[:-1]
            if len(parts) < len(pat):
                continue
        elif len(parts) != len(pat) or is_dir != pattern.endswith("/"):
            continue
        if all(fnmatch.fnmatch(a.lower(), b.lower()) for a, b in zip(parts, pat)):
            return True
    return False


def _untemp(name: str) -> str:
    temp = re.fullmatch(r"\.(.+)\.\d+\.[^.]+\.tmp", name)
    return temp.group(1) if temp else name
