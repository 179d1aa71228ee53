"""The layers, as packages: what each package of rgnn/ may import, with Ray and MLflow at the edges.

    rgnn.boxes, .scales, .metrics, .tables, .cli   the base: geometry, area bins, AP, tables, user errors
    rgnn.nn        the network and its losses             base
    rgnn.io        files, checkpoints, redaction          base, nn
    rgnn.data      records, readers, proposals, shards    base, io
    rgnn.train     config, schedule, engine, stages       base, nn, io, data
    rgnn.infer     predict, evaluate, visualize           base, nn, io, data, train
    rgnn.tracking  everything MLflow                      all of the above

No module of rgnn/ imports Ray; only rgnn.tracking imports MLflow, even inside a function (a command's
`main` may import rgnn.tracking to log, and rgnn.io.checkpoint hands an MLflow URI or Model folder to
rgnn.tracking.models, importing it then). Outside rgnn/, cluster/, tune/ and sharding/ import no MLflow
at module level: they open, end and read runs through rgnn.tracking; sharding/ imports nothing of
cluster/ (cluster/ builds shards through it). The static rules are read from the source; the
fresh-interpreter checks load the modules.
"""
from __future__ import annotations

import ast
import re
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rgnn

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(rgnn.__path__, "rgnn."))
BASE = {"rgnn.boxes", "rgnn.scales", "rgnn.metrics", "rgnn.tables", "rgnn.cli"}
MAY_IMPORT = {
    "base": BASE,
    "rgnn.nn": BASE,
    "rgnn.io": BASE | {"rgnn.nn"},
    "rgnn.data": BASE | {"rgnn.io"},
    "rgnn.train": BASE | {"rgnn.nn", "rgnn.io", "rgnn.data"},
    "rgnn.infer": BASE | {"rgnn.nn", "rgnn.io", "rgnn.data", "rgnn.train"},
    "rgnn.tracking": BASE | {"rgnn.nn", "rgnn.io", "rgnn.data", "rgnn.train", "rgnn.infer"},
}
ENGINE = ("rgnn.nn.model", "rgnn.nn.gates", "rgnn.nn.pooling", "rgnn.nn.backbones", "rgnn.nn.losses",
          "rgnn.train.schedule", "rgnn.train.engine", "rgnn.train.stages", "rgnn.metrics", "rgnn.data.shards",
          "rgnn.data.transforms")


def package_of(module: str) -> str:
    parts = module.split(".")
    return "base" if len(parts) == 2 and not (ROOT / "rgnn" / parts[1]).is_dir() else ".".join(parts[:2])


