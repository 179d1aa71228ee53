"""Every benchmark runs end to end in its tiny CPU setting, and prints its figures (no speed is
asserted here: a figure must be there and finite, not fast)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
NUMBER = r"([-+0-9.eE]+|nan|inf)"


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
    small, efficientnet = rows  # only EfficientNet-Lite0 has a frozen front to hold
    assert "held_front_speedup" not in small and efficientnet["rgnn_held_front_step_s"] > 0
    sys.modules.pop("model_step", None)


def _script(name: str, *args: str) -> str:
    """The stdout of `python benchmarks/<name>.py *args`, run from the checkout without Ray."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    run = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def _figures(pattern: str, text: str) -> list[float]:
    """The numbers of `pattern`'s groups on the line it matches, each finite and positive."""
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in:\n{text}"
    values = [float(g) for g in match.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), (pattern, values)
    return values


def test_proposals_benchmark_tiny(tmp_path):
    out = tmp_path / "proposals.json"
    text = _script("proposals", "--images", "2", "--size", "160,120", "--no-photos", "--shard-images", "4",
                   "--shard-actors", "0", "--out", str(out))
    *_, r50, r70 = _figures(
        rf"^\s+synthetic\s+160x120\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", text)
    assert r50 <= 1 and r70 <= r50
    _figures(rf"^synthetic: {NUMBER} images/s on one core", text)
    _figures(rf"^shard job, in this process: 4 images 160x120 in {NUMBER} s, {NUMBER} images/s$", text)
    result = json.loads(out.read_text())
    assert result["proposals"]["rows"]["synthetic"]["images"] == 2 and "photos" not in result["proposals"]["rows"]
    assert result["shard_job"]["ray_cpus"] is None and list(result["shard_job"]["actors"]) == ["0"]


def test_train_throughput_benchmark_tiny(tmp_path):
    out = tmp_path / "train_throughput.json"
    text = _script("train_throughput", "--tiny", "--steps", "1", "--warmup", "1", "--out", str(out))
    assert re.search(r"^joint stage, small backbone, batch 2/worker, shorter side 96, T=16", text, re.MULTILINE), text
    _figures(rf"^  training, 1 worker : +{NUMBER} images/s$", text)
    _figures(rf"^  training, 2 workers: +{NUMBER} images/s   scaling efficiency {NUMBER} ", text)
    _figures(rf"^  input pipeline     : +{NUMBER} images/s   {NUMBER}x the 1-worker", text)
    result = json.loads(out.read_text())
    assert result["tiny"] and result["batch_per_worker"] == 2 and result["max_regions"] == 16


def test_gate_probe_tiny(tmp_path):
    out = tmp_path / "gate_probe.json"
    text = _script("gate_probe", "--train", "6", "--val", "4", "--regions", "16", "--epochs", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["gate"] for r in rows] == ["linear, L2 0.001", "linear, L2 0.01", "linear, L2 0.1", "hidden layer of 256"]
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("all", "far", "near")), r
        assert f"{r['gate']:28s} {r['all']:8.3f}" in text
    assert re.search(r"102 train / 68 val regions", text)  # 16 proposals + the whole image, every image


def test_region_classifier_counts_fc8_on_each_true_box(trained, synthetic_root, tmp_path):
    """As the README runs it; its counts are those of fc8's arg-max on every true box put through the
    model alone (the whole image appended after it, as the model does)."""
    import torch

    from rgnn.data.coco import read_coco
    from rgnn.data.images import decode_image
    from rgnn.infer.predict import Predictor

    out = tmp_path / "region_classifier.json"
    text = _script("region_classifier", "--checkpoint", str(trained / "ckpt"), "--coco-root", str(synthetic_root),
                   "--out", str(out))
    result = json.loads(out.read_text())
    predictor = Predictor.load(trained / "ckpt")
    labeled = read_coco(synthetic_root, "val2017")
    right = dict.fromkeys(labeled.class_names, 0)
    boxes = dict.fromkeys(labeled.class_names, 0)
    for record in labeled.records:
        image = decode_image(record.path)
        for box, c in zip(record.gt_boxes, record.gt_classes):
            p = predictor.preprocess(image, box[None, :0].reshape(0, 4), box[:0], box[None])
            with torch.no_grad():
                f = predictor.model.forward_features(p.image[None], torch.tensor([p.size]), [p.gt_boxes], open_gates=True)
            name = labeled.class_names[c]
            boxes[name] += 1
            right[name] += int(predictor.model.fc8(f.h7[:1]).argmax(1).item() == c)
    assert result["per_class"] == {n: [right[n], boxes[n]] for n in labeled.class_names}
    assert result["boxes"] == sum(len(r.gt_boxes) for r in labeled.records) > 0
    assert f"right class on {result['right']} of {result['boxes']} true val2017 boxes" in text
