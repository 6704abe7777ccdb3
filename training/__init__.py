"""Training for TFS-Diff: data sources, batches and the (DDP-ready) training loop."""
