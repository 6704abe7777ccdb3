"""The GPU check's machinery, on the CPU: its rows in the order of importance, the budget that skips
the rows that do not fit (a stand-in clock), the report written after every row so that a row that
raises or a kill loses nothing already measured, child processes stopped at the budget, and rows
labelled by what ran when a capture falls back."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check as gc  # noqa: E402
from engines.torch_engine import TorchDenoiser  # noqa: E402
from tfsdeploy.checkpoint import build_from_checkpoint, load_checkpoint  # noqa: E402
from tfsdeploy.config import PRESETS, SampleConfig  # noqa: E402
from tfsdeploy.model import build_model  # noqa: E402
from tfsdeploy.pipeline import FusionPipeline  # noqa: E402


class Clock:
    """A stand-in for time.monotonic that moves only when a row says it spent time."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def row(key, estimate, spend=0.0, clock=None, raises=None, seen=None):
    def run(left):
        if seen is not None:
            seen.append((key, left))
        if clock is not None:
            clock.now += spend
        if raises is not None:
            raise raises

    return gc.Row(key, 1, f"row {key}", lambda: estimate, run)


def read(report):
    return json.loads(report.stem.with_suffix(".json").read_text())


def test_rows_run_in_order_and_the_budget_skips_those_that_do_not_fit(tmp_path):
    clock, seen = Clock(), []
    report = gc.Report(tmp_path, "stand-in", {"budget": 100})
    budget = gc.Budget(100, clock=clock)
    on_disk = []
    rows = [row("a", 10, 12, clock, seen=seen),
            row("b", 95, 1, clock, seen=seen),  # 88 s left: skipped without running
            row("c", 30, 31, clock, seen=seen),
            gc.Row("d", 2, "row d", lambda: 5, lambda left: on_disk.append(read(report))),
            row("e", 10, 0, clock, raises=gc.NotRun("needs a GPU"), seen=seen),
            row("f", 40, 50, clock, seen=seen),  # 57 s left: runs, and overruns its estimate
            row("g", 8, 0, clock, seen=seen)]  # 7 s left: skipped
    gc.run_rows(rows, report, budget, log=lambda s: None)
    assert [k for k, _ in seen] == ["a", "c", "e", "f"]
    assert [left for _, left in seen] == [100, 88, 57, 57]  # each run is told what is left
    d = read(report)
    assert [(r["key"], r["status"]) for r in d["rows"]] == [
        ("a", "done"), ("b", "not run"), ("c", "done"), ("d", "done"), ("e", "not run"), ("f", "done"),
        ("g", "not run")]
    assert d["rows"][1]["note"] == "needs about 95 s; 88 s of the budget left"
    assert d["rows"][4]["note"] == "needs a GPU"
    assert d["rows"][6]["note"] == "needs about 8 s; 7 s of the budget left"
    assert [r["seconds"] for r in d["rows"]] == [12, 0, 31, 0, 0, 50, 0]
    # written after every row: a row sees on disk every row before it
    assert [r["key"] for r in on_disk[0]["rows"]] == ["a", "b", "c"]
    md = report.stem.with_suffix(".md").read_text()
    assert md.index("row a") < md.index("row b") < md.index("row g")


def test_a_row_that_raises_is_recorded_and_the_next_one_runs(tmp_path):
    clock = Clock()
    report = gc.Report(tmp_path, "stand-in", {"budget": 60})
    kept = gc.Row("kept", 3, "kept", lambda: 1, lambda left: report.data["notes"].append("measured"))
    rows = [kept, row("boom", 1, 2, clock, raises=RuntimeError("capture_end failed\nsecond line")),
            row("cut", 1, 3, clock, raises=gc.Cut("stopped after 3 s: the budget ran out")),
            gc.Row("bad estimate", 4, "bad estimate", lambda: 1 / 0, lambda left: None), row("after", 1)]
    gc.run_rows(rows, report, gc.Budget(60, clock=clock), log=lambda s: None)
    d = read(report)
    assert [(r["key"], r["status"]) for r in d["rows"]] == [
        ("kept", "done"), ("boom", "failed"), ("cut", "cut"), ("bad estimate", "done"), ("after", "done")]
    assert d["rows"][1]["note"] == "RuntimeError: capture_end failed"
    assert d["notes"] == ["measured"]
    assert gc.failures(report, cuda=False) == ["row boom: RuntimeError: capture_end failed"]


