"""`tfsdeploy cohort`: a synthetic BIDS dataset cut from the templates, fused participant by participant
into a BIDS derivatives dataset, each participant byte for byte what `fuse` makes of the same files;
resumed after an interruption, isolated from a bad participant, refused in one line when malformed;
and on a real local Ray cluster (slow), with a worker killed mid-cohort."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from tfsdeploy.cli import app
from tfsdeploy.cli.common import spread_values
from tfsdeploy.data.cohort import FRAME_DURATIONS, FRAME_STARTS, write_synthetic_bids
from tfsdeploy.errors import UserError
from tfsdeploy.tools import cohort as lib

pytest.importorskip("bids", reason="needs pybids: pip install -e '.[cohort]'")
pytest.importorskip("SimpleITK", reason="the PET lies on its own grid: needs the scans extra")

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "1", "--engine", "torch", "--no-progress"]
FUSED = {"01", "02", "05", "06"}  # 03 has no T2, 04 two T1 runs


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res) -> str:
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def table(out: Path) -> dict[str, dict]:
    rows = (out / "participants.tsv").read_text().splitlines()
    head = rows[0].split("\t")
    return {r.split("\t")[0] + ("" if r.split("\t")[1] == "n/a" else "_" + r.split("\t")[1]): dict(zip(head,
            r.split("\t"))) for r in rows[1:]}


def published(out: Path, pattern: str) -> list[Path]:
    """The files under `out` matching `pattern`, leaving out those in a writer's hidden staging folder."""
    return sorted(p for p in out.rglob(pattern) if not any(part.startswith(".") for part in p.relative_to(out).parts))


def outputs(out: Path) -> dict[str, Path]:
    """Every published fused volume under `out`, by participant key."""
    return {p.name.split("_space-")[0]: p for p in published(out, "*_fusion.nii.gz")}


