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


def _bench(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop(name, None)
    return __import__(name)


def test_inference_benchmark_tiny(tmp_path, monkeypatch):
    inference = _bench("inference", monkeypatch)
    result = inference.main(["--backbones", "small,efficientnet_lite0", "--regions", "16", "--images", "1",
                             "--threads", "1", "--out", str(tmp_path / "inference.json")])
    assert [r["backbone"] for r in result["rows"]] == ["small", "efficientnet_lite0"]
    assert all(r["network_ms"] > 0 and r["proposals_ms"] > 0 and r["regions_found"] <= 16 for r in result["rows"])
    assert result["rows"][1]["input_shorter_side"] == 288  # the photo recipe's input
    sys.modules.pop("inference", None)


def test_model_step_benchmark_tiny_with_efficientnet(tmp_path, monkeypatch):
    model_step = _bench("model_step", monkeypatch)
    result = model_step.main(["--quick", "--backbones", "small,efficientnet_lite0", "--regions", "16",
                              "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "model_step.json")])
    rows = result["rows"]
    assert [(r["backbone"], r["T"]) for r in rows] == [("small", 16), ("efficientnet_lite0", 16)]
    assert all(r["rgnn_step_s"] > 0 and r["global_step_s"] > 0 for r in rows)
    sys.modules.pop("model_step", None)
