"""Where the project keeps things on disk, and how reports show paths."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TFSDEPLOY_CACHE, else ~/.cache/tfsdeploy: the built dataset and the default model's exports."""
    base = os.environ.get("TFSDEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tfsdeploy")
    return Path(base)


def display_path(path: str | Path) -> str:
    """A path as reports show it: relative to the working directory when inside it, else with the
    home directory as ~ (reports are shared; machine-specific prefixes say nothing)."""
    p = Path(path).resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        try:
            return prefix + str(p.relative_to(base))
        except ValueError:
            continue
    return str(p)