KILLED = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from benchmarks import gpu_check as gc

out = Path({out!r})
report = gc.Report(out, "stand-in", {{"budget": 60}})

def measured(left):
    report.data["notes"].append("first row measured")

def hangs(left):
    (out / "started").write_text("")
    time.sleep(60)

gc.run_rows([gc.Row("one", 1, "one", lambda: 1, measured), gc.Row("two", 2, "two", lambda: 1, hangs)],
            report, gc.Budget(60), log=lambda s: None)
"""


def test_the_report_survives_a_kill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(root=str(ROOT), out=str(tmp_path))])
    try:
        t0 = time.monotonic()
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() - t0 < 120, "the stand-in check never reached row two"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    d = json.loads((tmp_path / "gpu-check-stand-in.json").read_text())
    assert [(r["key"], r["status"]) for r in d["rows"]] == [("one", "done")]
    assert d["notes"] == ["first row measured"]
    assert "| 1 | one | done |" in (tmp_path / "gpu-check-stand-in.md").read_text()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def check_for(tmp_path, cuda, *args):
    a = gc.parse_args(["--out", str(tmp_path), *args])
    return gc.Check(a, cuda, gc.Report(tmp_path, "stand-in", vars(a)), gc.Budget(a.budget), tmp_path)


def test_the_plan_is_in_the_order_of_importance(tmp_path):
    keys = [r.key for r in check_for(tmp_path, True).rows()]
    L = "latency:"
    assert keys[:8] == ["versions", "parity", f"{L}{gc.DEFAULT}:1", f"{L}{gc.DEFAULT}:16", f"{L}{gc.DEFAULT}:64",
                        "packaged", "cold-start", "package"]
    assert keys[8:14] == [f"{L}{k}:{b}" for b in (1, 16, 64) for k in (gc.FP32_OFF, gc.FP32_ON)]
    assert keys[14:29] == [f"{L}{k}:{b}" for b in (1, 16, 64) for k in gc.GROUP9]
    assert keys[29] == "projection"
    assert keys[30:] == [f"cli:{n}" for n, _ in gc.cli_commands(False)]
    rows = check_for(tmp_path, True, "--batches", "1,2", "--skip-cli").rows()
    groups = [r.group for r in rows]
    assert groups == sorted(groups) and groups[:5] == [1, 2, 3, 4, 5] and set(groups) == set(range(1, 10))
    assert rows[-1].key == "projection"


def test_row_estimates_grow_with_what_was_measured(tmp_path):
    c = check_for(tmp_path, True, "--batches", "1,16,64")
    assert c.estimate_packaged() == gc.PACKAGE_BUILD_S + 20  # the package is still to be built
    assert c.estimate_latency(gc.AOTI_CALL, 1) > gc.SETUP_S["cuda"]["aoti"]  # its build included
    first = c.estimate_latency(gc.DEFAULT, 64)
    c.report.data["latency"].append({"key": gc.DEFAULT, "batch": 1, "call_ms": 50.0, "fuse_ms": 600.0, "setup_s": 30.0})
    assert c.estimate_latency(gc.DEFAULT, 64) > first  # slower than guessed: the larger batch costs more
    # fp32 is expected three times slower than the fp16 default measured, eager fp16 not
    assert c.estimate_latency(gc.FP32_OFF, 16) > c.estimate_latency("eager fp16, native GroupNorm", 16)
    cpu = check_for(tmp_path, False)
    assert cpu.estimate_latency(gc.AOTI_FUSE, 1) == 0 and cpu.estimate_package() == 0  # not run: no GPU
    # the commands cost new processes: the guess, then multiples of the measured cold start
    evaluate = next(r for r in cpu.rows() if r.key == "cli:evaluate")
    assert evaluate.estimate() == 2 * gc.PROCESS_S["cpu"]
    cpu.report.data["cold_start"] = {"process_s": 4.0}
    assert evaluate.estimate() == 8.0


def test_rows_that_need_a_gpu_are_not_run_on_a_cpu(tmp_path):
    c = check_for(tmp_path, False, "--batches", "1", "--skip-cli")
    by_key = {r.key: r for r in c.rows()}
    for key in (f"latency:{gc.AOTI_FUSE}:1", "package", "projection"):
        with pytest.raises(gc.NotRun):
            by_key[key].run(100)


def test_a_child_is_stopped_at_the_budget_with_what_it_started():
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True); "
            "time.sleep(30)")
    t0 = time.monotonic()
    status, out, wall = gc.run_child([sys.executable, "-c", code], timeout=2)
    assert status == "timeout" and 1.5 < wall < 15 and time.monotonic() - t0 < 15
    grandchild = Path(f"/proc/{int(out.split()[0])}/status")
    time.sleep(0.2)
    # killed with its parent's session, not left running (at most a zombie nobody has reaped yet)
    assert not grandchild.exists() or "State:\tZ" in grandchild.read_text()


def test_timing_stops_at_the_deadline_after_one_timed_call():
    calls = []
    ms = gc.time_ms(lambda: calls.append(1), repeats=50, warmup=5, cuda=False, until=time.monotonic() - 1)
    assert len(ms) == 1 and len(calls) == 1  # no warm-up, one timed call
    assert len(gc.time_ms(lambda: None, repeats=4, warmup=2, cuda=False)) == 4


class Recorded:
    """A whole-fuse graph backend that records by running once, or fails as a driver can."""

    def __init__(self, fail):
        self.fail = fail

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        fn()
        return fn


@pytest.mark.parametrize("fail", [False, True])
def test_a_row_says_what_ran_when_the_whole_fuse_graph_falls_back(tmp_path, ckpt, fail):
    def load(path, notice):
        engine = TorchDenoiser(build_from_checkpoint(path)[0])
        engine.capturable = True  # as on CUDA
        return FusionPipeline(engine, load_checkpoint(path).configs, 4, SampleConfig(steps=2), notice=notice,
                              graphs=Recorded(fail))

    c = check_for(tmp_path, False, "--size", "32", "--repeats", "1", "--warmup", "0")
    heard = []
    path = gc.BenchPath(gc.AOTI_FUSE, load, kind="aoti")
    r, fused, _ = gc.measure_path(path, ckpt, torch.rand(1, 5, 32, 32), c, heard.append)
    assert r["fuse_graph"] is not fail and r["call_graph"] is False and fused.shape == (1, 3, 32, 32)
    assert (len(heard) == 1 and "failed" in heard[0]) if fail else not heard
    assert ("one CUDA graph per fuse" in r["engine"]) is not fail
    # on a GPU the label says so, and the projection then keeps the gaps between kernels
    assert gc.row_label(path, True, r["call_graph"], r["fuse_graph"]) == (
        f"{gc.AOTI_FUSE} (fell back: no whole-fuse graph)" if fail else gc.AOTI_FUSE)


def test_labels_and_graph_flags_follow_what_ran():
    aoti_call, per_call, compiled = (gc.PATHS[k] for k in (gc.AOTI_CALL, "torch fp16, a CUDA graph per call",
                                                           "fp16, compile(reduce-overhead)"))
    assert gc.row_label(aoti_call, True, False, False) == gc.AOTI_CALL  # it never asked for a graph
    assert gc.row_label(per_call, True, False, False).endswith("(fell back: no per-call graph)")
    assert gc.row_label(per_call, True, True, False) == per_call.key
    assert gc.row_label(compiled, True, False, False).endswith("(fell back: no per-call graph)")
    assert gc.row_label(gc.PATHS[gc.DEFAULT], False, False, False) == gc.DEFAULT  # a CPU has no graphs to miss
    # a package that cannot be recorded may be replaced by the torch engine and its graphs: named so
    assert gc.row_label(gc.PATHS[gc.AOTI_FUSE], True, True, True, "torch") == (
        f"{gc.AOTI_FUSE} (fell back: the torch engine, one CUDA graph per fuse)")
    assert gc.row_label(gc.PATHS[gc.AOTI_FUSE], True, False, True, "aoti") == gc.AOTI_FUSE

    class Aoti:  # an AOTInductor package: no graph of its own per call
        capturable = True

    eager = TorchDenoiser(build_model(PRESETS["tiny"]))
    assert not gc.call_replays_graph(Aoti(), cuda=True)
    assert not gc.call_replays_graph(eager, cuda=True)
    eager.cuda_graph = True
    assert gc.call_replays_graph(eager, cuda=True) and not gc.call_replays_graph(eager, cuda=False)


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    for args, msg in ((["--budget", "0"], "--budget must be positive"), (["--batches", "1,x"], "--batches"),
                      (["--anchor", str(tmp_path / "none.json"), "--allow-cpu"], "no such file")):
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args,
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and msg in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_projection_row_borrows_flops_by_name_across_rows_and_keeps_gaps_only_without_graphs(tmp_path):
    """The projection row on stand-in GPU profiles (it runs only on a GPU): a graph replay's kernels,
    which no operator claims, borrow FLOPs and bytes from the eager row's kernels of the same name,
    and only the row whose call replays a graph is projected without the idle time between kernels."""
    report = gc.Report(tmp_path, "NVIDIA H200", {"budget": 60})
    report.data["paper"] = {"gflop": 1.0, "weight_bytes": {"fp16": 2e6}, "activation_bytes": {"fp16": 1e6}}
    gemm = "sm90_xmma_gemm_f16f16"
    eager = [gc.Kernel(gemm, 0, 100, 1e9, 1e6, "fp16", "operator")]
    replay = [gc.Kernel(gemm, 0, 100, None, None, "fp16", "none")]
    for key, kernels, graph in (("eager fp16, native GroupNorm", eager, False), (gc.DEFAULT, replay, True)):
        row = {"key": key, "path": key, "batch": 1, "call_ms": 0.5, "fuse_ms": 6.0, "math": "fp16",
               "precision": "fp16", "fraction_of_peak": 0.1, "call_graph": graph, "profile_error": ""}
        report.data["latency"].append(row)
        gc.record_profile(report, row, kernels, cuda=True)
    gc.project_rows(report, "H200")
    assert report.data["profiles"][1]["time_share"] == {"by name": 1.0}
    assert gc.Kernel.from_row(report.kernels["profiles"][1]["kernels"][0]).flops == pytest.approx(1e9)
    eager_ms, graph_ms = (p["projected_ms"] for p in report.data["projection"])
    # the same kernel on both rows; the eager row adds its 0.4 ms idle between kernels, the graph none
    assert eager_ms - graph_ms == pytest.approx(0.4)
    assert graph_ms == pytest.approx(gc.project_call(
        [gc.Kernel(gemm, 0, 100, 1e9, 1e6, "fp16", "by name")], "H200", "RTX 3090", True)["projected_ms"])


def test_freeing_gpu_memory_after_a_row_never_raises_and_returns_to_the_default_stream(monkeypatch):
    """After a failed capture the process can sit on the capture's side stream, and empty_cache can
    assert: both are noted, and the check goes on (stand-ins for torch.cuda, which a CPU lacks)."""
    side, default, streams = object(), object(), []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: side)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda: default)
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def assert_capturing():
        raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED\nmore")

    monkeypatch.setattr(torch.cuda, "empty_cache", assert_capturing)
    notes = []
    gc.release_memory(True, notes)
    assert streams == [default]
    assert notes == ["a row left the process on a side stream; back on the default stream",
                     "releasing GPU memory failed after a row: RuntimeError: captures_underway.empty() INTERNAL "
                     "ASSERT FAILED"]


def test_package_builds_are_stored_before_anything_that_can_fail(tmp_path, monkeypatch):
    """A build's timings reach the report on disk before the package is loaded (which can fail),
    and a build the budget stopped cuts its row instead of measuring without it (stand-in children:
    a CPU builds no CUDA package)."""
    package = tmp_path / "paper.pt2"
    package.write_bytes(b"\0" * 3_000_000)
    answers = iter([(0, f'building\n{{"package": "{package}", "build_s": 5.0}}\nwarning: at exit', 5.0),
                    (0, '{"load_s": 1.5, "first_call_s": 0.25}', 2.0)])
    monkeypatch.setattr(gc, "run_child", lambda args, timeout: next(answers))
    c = check_for(tmp_path, True)
    with pytest.raises(Exception):  # not a real package: loading it fails
        c.aoti_pipeline(tmp_path / "ck", True, lambda s: None)
    stored = read(c.report)["aoti"][c.a.preset]
    assert stored["build_s"] == 5.0 and stored["megabytes"] == 3.0 and stored["load_s"] == 1.5
    assert "AOTInductor package (latency rows) (3 MB): built in 5 s" in c.report.stem.with_suffix(".md").read_text()

    monkeypatch.setattr(gc, "run_child", lambda args, timeout: ("timeout", "", 12.0))
    c = check_for(tmp_path / "cut", True)
    with pytest.raises(gc.Cut, match="budget ran out"):
        c.packaged(100)
    assert read(c.report)["package"]["build_s"] == 12.0
