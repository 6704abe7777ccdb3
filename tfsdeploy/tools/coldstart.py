"""One fuse in a fresh process, for timing what a one-shot `tfsdeploy fuse` costs a user:

    python -m tfsdeploy.tools.coldstart T1 T2 FUNC OUT [--scale 4] [--model M] [--engine auto] [--threads 0]
                                        [--batch 1]

It makes the same library calls as `tfsdeploy fuse` (FusionPipeline.load, then fuse_files) and
prints one JSON line: what ran, the seconds from after the imports to the PNG written, and the
process's peak RSS. With `--batch B`, the triplet is fused as B copies in one batch (the PNG holds the
first): what a scan fused in batches of B holds at its peak.
"""

from __future__ import annotations

import argparse
import json
import time

from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.imaging import write_png
from tfsdeploy.inputs import make_condition, read_triplet
from tfsdeploy.pipeline import FusionPipeline
from tfsdeploy.tools.hardware import rss_mib


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("t1", "t2", "func", "out"):
        ap.add_argument(name)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    pipe = FusionPipeline.load(a.model, a.scale, SampleConfig(), EngineConfig(engine=a.engine, threads=a.threads))
    if a.batch == 1:
        pipe.fuse_files(a.t1, a.t2, a.func, a.out)
    else:
        cond01, (top, bottom, left, right) = make_condition(read_triplet(a.t1, a.t2, a.func), a.scale,
                                                            pipe.check_size(0), pipe.backproject,
                                                            pipe.backproject_gate)
        write_png(a.out, pipe(cond01.repeat(a.batch, 1, 1, 1))[0, :, top:bottom, left:right].float().cpu())
    print(json.dumps({"describe": pipe.describe(), "seconds": time.perf_counter() - t0,
                      "peak_rss_mib": rss_mib()[1]}))


if __name__ == "__main__":
    main()
