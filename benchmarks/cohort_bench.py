"""What a cohort costs beside its slices, and what two Ray workers gain over one process, on one machine.

    python benchmarks/cohort_bench.py                       # ~8 minutes on a 2-core CPU
    python benchmarks/cohort_bench.py --participants 8 --slices 6 --size 256 --no-ray

The data: a synthetic BIDS cohort cut from the SPM templates (tfsdeploy.data.cohort), only its plain
participants (a T1, a T2 and a 3-D PET on a 2 mm grid of its own each), --slices axial slices each.

Timed on one machine, the packaged model, x4:
  cohort      in one process, the cohort's library path (tfsdeploy.tools.cohort): the participants
              found by pybids, each opened as `fuse` opens it (its PET resampled onto its T1), fused,
              and written with sidecar and montage, then the report;
  one fuse    in the same process, the same slices (the very tensors the cohort fused) as one volume:
              the participants' scans concatenated along z, fused by one `fuse_scan` and written
              as one volume;
  ratio       cohort slices/s / one fuse slices/s (target: at least 0.9). The two alternate,
              --repeats times each, and the fastest of each counts (the machine is shared);
  Ray         end to end, as a user runs them (one process each, model load included): `cohort --ray`
              on a local Ray cluster (`ray start --head`, 127.0.0.1) with 2 workers of --threads 1
              each, against `cohort` in one local process on every core: the ratio as it is.

Writes benchmarks/reports/cohort/cohort.{md,json} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfsdeploy.config import EngineConfig, SampleConfig  # noqa: E402
from tfsdeploy.data.cohort import SPECIAL, write_synthetic_bids  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402
from tfsdeploy.scans import Scan, ScanOutput, open_scan  # noqa: E402
from tfsdeploy.tools import cohort as lib  # noqa: E402


def plain_labels(n: int) -> list[str]:
    """The labels of the first n participants that have none of the special cases."""
    out, k = [], 1
    while len(out) < n:
        if k not in SPECIAL:
            out.append(f"{k:02d}")
        k += 1
    return out


class Stacked(Scan):
    """Several scans on one in-plane grid as one volume: their slices one after the other."""

    kind = output_kind = "nifti"

    def __init__(self, scans: list):
        self.scans, self.grid, self.inputs = scans, scans[0].grid, {}
        self.shape = scans[0].shape
        self.index = [(s, i) for s in scans for i in range(len(s))]
        self.names = [f"z{k:03d}" for k in range(len(self.index))]

    def slice(self, i: int):
        scan, j = self.index[self._index(i)]
        return scan.slice(j)


def one_fuse(pipe, units, size: int, out: Path) -> int:
    """The participants' scans, opened as the cohort opens them, fused as one volume and written."""
    scans = [open_scan(u.inputs["t1"], u.inputs["t2"], u.inputs["func"]) for u in units]
    stacked = Stacked(scans)
    ScanOutput(stacked, out).publish(pipe.fuse_scan(stacked, size))
    return len(stacked)


def cohort(pipe, bids: Path, labels: list[str], model_id, spec, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    units = lib.find_participants(bids, labels)
    lib.write_description(out, bids, model_id, spec)
    results = [lib.fuse_unit(pipe, u, out, model_id, spec) for u in units]
    lib.write_report(out, results)
    assert all(r.status == "done" for r in results), [r.reason for r in results]
    return sum(r.slices for r in results)


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--slices", type=int, default=3, help="axial slices per participant")
    ap.add_argument("--size", type=int, default=128, help="output side (0 = the model's 256)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of the cohort and the one fuse")
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                    help="also time 2 Ray workers against one local process")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "cohort")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cli = [sys.executable, "-m", "tfsdeploy"]
    common = ["--scale", "4", "--size", str(args.size), "--engine", "torch", "--no-progress"]
    labels = plain_labels(args.participants)
    n_slices = len(labels) * args.slices
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        tmp = Path(tmp)
        bids = write_synthetic_bids(tmp / "bids", participants=int(labels[-1]), slices=args.slices)
        sample = SampleConfig()
        model_id, sample = lib.identify_model(None, 4, sample)
        spec = lib.CohortSpec(4, sample, args.size, engine=EngineConfig(engine="torch"))
        pipe = FusionPipeline.load(None, 4, sample, spec.engine)
        units = lib.find_participants(bids, labels)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, work in (("cohort", lambda: cohort(pipe, bids, labels, model_id, spec, tmp / "out")),
                               ("one fuse", lambda: one_fuse(pipe, units, args.size, tmp / "one.nii.gz"))):
                t0 = time.perf_counter()
                assert work() == n_slices
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        rows.update(best)
        select = ["--participant-label", *labels]
        if args.ray:
            rows["local cohort (CLI)"] = timed(cli + ["cohort", str(bids), str(tmp / "cli"), "participant", *select,
                                                      *common], env)
            ray_bin = str(Path(sys.executable).with_name("ray"))
            port = free_port()
            start = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                     "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                     "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
            subprocess.run(start, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
            try:
                rows["ray, 2 workers (CLI)"] = timed(cli + ["cohort", str(bids), str(tmp / "ray"), "participant",
                                                            *select, *common, "--ray", f"127.0.0.1:{port}",
                                                            "--workers", "2", "--threads", "1"], env)
            finally:
                subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
            shutil.rmtree(tmp / "ray", ignore_errors=True)

    rate = {k: n_slices / v for k, v in rows.items()}
    result = {"participants": len(labels), "slices_per_participant": args.slices, "slices": n_slices,
              "size": args.size, "seconds": rows, "slices_per_s": rate,
              "cohort_vs_one_fuse": rate["cohort"] / rate["one fuse"],
              "ray2_vs_local": (rate["ray, 2 workers (CLI)"] / rate["local cohort (CLI)"]
                                if "ray, 2 workers (CLI)" in rate else None),
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    lines = [f"# Cohort throughput ({result['date']}, {os.cpu_count()} CPU cores, packaged model, x4, "
             f"output {args.size or 256} px)", "",
             f"{len(labels)} participants x {args.slices} slices = {n_slices} slices. cohort and one fuse: one "
             f"process, the pipeline loaded once, fastest of {args.repeats}; (CLI): one command each, end to end "
             "(model load included).", "",
             "| run | seconds | slices/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {rate[k]:.3f} |" for k, v in rows.items()]
    result["repeats"] = args.repeats
    lines += ["", f"cohort / one fuse: **{result['cohort_vs_one_fuse']:.2f}** (target >= 0.9)"]
    if result["ray2_vs_local"] is not None:
        lines += [f"2 Ray workers / one local process: **{result['ray2_vs_local']:.2f}**"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cohort.md").write_text("\n".join(lines) + "\n")
    (args.out / "cohort.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
