"""The package walls: dependencies run one way, downwards (README, "Layout").

Every module of the project belongs to one layer; a module may import only from the layers its own
layer allows. Imports are read from the source with `ast`, function-local ones included, so a lazy
import cannot tunnel through a wall.

The benchmarks (benchmarks/*.py) sit on top of every layer, as the CLI does: they may import any
module of the library, and of each other only the shared modules (SHARED_BENCHMARKS: the proxy test
cases, the pytest suites' set-up), never another study. The library never imports a benchmark.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tfsdeploy", "engines", "export", "training")
# The benchmark modules others may import (as `benchmarks.NAME` or, from a script's folder, `NAME`)
SHARED_BENCHMARKS = {"cases", "conftest"}

# layer -> the layers it may import from (itself included)
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "engines": {"core", "engines"},
    "export": {"core", "engines", "export"},
    "pipeline": {"core", "engines", "export", "pipeline"},  # export: long jobs compile on first use
    "training": {"core", "data", "engines", "training"},
    "tools": {"core", "data", "engines", "export", "pipeline", "tools"},
    "cli": {"core", "data", "engines", "export", "pipeline", "training", "tools", "cli"},
}


def layer_of(module: str) -> str | None:
    """The layer of a project module (dotted name), or None for a module no layer claims."""
    top = module.split(".")[0]
    if top in ("engines", "export", "training"):
        return top
    if module in ("tfsdeploy.cli", "tfsdeploy.__main__") or module.startswith("tfsdeploy.cli."):
        return "cli"
    if module == "tfsdeploy.pipeline":
        return "pipeline"
    for prefix, layer in (("tfsdeploy.data", "data"), ("tfsdeploy.tools", "tools")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    core = {"__init__", "errors", "config", "model", "diffusion", "fusion", "metrics", "report_metrics", "imaging",
            "inputs", "iospec", "checkpoint", "fileio", "paths", "artifacts", "bundle", "modelref", "lpips", "scans",
            "ensemble", "batching",
            "volumes", "dicom", "dicomout", "pacs", "loopgraph"}
    if top == "tfsdeploy" and (module == "tfsdeploy" or module.split(".", 1)[1] in core):
        return "core"
    return None


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def wall_violations(modules: dict[str, Path]) -> list[str]:
    problems: list[str] = []
    for name, path in modules.items():
        mine = layer_of(name)
        if mine is None:
            problems.append(f"{name}: belongs to no layer (add it to layer_of and to the README's layout)")
            continue
        for imp in sorted(imports_of(path)):
            if imp.split(".")[0] not in PACKAGES or imp not in modules and imp.rsplit(".", 1)[0] not in modules:
                continue
            target = imp if imp in modules else imp.rsplit(".", 1)[0]
            theirs = layer_of(target)
            message = f"{name} ({mine}) imports {target} ({theirs})"
            if theirs is not None and theirs not in ALLOWED[mine] and message not in problems:
                problems.append(message)
    return problems


def test_every_import_runs_down_the_layers():
    problems = wall_violations(project_modules())
    assert not problems, "imports that cross a wall the wrong way:\n" + "\n".join(problems)


def test_the_checker_sees_function_local_imports_and_unassigned_modules(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from training.train import train\n    return train\n")
    (tmp_path / "n.py").write_text("from engines import loader\n")
    modules = {"tfsdeploy.model": tmp_path / "m.py", "training.train": tmp_path / "m.py",
               "tfsdeploy.config": tmp_path / "n.py", "engines.loader": tmp_path / "n.py",
               "tfsdeploy.newthing": tmp_path / "n.py"}
    problems = wall_violations(modules)
    assert "tfsdeploy.model (core) imports training.train (training)" in problems
    assert "tfsdeploy.config (core) imports engines.loader (engines)" in problems
    assert any(p.startswith("tfsdeploy.newthing: belongs to no layer") for p in problems)


def benchmark_modules() -> dict[str, Path]:
    return {f.stem: f for f in sorted((ROOT / "benchmarks").glob("*.py"))}


def benchmark_named(imp: str, benchmarks: dict[str, Path]) -> str | None:
    """The benchmark module an import names (`benchmarks.cases`, or `cases` from a script's folder)."""
    parts = imp.split(".")
    if parts[0] == "benchmarks":
        return parts[1] if len(parts) > 1 else "benchmarks"
    return parts[0] if parts[0] in benchmarks else None


def benchmark_violations(library: dict[str, Path], benchmarks: dict[str, Path]) -> list[str]:
    problems: list[str] = []
    for name, path in library.items():
        for imp in sorted(imports_of(path)):
            target = benchmark_named(imp, benchmarks)
            if target is not None:
                problems.append(f"{name} (library) imports benchmarks/{target}.py")
    for name, path in benchmarks.items():
        for imp in sorted(imports_of(path)):
            target = benchmark_named(imp, benchmarks)
            if target is not None and target != name and target not in SHARED_BENCHMARKS:
                problems.append(f"benchmarks/{name}.py imports benchmarks/{target}.py, not a shared one "
                                f"({', '.join(sorted(SHARED_BENCHMARKS))})")
    return sorted(set(problems))


def test_benchmarks_import_the_library_and_shared_cases_only():
    benchmarks = benchmark_modules()
    assert "cases" in benchmarks and len(benchmarks) > 2  # the checker sees the folder
    problems = benchmark_violations(project_modules(), benchmarks)
    assert not problems, "imports between the library and the benchmarks:\n" + "\n".join(problems)


def test_the_benchmark_checker_sees_studies_importing_studies_and_the_library_importing_benchmarks(tmp_path):
    (tmp_path / "study.py").write_text("from benchmarks.cases import SIZE\nimport tfsdeploy.cli\n")
    (tmp_path / "other.py").write_text("def f():\n    from study import main\n    return main\n")
    (tmp_path / "lib.py").write_text("def f():\n    import benchmarks.cases\n")
    (tmp_path / "lib2.py").write_text("from cases import SIZE\n")
    benchmarks = {"cases": tmp_path / "study.py", "study": tmp_path / "study.py", "other": tmp_path / "other.py"}
    problems = benchmark_violations({"tfsdeploy.model": tmp_path / "lib.py", "engines.x": tmp_path / "lib2.py"},
                                    benchmarks)
    assert problems == sorted([
        "benchmarks/other.py imports benchmarks/study.py, not a shared one (cases, conftest)",
        "engines.x (library) imports benchmarks/cases.py",
        "tfsdeploy.model (library) imports benchmarks/cases.py"])


@pytest.mark.parametrize("module", ["tfsdeploy.pipeline", "export.onnx_export", "export.trt_build", "tfsdeploy.cli"])
def test_fusing_and_exporting_do_not_load_the_dataset_builder(module):
    code = (f"import sys, {module}; "
            "bad = [m for m in ('nibabel', 'tfsdeploy.data', 'training', 'onnxruntime', 'tensorrt') if m in sys.modules]; "
            "print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing {module} loaded {res.stdout.strip()}"