def leftovers(out: Path) -> list[Path]:
    """Temporaries (hidden .tmp files or folders) anywhere under `out`."""
    return [p for p in out.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    return write_synthetic_bids(tmp_path_factory.mktemp("bids") / "ds", participants=6, slices=3, side=(32, 40))


@pytest.fixture(scope="module")
def fused_cohort(tmp_path_factory, bids, tiny_run) -> Path:
    """The synthetic cohort fused once with the tiny model (shared by the tests that only read it)."""
    out = tmp_path_factory.mktemp("cohort") / "derivatives"
    res = run("cohort", bids, out, "participant", "-m", tiny_run, *FAST)
    assert res.exit_code == 0, res.output
    return out


# --------------------------------------------------------------------------- the synthetic dataset


def test_the_synthetic_dataset_holds_every_case(bids):
    t1 = nib.load(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    pet = nib.load(bids / "sub-01" / "pet" / "sub-01_pet.nii.gz")
    assert t1.shape == (32, 40, 3) and np.allclose(np.abs(np.diag(pet.affine))[:3], 2.0)
    assert pet.shape != t1.shape and not np.allclose(pet.affine, t1.affine)  # its own 2 mm grid
    assert nib.load(bids / "sub-05" / "pet" / "sub-05_pet.nii.gz").shape[3] == len(FRAME_STARTS)
    assert not list((bids / "sub-03" / "anat").glob("*T2w*"))
    assert len(list((bids / "sub-04" / "anat").glob("*_T1w.nii.gz"))) == 2
    assert (bids / "sub-02" / "anat" / "sub-02_PDw.nii.gz").is_file()


def test_pybids_finds_each_participant_and_says_why_one_is_skipped(bids):
    units = {u.key: u for u in lib.find_participants(bids)}
    assert sorted(units) == ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06_ses-1"]
    assert units["sub-02"].inputs["t2"].name == "sub-02_PDw.nii.gz"
    assert units["sub-03"].skip == "no T2w or PDw"
    assert "2 T1w files" in units["sub-04"].skip and "--run" in units["sub-04"].skip
    assert units["sub-05"].pet_timing == (FRAME_STARTS, FRAME_DURATIONS)
    assert units["sub-01"].sources["func"] == "bids:raw:sub-01/pet/sub-01_pet.nii.gz"
    # --run picks one of the two runs; labels with or without their prefix; sessions narrow
    picked = lib.find_participants(bids, ["sub-04", "01"], run=2)
    assert [u.key for u in picked] == ["sub-01", "sub-04"] and picked[1].inputs["t1"].name == "sub-04_run-2_T1w.nii.gz"
    assert [u.key for u in lib.find_participants(bids, (), ["1"])] == ["sub-06_ses-1"]


def test_a_4d_pet_becomes_the_duration_weighted_mean_of_its_window(bids, tmp_path):
    path = bids / "sub-05" / "pet" / "sub-05_pet.nii.gz"
    frame0 = np.asarray(nib.load(path).dataobj[..., 0], dtype=np.float64)  # frame f holds (1 + f) * frame0
    img, rule = lib.static_pet(path, (FRAME_STARTS, FRAME_DURATIONS), None)
    expect = (1 * 60 + 2 * 120 + 3 * 300) / 480  # every frame, weighted by its duration
    np.testing.assert_allclose(img.get_fdata(), expect * frame0, rtol=1e-6)
    assert img.shape == frame0.shape and np.allclose(img.affine, nib.load(path).affine) and "1-3 of 3" in rule
    img, rule = lib.static_pet(path, (FRAME_STARTS, FRAME_DURATIONS), (60, 480))
    np.testing.assert_allclose(img.get_fdata(), (2 * 120 + 3 * 300) / 420 * frame0, rtol=1e-6)
    assert "frames 2-3" in rule and "60-480 s" in rule
    assert lib.pet_frames(3, None, None)[1] == [1.0, 1.0, 1.0]  # no timing: the plain mean
    with pytest.raises(UserError, match="no PET frame lies wholly inside"):
        lib.pet_frames(3, (FRAME_STARTS, FRAME_DURATIONS), (0, 30))
    with pytest.raises(UserError, match="cannot pick frames"):
        lib.pet_frames(3, None, (0, 60))
    for bad in ("", "60", "a:b", "60:30", "-1:5", "0:inf"):
        with pytest.raises(UserError, match="--pet-window"):
            lib.parse_window(bad)


def test_bids_apps_labels_follow_one_flag():
    assert spread_values(["cohort", "a", "b", "participant", "--participant-label", "01", "02", "--scale", "4"]) == [
        "cohort", "a", "b", "participant", "--participant-label", "01", "--participant-label", "02", "--scale", "4"]
    assert spread_values(["fuse", "x", "--steps", "1", "y"]) == ["fuse", "x", "--steps", "1", "y"]


# --------------------------------------------------------------------------- one machine


def test_each_participant_is_byte_identical_to_fuse_on_the_same_files(fused_cohort, bids, tiny_run, tmp_path):
    out = fused_cohort
    rows = table(out)
    assert {k: r["status"] for k, r in rows.items()} == {
        "sub-01": "done", "sub-02": "done", "sub-03": "skipped", "sub-04": "skipped", "sub-05": "done",
        "sub-06_ses-1": "done"}
    assert rows["sub-03"]["reason"] == "no T2w or PDw" and "choose one with --run" in rows["sub-04"]["reason"]
    units = {u.key: u for u in lib.find_participants(bids)}
    vols = outputs(out)
    assert sorted(vols) == ["sub-01", "sub-02", "sub-05", "sub-06_ses-1"]
    for key, vol in vols.items():
        u = units[key]
        pet = u.inputs["func"]
        if key == "sub-05":  # fuse takes the static PET the cohort's rule makes
            pet = tmp_path / "pet_static.nii.gz"
            lib.write_static_pet(u.inputs["func"], u.pet_timing, None, pet)
        alone = tmp_path / f"{key}.nii.gz"
        res = run("fuse", u.inputs["t1"], u.inputs["t2"], pet, "-m", tiny_run, "--out", alone, *FAST)
        assert res.exit_code == 0, res.output
        assert vol.read_bytes() == alone.read_bytes(), key
        montage = vol.with_name(vol.name.replace(".nii.gz", "_montage.png"))
        assert montage.read_bytes() == (tmp_path / f"{key}_montage.png").read_bytes(), key
    assert vols["sub-06_ses-1"].parent == out / "sub-06" / "ses-1" / "anat"
    assert nib.load(vols["sub-01"]).get_data_dtype().names == ("R", "G", "B")


def test_the_derivatives_describe_their_sources_model_and_options(fused_cohort, tiny_run):
    from tfsdeploy.artifacts import checkpoint_fingerprint
    from tfsdeploy.modelref import resolve_model

    out = fused_cohort
    sha = checkpoint_fingerprint(resolve_model(tiny_run).member(4))["sha256"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][-1]["ModelSHA256"] == sha
    assert desc["GeneratedBy"][-1]["Options"]["steps"] == 1 and desc["GeneratedBy"][-1]["Version"]
    side = json.loads((out / "sub-05" / "anat" / "sub-05_space-T1w_desc-fusedx4_fusion.json").read_text())
    assert side["Sources"] == ["bids:raw:sub-05/anat/sub-05_T1w.nii.gz", "bids:raw:sub-05/anat/sub-05_T2w.nii.gz",
                               "bids:raw:sub-05/pet/sub-05_pet.nii.gz"]
    assert side["Model"]["sha256"] == sha and side["Options"]["scale"] == 4 and side["DateCreated"]
    assert "duration-weighted mean of frames 1-3" in side["PETReduction"]
    assert side["Output"]["sha256"] == lib.hash_input(out / "sub-05" / "anat" /
                                                      "sub-05_space-T1w_desc-fusedx4_fusion.nii.gz")
    report = (out / "cohort_report.html").read_text()
    assert report.count("<img ") == 4 and "no T2w or PDw" in report and "6 participants" in report
    assert not leftovers(out)


def test_a_rerun_keeps_what_is_finished_and_redoes_what_changed(bids, tiny_run, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(bids, data)
    out = tmp_path / "out"
    args = ("cohort", data, out, "participant", "-m", tiny_run, "--participant-label", "01", "02", *FAST)
    assert run(*args).exit_code == 0
    first = {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in outputs(out).items()}
    res = run(*args)
    assert res.exit_code == 0 and {r["status"] for r in table(out).values()} == {"kept"}, res.output
    assert {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in outputs(out).items()} == first
    # a changed input, other options, --force: fused again
    t2 = data / "sub-02" / "anat" / "sub-02_PDw.nii.gz"
    img = nib.load(t2)
    nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32) * 0.5 + 1, img.affine), t2)
    assert run(*args).exit_code == 0
    assert {k: r["status"] for k, r in table(out).items()} == {"sub-01": "kept", "sub-02": "done"}
    assert run(*args, "--seed", "3").exit_code == 0 and {r["status"] for r in table(out).values()} == {"done"}
    assert run(*args, "--seed", "3", "--force").exit_code == 0
    assert {r["status"] for r in table(out).values()} == {"done"}
    # a damaged output is fused again, not trusted
    vol = outputs(out)["sub-01"]
    vol.write_bytes(vol.read_bytes()[:-10])
    assert run(*args, "--seed", "3").exit_code == 0
    assert {k: r["status"] for k, r in table(out).items()} == {"sub-01": "done", "sub-02": "kept"}


