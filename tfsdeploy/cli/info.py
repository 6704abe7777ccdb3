"""`tfsdeploy info`."""

from __future__ import annotations

import typer

from tfsdeploy.errors import UserError


def info() -> None:
    """Engines, providers, GPUs, versions and threads."""
    import platform

    import torch

    from engines.trt_engine import tensorrt_status
    from tfsdeploy import __version__
    from tfsdeploy.data import default_data_dir

    typer.echo(f"tfsdeploy {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    typer.echo(f"cpu threads (torch): {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            typer.echo(f"gpu {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        typer.echo("gpu: none (torch.cuda.is_available() is False)")
    typer.echo("engines:")
    typer.echo(f"  torch: yes ({'cuda' if torch.cuda.is_available() else 'cpu'})")
    try:
        import onnxruntime as ort

        typer.echo(f"  onnx: onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}")
    except ImportError:
        typer.echo("  onnx: no (pip install 'tfsdeploy[onnx]')")
    trt, reason = tensorrt_status()
    typer.echo(f"  trt: tensorrt {trt.__version__}" if trt is not None else f"  trt: no ({reason})")
    from engines.aoti_engine import device_identity, identity_text

    here = device_identity("cuda" if torch.cuda.is_available() else "cpu")
    typer.echo(f"  aoti: torch {torch.__version__}, packages built here run on {identity_text(here)}")
    d = default_data_dir()
    typer.echo(f"dataset: {d} ({'built' if (d / 'summary.json').is_file() else 'not built yet'})")
    from tfsdeploy.modelref import default_model, resolve_model

    try:
        m = default_model()
    except UserError as e:
        typer.echo(f"default model: none ({e})")
    else:
        try:
            typer.echo(f"default model: {m} ({resolve_model(m).describe()})")
        except UserError as e:  # e.g. $TFSDEPLOY_MODEL names something that is not a model
            typer.echo(f"default model: {m} (NOT USABLE: {e})")
