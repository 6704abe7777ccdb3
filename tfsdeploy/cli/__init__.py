"""The `tfsdeploy` command line: one module per command, each parsing its options into the library's
configs, calling the library, and printing what it did. What they share (one-line errors, option
parsers, progress bars, engine options) lives in `common`."""

from __future__ import annotations

import gc
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
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