def test_a_retried_participant_is_not_written_twice_even_with_force(bids, tiny_run, tmp_path):
    """A retry of a participant whose first attempt died after publishing (a Ray worker killed then)
    finds this run's own output and leaves it; an earlier run's output is redone under --force."""
    from tfsdeploy.config import EngineConfig, SampleConfig
    from tfsdeploy.pipeline import FusionPipeline

    model_id, sample = lib.identify_model(tiny_run, 4, SampleConfig(steps=1))
    spec = lib.CohortSpec(4, sample, engine=EngineConfig(engine="torch"))
    pipe = FusionPipeline.load(tiny_run, 4, sample, spec.engine)
    unit = lib.find_participants(bids, ["01"])[0]
    out = tmp_path / "out"
    started = time.time()
    first = lib.fuse_unit(pipe, unit, out, model_id, spec, started=started)
    vol = outputs(out)["sub-01"]
    ino = vol.stat().st_ino
    again = lib.fuse_unit(pipe, unit, out, model_id, spec, force=True, started=started)
    assert (first.status, again.status) == ("done", "done") and "earlier attempt of this run" in again.reason
    assert again.slices == first.slices == 3 and vol.stat().st_ino == ino
    later = lib.fuse_unit(pipe, unit, out, model_id, spec, force=True, started=time.time())
    assert later.status == "done" and later.reason == "" and vol.stat().st_ino != ino


