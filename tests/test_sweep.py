"""The bad-input sweep: every option of every command, given a bad value, ends in one `error:` line,
a non-zero exit, no traceback and no new file.

The cases are generated from the commands' own signatures, so a new option is swept without
editing this file. Each command gets a cheap valid invocation (`BASE`); one option at a time is
replaced by a bad value of its kind:

    int    -8, 0, 10**12, "abc"         float  -1, 0, 1e30, nan, "abc"
    text   "bogus", ""                  path   missing, a file, a folder

A few of those values are valid for some options (`--seed 0`, `--size 0` = the model's size, an
output folder that does not exist yet): `ACCEPTED` lists them, each with the reason, and they are
not run. Boolean flags have no bad value.
"""

from __future__ import annotations

import inspect
import shutil
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tfsdeploy.cli import app

runner = CliRunner()

BAD = {
    int: {"negative": "-8", "zero": "0", "huge": str(10**12), "not a number": "abc"},
    float: {"negative": "-1", "zero": "0", "huge": "1e30", "nan": "nan", "not a number": "abc"},
    str: {"unknown": "bogus", "empty": ""},
    Path: {"missing": "@missing", "a file": "@file", "a folder": "@folder"},
}

# (command, option, bad kind) -> why that value is fine for it.
ACCEPTED = {
    **{(c, "seed", k): "any non-negative seed is a seed" for c in ("fuse", "train", "demo", "evaluate")
       for k in ("zero", "huge")},
    **{(c, "steps", "zero"): "0 = the sampler's default" for c in ("fuse", "demo", "evaluate")},
    **{(c, "size", "zero"): "0 = the model's training size" for c in ("fuse", "evaluate")},
    **{(c, "threads", "zero"): "0 = the library's default" for c in ("fuse", "evaluate", "bench", "train")},
    ("data build", "seed", "zero"): "any non-negative seed is a seed",
    ("fuse", "batch_size", "zero"): "0 = as many slices as memory holds",
    ("fuse", "adapt", "zero"): "0 = no adaptation",
    ("evaluate", "limit", "zero"): "0 = every image",
    ("export", "min_size", "zero"): "0 = 64",
    ("export", "max_size", "zero"): "0 = 512",
    ("export", "max_batch", "zero"): "0 = a GPU's scan batch when building for a GPU, else 4",
    ("bench", "warmup", "zero"): "no untimed calls",
    ("bench", "cold_runs", "zero"): "0 = no one-shot processes",
    ("bench", "ddpm_full", "zero"): "0 = all T",
    ("train", "crop", "zero"): "0 = the whole image",
    ("train", "val_every", "zero"): "0 = never validate",
    ("train", "psf_mse", "zero"): "the PSF term may be off",
    ("train", "psf_ssim", "zero"): "the PSF term may be off",
    ("train", "ema_decay", "zero"): "no averaging",
    ("bundle", "notes", "unknown"): "free text",
    ("bundle", "notes", "empty"): "free text",
    ("bundle", "ddim_steps", "empty"): "no recommendation",
    ("bundle", "blend", "empty"): "no blend",
    ("bundle", "backproject", "empty"): "no recommendation",
    **{(c, "backproject", "zero"): "0 = plain bicubic upsampling" for c in ("fuse", "evaluate")},
    ("evaluate", "montage_image", "empty"): "'' = the middle image",
    ("evaluate", "methods", "empty"): "no baselines, only the models",
    **{(c, "out", "missing"): "an output folder is created" for c in ("train", "bundle", "demo", "evaluate", "bench",
                                                                      "export", "data build")},
    **{(c, "out", "a folder"): "an existing output folder is replaced" for c in ("bundle", "demo", "evaluate",
                                                                                 "bench", "export")},
    ("train", "out", "a folder"): "an empty folder becomes the run",
    ("data build", "out", "a folder"): "an empty folder is filled",
    ("train", "val_every", "huge"): "more than --steps: never",
    ("train", "ckpt_every", "huge"): "more than --steps: only the final checkpoint",
    ("train", "log_every", "huge"): "more than --steps: only the last step",
    ("evaluate", "limit", "huge"): "more than the split: every image",
    ("fuse", "out", "a file"): "an existing output is overwritten (README)",
    ("fuse", "export_dir", "a folder"): "an empty export folder: auto falls back to torch",
    **{("cohort", "seed", k): "any non-negative seed is a seed" for k in ("zero", "huge")},
    ("cohort", "steps", "zero"): "0 = the sampler's default",
    ("cohort", "size", "zero"): "0 = the model's training size",
    ("cohort", "threads", "zero"): "0 = the library's default",
    ("cohort", "batch_size", "zero"): "0 = as many slices as memory holds",
    ("cohort", "backproject", "zero"): "0 = plain bicubic upsampling",
    ("cohort", "workers", "zero"): "0 = as many as the cluster holds",
    ("cohort", "export_dir", "a folder"): "an empty export folder: auto falls back to torch",
    ("cohort", "output_dir", "missing"): "the derivatives folder is created",
    ("cohort", "output_dir", "a folder"): "an empty folder is filled",
}


