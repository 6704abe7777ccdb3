"""What a user sees when things go wrong: the one exception type a user can cause (the CLI prints its
message on one line and exits non-zero), and a guard that keeps libraries' developer chatter off the
terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator


class UserError(Exception):
    """Bad input, a bad file or a bad option: something the user can fix."""


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Silence the named loggers below ERROR, every warning, and stdout, for the duration: torch.export,
    torch.onnx and Inductor print progress lines and warnings meant for their developers."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