def test_one_bad_participant_is_one_line_and_the_exit_code_says_so(bids, tiny_run, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(bids, data)
    (data / "sub-01" / "anat" / "sub-01_T2w.nii.gz").write_bytes(b"not a NIfTI at all")
    out = tmp_path / "out"
    res = run("cohort", data, out, "participant", "-m", tiny_run, "--participant-label", "01", "02", *FAST)
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 1 of 2 participant(s) failed; see {out / 'participants.tsv'}"]
    rows = table(out)
    assert rows["sub-01"]["status"] == "failed" and "cannot read as NIfTI" in rows["sub-01"]["reason"]
    assert rows["sub-02"]["status"] == "done" and sorted(outputs(out)) == ["sub-02"]
    assert not (out / "sub-01").exists() and not leftovers(out)


def test_an_interrupted_cohort_keeps_what_it_finished_and_the_rerun_goes_on(bids, tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = lib.fuse_unit, []

    def interrupted(pipe, unit, *a, **k):
        calls.append(unit.key)
        if len(calls) == 3:  # Ctrl-C as the third participant (sub-03) begins
            raise KeyboardInterrupt
        return real(pipe, unit, *a, **k)

    monkeypatch.setattr(lib, "fuse_unit", interrupted)
    res = run("cohort", bids, out, "participant", "-m", tiny_run, "--participant-label", "01", "02", "03", "05",
              *FAST)
    assert res.exit_code == 130 and res.stderr.strip().splitlines()[-1] == "error: interrupted"
    rows = table(out)
    assert [rows[k]["status"] for k in ("sub-01", "sub-02", "sub-03", "sub-05")] == ["done", "done", "not run",
                                                                                     "not run"]
    assert sorted(outputs(out)) == ["sub-01", "sub-02"] and not leftovers(out)
    monkeypatch.setattr(lib, "fuse_unit", real)
    res = run("cohort", bids, out, "participant", "-m", tiny_run, "--participant-label", "01", "02", "03", "05",
              *FAST)
    assert res.exit_code == 0, res.output
    assert [table(out)[k]["status"] for k in ("sub-01", "sub-02", "sub-03", "sub-05")] == ["kept", "kept", "skipped",
                                                                                           "done"]


@pytest.mark.slow
def test_sigkill_mid_cohort_leaves_no_partial_output(bids, tiny_run, tmp_path):
    """kill -9 while the cohort runs: each participant is there whole (its sidecar matching its volume)
    or not at all, and the rerun fuses only what is missing."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "tfsdeploy", "cohort", str(bids), str(out), "participant", "-m", str(tiny_run),
            *FAST]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not published(out, "*_fusion.json"):  # published, not one being staged
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    finished = sorted(outputs(out))
    assert 1 <= len(finished) < 4
    for key, vol in outputs(out).items():
        side = json.loads(vol.with_name(vol.name.replace(".nii.gz", ".json")).read_text())
        assert side["Output"]["sha256"] == lib.hash_input(vol)
    assert len(published(out, "*_fusion.json")) == len(finished)
    res = run("cohort", bids, out, "participant", "-m", tiny_run, *FAST)
    assert res.exit_code == 0, res.output
    statuses = {k: r["status"] for k, r in table(out).items() if r["status"] != "skipped"}
    assert {k for k, s in statuses.items() if s == "kept"} == set(finished)
    assert sorted(outputs(out)) == ["sub-01", "sub-02", "sub-05", "sub-06_ses-1"] and not leftovers(out)


def test_a_manifest_csv_serves_data_that_is_not_bids(bids, synth_dataset, tiny_run, tmp_path):
    test = synth_dataset / "test"
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("id,t1,t2,func\n"
                        f"a1,{bids}/sub-01/anat/sub-01_T1w.nii.gz,{bids}/sub-01/anat/sub-01_T2w.nii.gz,"
                        f"{bids}/sub-01/pet/sub-01_pet.nii.gz\n"
                        f"b2,{test}/t1,{test}/t2,{test}/func\n"
                        "c3,missing_t1.nii.gz,t2.nii.gz,pet.nii.gz\n")
    out = tmp_path / "out"
    res = run("cohort", manifest, out, "participant", "-m", tiny_run, *FAST)
    assert res.exit_code == 0, res.output
    rows = table(out)
    assert [rows[k]["status"] for k in ("sub-a1", "sub-b2", "sub-c3")] == ["done", "done", "skipped"]
    assert "missing_t1.nii.gz does not exist" in rows["sub-c3"]["reason"]
    pngs = out / "sub-b2" / "anat" / "sub-b2_space-T1w_desc-fusedx4_fusion"
    assert sorted(p.name for p in pngs.iterdir()) == ["e00.png", "e01.png"]
    side = json.loads((out / "sub-a1" / "anat" / "sub-a1_space-T1w_desc-fusedx4_fusion.json").read_text())
    assert side["Sources"][0] == str(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    res = run("cohort", manifest, out, "participant", "-m", tiny_run, *FAST)
    assert [table(out)[k]["status"] for k in ("sub-a1", "sub-b2")] == ["kept", "kept"]


@pytest.mark.parametrize("case", ["no description", "unknown participant", "output inside the input", "not a level",
                                  "unknown session", "manifest header", "workers without ray", "bad ray address",
                                  "output not a cohort"])
def test_malformed_input_is_refused_in_one_line(case, bids, tiny_run, tmp_path):
    data, out = bids, tmp_path / "out"
    extra: list = []
    level = "participant"
    if case == "no description":
        data = tmp_path / "ds"
        shutil.copytree(bids, data)
        (data / "dataset_description.json").unlink()
    elif case == "unknown participant":
        extra = ["--participant-label", "01", "99"]
    elif case == "output inside the input":
        data = tmp_path / "ds"
        shutil.copytree(bids, data)
        out = data / "derivatives" / "tfsdeploy"
    elif case == "not a level":
        level = "group"
    elif case == "unknown session":
        extra = ["--session-label", "7"]
    elif case == "manifest header":
        data = tmp_path / "m.csv"
        data.write_text("subject,t1,t2,pet\n")
    elif case == "workers without ray":
        extra = ["--workers", "2"]
    elif case == "bad ray address":
        extra = ["--ray", "head-node"]
    elif case == "output not a cohort":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    line = one_error_line(run("cohort", data, out, level, "-m", tiny_run, *extra, *FAST))
    assert sorted(tmp_path.rglob("*")) == before, line
    expect = {"no description": "no dataset_description.json", "unknown participant": "no participant sub-99",
              "output inside the input": "lies inside the input dataset", "not a level": "only 'participant'",
              "unknown session": "no session ses-7", "manifest header": "id,t1,t2,func",
              "workers without ray": "add --ray", "bad ray address": "--ray takes auto",
              "output not a cohort": "not a cohort's output"}[case]
    assert expect in line


@pytest.mark.parametrize("package", ["bids", "ray"])
def test_without_its_extra_the_cohort_says_what_to_install(package, bids, tiny_run, tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    extra = ["--ray", "auto"] if package == "ray" else []
    line = one_error_line(run("cohort", bids, tmp_path / "out", "participant", "-m", tiny_run, *extra, *FAST))
    assert f"pip install 'tfsdeploy[{'ray' if package == 'ray' else 'cohort'}]'" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (head on 127.0.0.1, 2 CPUs), stopped afterwards."""
    pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]'")
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TFSDEPLOY_CACHE": str(tmp / "cache")}
    start = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus",
             "2", "--num-gpus", "0", "--include-dashboard", "false", "--object-store-memory", str(80 * 2**20),
             "--disable-usage-stats"]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def cohort_process(bids, out, tiny_run, address, *extra) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tfsdeploy", "cohort", str(bids), str(out), "participant", "-m", str(tiny_run),
            "--ray", address, "--workers", "2", "--threads", "1", *FAST, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sidecars(out: Path) -> list[Path]:
    """The finished participants' sidecars, read while workers write (temporaries come and go)."""
    while True:
        try:
            return [p for p in out.glob("sub-*/**/anat/*_fusion.json")]
        except FileNotFoundError:
            continue