def module_level_imports(path: Path) -> set[str]:
    """The modules a file imports outside any function (what importing it loads)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        nodes = [node] + ([n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                          if isinstance(node, (ast.If, ast.Try, ast.ClassDef)) else [])
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names if n.module == "rgnn"}
    return out


def all_imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
    return out


def source(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_by(modules: list[str]) -> set[str]:
    """The top-level packages in sys.modules after importing each of `modules` in a fresh interpreter."""
    code = ("import sys, importlib\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_every_rgnn_module_is_in_a_layer():
    assert {"rgnn.train.stages", "rgnn.infer.predict", "rgnn.data.transforms", "rgnn.boxes",
            "rgnn.tracking.runs", "rgnn.nn.model", "rgnn.io.checkpoint"} <= set(MODULES)
    assert {package_of(m) for m in MODULES} == set(MAY_IMPORT)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_only_its_layers_below(module):
    own = package_of(module)
    for name in module_level_imports(source(module)):
        top = name.split(".")[0]
        assert top != "ray", f"{module} imports Ray"
        assert top != "mlflow" or own == "rgnn.tracking", f"{module} imports MLflow outside rgnn.tracking"
        if top == "rgnn" and name != "rgnn":
            target = ".".join(name.split(".")[:2])  # a base module or a layer package
            assert package_of(target) == own or target in MAY_IMPORT[own], f"{module} ({own}) imports {name}"


def test_no_rgnn_module_imports_ray_even_inside_a_function():
    for module in MODULES:
        assert not any(n.split(".")[0] == "ray" for n in all_imports(source(module))), module


def test_only_rgnn_tracking_imports_mlflow_even_inside_a_function():
    for module in MODULES:
        if package_of(module) != "rgnn.tracking":
            assert not any(n.split(".")[0] == "mlflow" for n in all_imports(source(module))), module


def test_cluster_tune_and_sharding_import_no_mlflow_at_module_level():
    """They reach MLflow through rgnn.tracking (its runs' lifecycle, what is read back from them)."""
    files = sorted(f for folder in ("cluster", "tune", "sharding") for f in (ROOT / folder).rglob("*.py"))
    assert {"driver.py", "ablation.py", "search.py", "job.py"} <= {f.name for f in files}
    for path in files:
        assert not any(n.split(".")[0] == "mlflow" for n in module_level_imports(path)), path.relative_to(ROOT)


def test_the_rules_catch_an_upward_import(tmp_path):
    """The static check itself: an nn module importing tracking is seen."""
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom rgnn.tracking.runs import RunLogger\ntry:\n    import mlflow\nexcept ImportError:\n    pass\n")
    names = module_level_imports(bad)
    assert {"rgnn.tracking.runs", "mlflow"} <= names
    assert package_of("rgnn.tracking.runs") not in MAY_IMPORT["rgnn.nn"]


def test_no_rgnn_module_loads_ray():
    assert "ray" not in imported_by(MODULES)


def test_engine_and_model_load_neither_ray_nor_mlflow():
    loaded = imported_by(list(ENGINE))
    assert "torch" in loaded and "ray" not in loaded and "mlflow" not in loaded


def test_redaction_and_storage_load_no_torch():
    """A tracking URI or a storage path is redacted without loading torch or the model."""
    assert "torch" not in imported_by(["rgnn.io.redaction", "rgnn.io.storage"])


def test_the_shard_format_loads_no_torch():
    """The writer (the sharding actors) and the reader share rgnn.data.shardformat: it must stay torch-free."""
    assert "torch" not in imported_by(["rgnn.data.shardformat"])


def test_sharding_imports_nothing_of_cluster(tmp_path):
    """cluster/ builds shards through sharding/; an import back (even inside a function) is a cycle."""
    bad = tmp_path / "m.py"
    bad.write_text("def start():\n    from cluster.ray_setup import init_ray\n")
    assert "cluster.ray_setup" in all_imports(bad)  # the check sees an import inside a function
    files = sorted((ROOT / "sharding").rglob("*.py"))
    assert {"job.py", "build_shards.py", "ray_setup.py"} <= {f.name for f in files}
    for path in files:
        assert not any(n.split(".")[0] == "cluster" for n in all_imports(path)), path.relative_to(ROOT)


def test_the_sharding_actors_code_does_not_load_torch():
    """Its actors start in about half the time and memory without torch (sharding/job.py)."""
    code = "import sys, sharding.build_shards, sharding.job\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_the_project_speaks_of_itself_alone():
    """No tracker numbers or notes of how it was built in the code, tests, benchmarks, docs or README."""
    words = ["not " + "drawn", "the " + "issue's"]  # spelled apart so that this file does not match itself
    pattern = re.compile(r"\bissues? #?\d+|\bstop \d+\b|" + "|".join(words), re.IGNORECASE)
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.yaml", ".ci/*"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    found = [f"{path}:{i}" for path in tracked for i, line in enumerate((ROOT / path).read_text().splitlines(), 1)
             if pattern.search(line)]
    assert found == []


MAX_LINES = 60


def long_functions(path: Path) -> list[str]:
    """The functions of a file longer than MAX_LINES, but for argument tables (at least half of their
    lines inside `add_argument` calls)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        table = {line for call in ast.walk(node) if isinstance(call, ast.Call)
                 and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
                 for line in range(call.lineno, call.end_lineno + 1)}
        if length > MAX_LINES and len(table) < length / 2:
            found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_sixty_lines_but_argument_tables():
    sources = [p for folder in ("rgnn", "cluster", "sharding", "tune", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 40
    assert [f for path in sources for f in long_functions(path)] == []


def test_the_length_rule_catches_a_long_function_and_spares_an_argument_table(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    table = "".join(f"    p.add_argument('--a{i}')\n" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\ndef parser(p):\n{table}")
    assert [f.split()[1] for f in long_functions(tmp_path / "m.py")] == ["long"]
