"""The GPU step benchmark runs end to end in its tiny CPU setting (no speed is asserted here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_step_benchmark_quick_on_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_step

    out = tmp_path / "gpu_step.json"
    result = gpu_step.main(["--setting", "quick", "--device", "cpu", "--out", str(out)])
    assert [(r["precision"], r["memory_format"]) for r in result["rows"]] == [
        ("fp32", "contiguous"), ("fp32", "channels_last"), ("bf16", "contiguous"), ("bf16", "channels_last")]
    for r in result["rows"]:
        assert r["rgnn_images_per_s"] > 0 and r["global_images_per_s"] > 0 and r["rgnn_peak_gib"] is None
    assert json.loads(out.read_text())["rows"][0]["regions"] == 16
    sys.modules.pop("gpu_step", None)
