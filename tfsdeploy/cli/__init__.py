"""The `tfsdeploy` command line: one module per command, each parsing its options into the library's
configs, calling the library, and printing what it did. What they share (one-line errors, option
parsers, progress bars, engine options) lives in `common`."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys

import typer

from tfsdeploy.cli import bench, bundle, cohort, data, demo, evaluate, export, fuse, info, train
from tfsdeploy.cli.common import OneLineErrors, user_errors

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, compile and run TFS-Diff: tri-modal medical image fusion with super-resolution.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect datasets.")
app.add_typer(data_app, name="data")
# Every command runs under `user_errors`: whatever a user can cause ends as one `error:` line.
data_app.command("build")(user_errors(data.build))
for command in (train.train, fuse.fuse, cohort.cohort, bundle.bundle, demo.demo, evaluate.evaluate, export.export,
                bench.bench, info.info):
    app.command()(user_errors(command))


def main() -> None:
    # A one-shot command spends about a second of its life in the cyclic garbage collector: while
    # torch's thousands of modules are imported, and again at exit. Reference counting frees the
    # tensors of a fuse by itself, so the collector is off until a long-running command turns it
    # back on (`common.long_running`), and what is alive at exit is frozen instead of traversed.
    gc.disable()
    atexit.register(_exit_if_interrupted)  # registered first, so it runs after every other exit handler
    try:
        app()
    except KeyboardInterrupt:  # after the command's own handling (its output, if any, is complete)
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    finally:
        # From here on a Ctrl-C (while the interpreter's exit handlers run) is noted, not raised into
        # whichever handler happens to run, and the process ends with 130 once they are done; a
        # second one ends it at once.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _note_interrupt)
        gc.freeze()


_interrupted_at_exit: list[int] = []


def _note_interrupt(signum, frame) -> None:
    _interrupted_at_exit.append(signum)
    if len(_interrupted_at_exit) > 1:
        _exit_if_interrupted()


def _exit_if_interrupted() -> None:
    if _interrupted_at_exit:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.write(2, b"error: interrupted\n")
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