def commands() -> dict[str, typing.Callable]:
    """Every command, by the name a user types ("data build" for subcommands)."""
    found = {}

    def walk(t: typer.Typer, prefix: str) -> None:
        for c in t.registered_commands:
            found[prefix + (c.name or c.callback.__name__.replace("_", "-"))] = c.callback
        for g in t.registered_groups:
            walk(g.typer_instance, prefix + g.name + " ")

    walk(app, "")
    return found


def parameters(fn) -> list[tuple[str, type, typing.Any]]:
    """(name, base type, typer info) of each option and argument a user can give a value to."""
    hints = typing.get_type_hints(fn)
    out = []
    for name, p in inspect.signature(fn).parameters.items():
        info = p.default
        if not isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)):
            continue  # the typer context
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, list) or str(typing.get_origin(tp)) == "types.UnionType":
            tp = args[0]
        if tp is bool:
            continue
        out.append((name, tp, info))
    return out


def flag(name: str, info) -> str:
    decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
    return decls[0] if decls else "--" + name.replace("_", "-")


def base_invocations(tiny_run: Path, data: Path, triplet: list[str], work: Path) -> dict[str, dict]:
    """A cheap, valid invocation of each command: positional arguments and options by name. The
    torch engine is named because other tests export the shared tiny model for a small size range."""
    return {
        "fuse": {"args": {"t1": triplet[0], "t2": triplet[1], "func": triplet[2]},
                 "opts": {"model": tiny_run, "engine": "torch", "out": work / "o.png", "steps": 1,
                          "progress": False}},
        "train": {"args": {}, "opts": {"out": work / "run", "preset": "tiny", "data": data, "steps": 1,
                                       "batch_size": 1, "crop": 32, "val_every": 0, "progress": False}},
        # Resuming an existing run (a copy of the tiny one, at step 4) without repeating its preset.
        "train:resume": {"args": {}, "opts": {"out": work / "resume", "data": data, "steps": 5, "val_every": 0,
                                              "progress": False}},
        "bundle": {"args": {"out": work / "bundle"}, "opts": {"x4": tiny_run}},
        "demo": {"args": {}, "opts": {"model": tiny_run, "engine": "torch", "out": work / "demo", "steps": 1,
                                      "progress": False}},
        "evaluate": {"args": {}, "opts": {"model": tiny_run, "engine": "torch", "data": data, "scales": "4",
                                          "limit": 1, "steps": 1,
                                          "out": work / "eval", "progress": False}},
        "export": {"args": {"model": tiny_run}, "opts": {"out": work / "export", "min_size": 32, "max_size": 64,
                                                         "parity_steps": 1, "fp16": False}},
        "bench": {"args": {}, "opts": {"preset": "tiny", "engines": "torch", "sizes": "32", "batches": "1",
                                       "repeats": 1, "warmup": 0, "fuse_steps": "1", "ddpm_steps": 1,
                                       "cold_runs": 0, "out": work / "bench"}},
        "data build": {"args": {}, "opts": {"out": work / "ds", "size": 32, "combos": "t1-t2-spect"}},
        "info": {"args": {}, "opts": {}},
        # A manifest CSV of one participant, the test split's folders of slices (no BIDS indexing, two slices).
        "cohort": {"args": {"bids_dir": cohort_manifest(work, data), "output_dir": work / "derivatives",
                            "analysis_level": "participant"},
                   "opts": {"model": tiny_run, "engine": "torch", "steps": 1, "progress": False}},
    }


