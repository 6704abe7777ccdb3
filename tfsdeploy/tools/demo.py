"""`tfsdeploy demo`: a held-out slice, fused as a user would fuse it, beside the baseline and the reference."""

from __future__ import annotations

import time
from pathlib import Path

from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_condition
from tfsdeploy.imaging import check_writable, write_png
from tfsdeploy.inputs import Triplet, fuse_baseline, make_condition, read_triplet, write_triplet
from tfsdeploy.metrics import score_image
from tfsdeploy.pipeline import FusionPipeline
from tfsdeploy.tools.evaluate import write_comparison

# What run_demo writes into its folder.
DEMO_FILES = ("t1.png", "t2.png", "func.png", "fused.png", "baseline.png", "reference.png", "side_by_side.png")


def run_demo(pipeline: FusionPipeline, hr: Triplet, out: Path, size: int = 256) -> dict:
    """Write `hr` (a high-resolution triplet) as the three low-resolution inputs a user would have,
    read them back exactly as `fuse` reads them, fuse them, and write fused.png, baseline.png,
    reference.png (the classical fusion of `hr`) and side_by_side.png into `out`. Returns the PSNR /
    SSIM of the model and the baseline against the reference, and the seconds the fuse took."""
    scale = pipeline.scale
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create ({e.strerror})") from None
    check_writable(out / "fused.png")
    trip = read_triplet(*write_triplet(hr, out, size // scale))
    reference = fuse_condition(hr.stacked()[None])[0]
    baseline = fuse_baseline(trip, scale, size, "classical")
    t0 = time.perf_counter()
    fused = pipeline.fuse_triplet(trip, size)
    took = time.perf_counter() - t0
    write_png(out / "reference.png", reference)
    write_png(out / "baseline.png", baseline)
    write_png(out / "fused.png", fused)
    cond01 = make_condition(trip, scale, size)[0][0]  # the inputs, bicubic-upsampled for the picture
    write_comparison(out / "side_by_side.png",
                     {scale: {"T1 (LR)": cond01[0:1], "T2 (LR)": cond01[1:2], "functional (LR)": cond01[2:5],
                              "bicubic+classical": baseline, "TFS-Diff": fused, "ground truth": reference}},
                     ["bicubic+classical", "TFS-Diff"])
    scores = {label: score_image(img, reference)
              for label, img in (("bicubic + classical", baseline), ("TFS-Diff", fused))}
    return {"scores": scores, "seconds": took, "input_side": size // scale}