def worker_pids() -> list[int]:
    """The processes of the cohort's Ray actors (their titles start with ray::CohortWorker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::CohortWorker"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_a_ray_cluster_fuses_the_cohort_like_one_machine(ray_cluster, bids, tiny_run, fused_cohort, tmp_path):
    out = tmp_path / "out"
    proc = cohort_process(bids, out, tiny_run, ray_cluster)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "2 Ray worker(s)" in stderr
    assert {k: r["status"] for k, r in table(out).items()} == {k: r["status"] for k, r in table(fused_cohort).items()}
    local = outputs(fused_cohort)
    for key, vol in outputs(out).items():
        assert vol.read_bytes() == local[key].read_bytes(), key
    assert not leftovers(out) and not list(out.glob(".tfsdeploy-cohort-*"))


@pytest.mark.slow
def test_a_killed_ray_worker_has_its_participant_retried_and_each_written_once(ray_cluster, bids, tiny_run,
                                                                                tmp_path):
    data = tmp_path / "ds"  # more participants, so the kill lands mid-cohort
    write_synthetic_bids(data, participants=10, slices=3, side=(32, 40))
    out = tmp_path / "out"
    proc = cohort_process(data, out, tiny_run, ray_cluster)
    inodes: dict[Path, set] = {}  # every sidecar's inode seen while the cohort runs: a rewrite adds one
    killed = None
    deadline = time.monotonic() + 600
    while proc.poll() is None:
        assert time.monotonic() < deadline
        for side in sidecars(out):
            try:
                inodes.setdefault(side, set()).add(side.stat().st_ino)
            except OSError:
                pass
        if killed is None and inodes:
            pids = worker_pids()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    assert killed is not None and proc.returncode == 0, stderr[-3000:]
    rows = table(out)
    expected = {f"{k:02d}" for k in range(1, 11)} - {"03", "04"}
    assert {k for k, r in rows.items() if r["status"] == "done"} == {f"sub-{k}" for k in expected if k != "06"} | {
        "sub-06_ses-1"}
    assert len(rows) == 10 and sorted(outputs(out)) == sorted(k for k, r in rows.items() if r["status"] == "done")
    assert all(len(seen) == 1 for seen in inodes.values()), "a participant was written twice"
    for vol in outputs(out).values():
        side = json.loads(vol.with_name(vol.name.replace(".nii.gz", ".json")).read_text())
        assert side["Output"]["sha256"] == lib.hash_input(vol)
    assert not leftovers(out) and not list(out.glob(".tfsdeploy-cohort-*"))
