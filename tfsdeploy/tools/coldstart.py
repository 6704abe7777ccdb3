"""One fuse in a fresh process, for timing what a one-shot `tfsdeploy fuse` costs a user:

    python -m tfsdeploy.tools.coldstart T1 T2 FUNC OUT [--scale 4] [--model M] [--engine auto] [--threads 0]

It makes the same library calls as `tfsdeploy fuse` (FusionPipeline.load, then fuse_files) and
prints one JSON line: what ran, and the seconds from after the imports to the PNG written.
"""

from __future__ import annotations

import argparse
import json
import time

from tfsdeploy.config import EngineConfig, SampleConfig
from tfsdeploy.pipeline import FusionPipeline


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("t1", "t2", "func", "out"):
        ap.add_argument(name)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    pipe = FusionPipeline.load(a.model, a.scale, SampleConfig(), EngineConfig(engine=a.engine, threads=a.threads))
    pipe.fuse_files(a.t1, a.t2, a.func, a.out)
    print(json.dumps({"describe": pipe.describe(), "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
