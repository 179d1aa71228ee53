"""Ray and MLflow stay at the edges: no module of rgnn/ imports Ray, and the training engine and the
model import neither Ray nor MLflow (each module is imported in a fresh interpreter)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import rgnn

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(rgnn.__path__, "rgnn."))
ENGINE = ("rgnn.model", "rgnn.gates", "rgnn.pooling", "rgnn.backbones", "rgnn.losses", "rgnn.schedule",
          "rgnn.engine", "rgnn.training", "rgnn.metrics", "rgnn.data.shards", "rgnn.data.transforms")


def imported_by(modules: list[str]) -> set[str]:
    """The top-level packages in sys.modules after importing each of `modules` in a fresh interpreter."""
    code = ("import sys, importlib\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_every_rgnn_module_is_found():
    assert {"rgnn.training", "rgnn.predict", "rgnn.data.transforms", "rgnn.boxes"} <= set(MODULES)


def test_no_rgnn_module_imports_ray():
    assert "ray" not in imported_by(MODULES)


def test_engine_and_model_import_neither_ray_nor_mlflow():
    loaded = imported_by(list(ENGINE))
    assert "torch" in loaded and "ray" not in loaded and "mlflow" not in loaded


def test_the_sharding_actors_code_does_not_load_torch():
    """Its actors start in about half the time and memory without torch (sharding/build_shards.py)."""
    code = "import sys, sharding.build_shards, sharding.job\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