def cohort_manifest(work: Path, data: Path) -> Path:
    csv = work / "cohort.csv"
    csv.write_text("id,t1,t2,func\n" + "e," + ",".join(str(data / "test" / m) for m in ("t1", "t2", "func")) + "\n")
    return csv


def command_line(name: str, fn, base: dict, swept: str | None = None, value: str | None = None) -> list[str]:
    argv = name.split()
    infos = {n: info for n, _, info in parameters(fn)}
    for n, v in base["args"].items():
        argv.append(value if n == swept else str(v))
    opts = dict(base["opts"])
    if swept in infos and swept not in base["args"]:
        opts[swept] = value
    for n, v in opts.items():
        if isinstance(v, bool):
            argv.append(("--" if v else "--no-") + n.replace("_", "-"))
        else:
            argv += [flag(n, infos[n]), str(v)]
    return argv


VARIANTS = {"train": ("train", "train:resume")}  # commands swept from more than one starting state


def cases() -> list[tuple[str, str, str, str]]:
    out = []
    for cmd, fn in commands().items():
        for name, tp, _ in parameters(fn):
            for kind, value in BAD.get(tp, {}).items():
                if (cmd, name, kind) not in ACCEPTED:
                    out += [(variant, name, kind, value) for variant in VARIANTS.get(cmd, (cmd,))]
    return out


CASES = cases()


def test_every_command_and_parameter_is_swept():
    """The generator sees every command and every value-taking parameter, and the table of accepted
    values names only parameters that exist (so it cannot silently go stale)."""
    cmds = commands()
    assert {"fuse", "cohort", "train", "export", "bench", "evaluate", "demo", "bundle", "data build", "info"} <= set(cmds)
    unknown_types = [(c, n, tp) for c, fn in cmds.items() for n, tp, _ in parameters(fn) if tp not in BAD]
    assert not unknown_types, f"add bad values for these parameter types: {unknown_types}"
    params = {(c, n) for c, fn in cmds.items() for n, _, _ in parameters(fn)}
    stale = [k for k in ACCEPTED if k[:2] not in params or k[2] not in BAD[dict(
        (n, tp) for n, tp, _ in parameters(cmds[k[0]]))[k[1]]]]
    assert not stale, f"ACCEPTED names parameters that do not exist: {stale}"
    assert len(CASES) > 200


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory, tiny_run, synth_dataset):
    d = synth_dataset / "test"
    return tiny_run, synth_dataset, [str(d / m / "e00.png") for m in ("t1", "t2", "func")]


def snapshot(*roots: Path) -> set[Path]:
    return {p for r in roots for p in r.rglob("*")}


@pytest.mark.parametrize("cmd,param,kind,value", CASES, ids=[f"{c}-{p}-{k}" for c, p, k, _ in CASES])
def test_bad_value_is_one_clean_error(cmd, param, kind, value, sweep_inputs, tmp_path, monkeypatch):
    tiny_run, data, triplet = sweep_inputs
    work, cwd = tmp_path / "work", tmp_path / "cwd"
    for d in (work, cwd):
        d.mkdir()
    monkeypatch.chdir(cwd)
    junk_file = work / "junk.png"
    junk_file.write_bytes(b"not an image, a checkpoint or a dataset")
    (work / "junk_dir").mkdir()
    value = {"@missing": str(work / "missing" / "nothing.png"), "@file": str(junk_file),
             "@folder": str(work / "junk_dir")}.get(value, value)

    if cmd == "train:resume":
        shutil.copytree(tiny_run, work / "resume")
    fn = commands()[cmd.split(":")[0]]
    argv = command_line(cmd.split(":")[0], fn, base_invocations(tiny_run, data, triplet, work)[cmd], param, value)
    before = snapshot(work, cwd)
    res = runner.invoke(app, argv)

    shown = " ".join(argv)
    assert res.exit_code not in (0, None), f"accepted: tfsdeploy {shown}\n{res.output}"
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"tfsdeploy {shown} raised {type(res.exception).__name__}: {res.exception}")
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"tfsdeploy {shown}:\n{res.stderr}"
    assert snapshot(work, cwd) == before, f"tfsdeploy {shown} left {sorted(snapshot(work, cwd) - before)}"


def test_the_base_invocations_are_valid(sweep_inputs, tmp_path, monkeypatch):
    """Without a bad value the cheap invocations succeed, so each failure above is the bad value's."""
    tiny_run, data, triplet = sweep_inputs
    monkeypatch.chdir(tmp_path)
    for cmd, fn in commands().items():
        if cmd in ("export", "bench", "data build"):  # slow here; each has its own end-to-end test
            continue
        for variant in VARIANTS.get(cmd, (cmd,)):
            work = tmp_path / variant.replace(" ", "_").replace(":", "_")
            work.mkdir()
            if variant == "train:resume":
                shutil.copytree(tiny_run, work / "resume")
            argv = command_line(cmd, fn, base_invocations(tiny_run, data, triplet, work)[variant])
            res = runner.invoke(app, argv)
            assert res.exit_code == 0, f"tfsdeploy {' '.join(argv)}\n{res.output}"


# --------------------------------------------------------------------------- optional packages


def hide(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules) fail, as on an install without its extra."""
    import sys

    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)


def test_bench_without_matplotlib_writes_its_tables_and_says_why_there_is_no_plot(tmp_path, monkeypatch):
    hide(monkeypatch, "matplotlib")
    argv = command_line("bench", commands()["bench"], base_invocations(Path(), Path(), ["", "", ""], tmp_path)["bench"])
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and res.exception is None
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["bench.json", "bench.md"]
    said = [line for line in res.output.splitlines() if "no plot" in line]
    assert len(said) == 1 and "needs matplotlib" in said[0]
    assert "bench.png" not in res.stdout.splitlines()[-1]


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript", "tensorrt"])
def test_commands_needing_an_optional_package_say_so_in_one_line(package, sweep_inputs, tmp_path, monkeypatch,
                                                                request):
    """Without each optional package in turn: the commands that need it end in one `error:` line
    naming what to install and leave nothing; `info` reports it missing; the rest still run."""
    tiny_run, data, triplet = sweep_inputs
    onnx_file = request.getfixturevalue("exported")["fp32"][0] if package == "onnxruntime" else None
    hide(monkeypatch, package)
    work = tmp_path / "work"
    work.mkdir()

    def one_line(argv: list[str]) -> str:
        res = runner.invoke(app, [str(a) for a in argv])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert "Traceback" not in res.output and not list(work.iterdir())
        return lines[0]

    export = ["export", tiny_run, "--out", work / "export", "--min-size", "32", "--max-size", "64",
              "--parity-steps", "1", "--no-fp16"]
    if package == "tensorrt":
        assert "--trt" in one_line(export + ["--no-onnx", "--trt"])
    else:
        assert package in one_line(export) and "pip install" in one_line(export)
    if package == "onnxruntime":
        fuse = ["fuse", *triplet, "-m", onnx_file, "--out", work / "o.png", "--no-progress"]
        assert "onnx runtime is not installed" in one_line(fuse).lower()
        info = runner.invoke(app, ["info"])
        assert info.exit_code == 0 and "  onnx: no" in info.output, info.output
    res = runner.invoke(app, ["fuse", *triplet, "-m", str(tiny_run), "--engine", "torch", "--steps", "1",
                              "--out", str(work / "o.png"), "--no-progress"])
    assert res.exit_code == 0, res.output
