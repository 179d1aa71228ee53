"""Using a trained model: rgnn.infer.predict on a folder with a broken file, rgnn.infer.evaluate's table against
the metrics module, and rgnn.infer.visualize's Figure 3 file."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rgnn.io.checkpoint import load_checkpoint, save_checkpoint
from rgnn.train.config import TrainConfig
from rgnn.data import shards
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.data.voc import VOC_CLASSES, read_voc
from rgnn.infer.evaluate import main as evaluate_main
from rgnn.metrics import average_precision, multilabel_prf
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.infer.predict import Prediction, Predictor, describe, main as predict_main
from rgnn.train.stages import validate
from rgnn.infer.visualize import class_gates, main as visualize_main

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MAINS = {"rgnn.infer.predict": predict_main, "rgnn.infer.evaluate": evaluate_main, "rgnn.infer.visualize": visualize_main}


def scores_in_batches(predictor: Predictor, paths: list[str], batch: int) -> np.ndarray:
    """float[N, C] sigmoid scores of `predictor` (its own proposals), `batch` images per forward pass."""
    return np.stack([p.scores for i in range(0, len(paths), batch)
                     for p in predictor([decode_image(f) for f in paths[i:i + batch]])])


def test_predict_folder_with_broken_and_mixed_files(trained, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    jpgs = sorted((synthetic_root / "val2017").glob("*.jpg"))[:2]
    for f in jpgs:
        shutil.copy(f, folder / f.name)
    rgb = decode_image(jpgs[0])
    cv2.imwrite(str(folder / "colour.png"), rgb[..., ::-1])
    cv2.imwrite(str(folder / "grey.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    (folder / "broken.jpg").write_bytes(jpgs[1].read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.json"
    predict_main(["--checkpoint", str(trained / "ckpt"), str(folder), str(tmp_path / "gone.jpg"), "--out", str(out),
                  "--batch-size", "3"])
    result = json.loads(out.read_text())
    assert sorted(p["file"].split("/")[-1] for p in result["predictions"]) == sorted(
        [f.name for f in jpgs] + ["colour.png", "grey.png"])
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in result["skipped"]}
    assert sorted(reasons) == ["broken.jpg", "gone.jpg", "notes.txt"]
    assert reasons["gone.jpg"] == "no such file or folder"
    assert "cannot decode image" in reasons["broken.jpg"] and "cannot decode image" in reasons["notes.txt"]
    err = capsys.readouterr().err
    assert all(f"skipped {s['file']}: {s['reason']}" in err for s in result["skipped"])
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed
    for p in result["predictions"]:
        assert set(p["scores"]) == set(result["classes"]) and len(result["classes"]) == 10
        assert all(0.0 <= s <= 1.0 for s in p["scores"].values())
        assert p["labels"] == [n for n in result["classes"] if p["scores"][n] >= 0.5]
        gates = [r["gate"] for r in p["top_regions"]]
        assert len(gates) == 5 and gates == sorted(gates, reverse=True)

    # the boxes are the image's own EdgeBoxes proposals (or the whole image), in its original pixels
    predictor = Predictor.load(trained / "ckpt")
    h, w = rgb.shape[:2]
    boxes, _ = predictor.propose(rgb)
    candidates = np.vstack([boxes[:12], [[0, 0, w, h]]])  # (T + 1, 4): T = 12 as trained
    colour = next(p for p in result["predictions"] if p["file"].endswith("colour.png"))
    for r in colour["top_regions"]:
        assert np.abs(candidates - np.array(r["box"])).max(axis=1).min() < 0.1, r["box"]
    # the PNG holds the JPEG's decoded pixels: the same prediction
    jpg = next(p for p in result["predictions"] if p["file"].endswith(jpgs[0].name))
    assert {k: v for k, v in jpg.items() if k != "file"} == {k: v for k, v in colour.items() if k != "file"}


def test_predict_from_an_mlflow_model_uri(trained, synthetic_root, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(trained / "ckpt"), "model")  # a checkpoint folder as plain artifacts
    image = str(sorted((synthetic_root / "val2017").glob("*.jpg"))[0])
    by_uri = predict_main(["--checkpoint", f"runs:/{run.info.run_id}/model", image, "--out", str(tmp_path / "a.json")])
    by_path = predict_main(["--checkpoint", str(trained / "ckpt"), image, "--out", str(tmp_path / "b.json")])
    assert by_uri["predictions"] == by_path["predictions"] and len(by_uri["predictions"]) == 1


def test_prediction_json_per_label_regions_for_feature_gates():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    boxes = rng.uniform(0, 50, (8, 4)).astype(np.float32)
    gates = rng.uniform(size=(8, 3)).astype(np.float32)  # (R, C): feature-level gates, one per class
    doc = describe(Prediction(np.array([0.9, 0.2, 0.6]), boxes, gates), names, threshold=0.5, top=2)
    assert doc["labels"] == ["a", "c"] and set(doc["top_regions_by_label"]) == {"a", "c"}
    for name, regions in doc["top_regions_by_label"].items():
        best = np.argsort(-gates[:, names.index(name)])[:2]
        assert [r["box"] for r in regions] == [[round(float(v), 1) for v in boxes[i]] for i in best]
    assert [r["gate"] for r in doc["top_regions"]] == [round(float(g), 4) for g in np.sort(gates.max(1))[::-1][:2]]
    region_level = describe(Prediction(np.array([0.9, 0.2, 0.6]), boxes, gates[:, 0]), names, 0.5)
    assert "top_regions_by_label" not in region_level and len(region_level["top_regions"]) == 5


@pytest.mark.parametrize("module", sorted(MAINS))
def test_missing_checkpoint_is_a_clear_error(module, synthetic_root, tmp_path):
    image = str(sorted((synthetic_root / "val2017").glob("*.jpg"))[0])
    args = {"rgnn.infer.predict": [image], "rgnn.infer.evaluate": ["--coco-root", str(synthetic_root)],
            "rgnn.infer.visualize": [image, "--out", str(tmp_path / "f.png")]}[module]
    with pytest.raises(SystemExit, match=f"error: checkpoint not found: {tmp_path}/missing"):
        MAINS[module](["--checkpoint", str(tmp_path / "missing"), *args])


def test_missing_edge_model_of_training_is_named(trained, tmp_path):
    names = shards.class_names(trained / "shards" / "val2017")
    save_checkpoint(tmp_path / "sed", RGNN(ModelConfig(num_classes=10)), names, {"edge_model": "/gone/model.yml.gz"},
                    stage="joint")
    with pytest.raises(SystemExit, match="edge model file not found: /gone/model.yml.gz.*--edge-model"):
        predict_main(["--checkpoint", str(tmp_path / "sed"), str(tmp_path)])


@pytest.mark.parametrize("module", sorted(MAINS))
def test_cli_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        MAINS[module](["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and f"usage: python -m {module}" in text and "--checkpoint" in text


def _csv_rows(path) -> dict[str, list[str]]:
    rows = list(csv.reader(path.open()))
    return {r[0]: r[1:] for r in rows[1:]} | {"header": rows[0][1:]}


def test_evaluate_table_equals_the_metrics_module(trained, synthetic_root, tmp_path, capsys):
    ckpt = str(trained / "ckpt")
    metrics = evaluate_main(["--checkpoint", ckpt, "--coco-root", str(synthetic_root), "--batch-size", "4",
                             "--markdown", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")])
    labeled = read_coco(synthetic_root, "val2017")
    scores = scores_in_batches(Predictor.load(ckpt), [r.path for r in labeled.records], 4)  # same batches
    targets = np.stack([r.target(10) for r in labeled.records])
    ap = average_precision(scores, targets, mode="area")
    np.testing.assert_allclose(metrics[ckpt]["ap"], ap, rtol=1e-6)
    for k, v in multilabel_prf(scores, targets).items():
        assert metrics[ckpt][k] == pytest.approx(v), k
    rows = _csv_rows(tmp_path / "t.csv")
    assert rows["header"] == [*labeled.class_names, "mAP"]
    assert rows[ckpt] == ["-" if np.isnan(a) else f"{100 * a:.1f}" for a in ap] + [f"{100 * np.nanmean(ap):.1f}"]
    printed = capsys.readouterr().out
    assert "area under the precision-recall curve" in printed and f"CF1 {100 * metrics[ckpt]['CF1']:.1f}" in printed
    md = (tmp_path / "t.md").read_text()
    assert "area under the precision-recall curve" in md and md.count("\n|") == 3 and "OF1" in md

    # the README's command in a fresh interpreter, default flags: two checkpoints (the same weights) -> two rows
    copy = shutil.copytree(trained / "ckpt", tmp_path / "copy")
    run = subprocess.run([sys.executable, "-m", "rgnn.infer.evaluate", "--checkpoint", ckpt, "--checkpoint", str(copy),
                          "--coco-root", str(synthetic_root), "--markdown", str(tmp_path / "two.md")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = (tmp_path / "two.md").read_text()
    rows = [line.split("|")[2:] for line in two.splitlines() if line.startswith(("| " + ckpt, f"| {copy}"))]
    assert len(rows) == 2 and rows[0] == rows[1] and two.count("\n|") == 4

    # from the shards: the same numbers as training's own evaluation of the same model
    cfg = TrainConfig.from_flat(json.loads((trained / "ckpt" / "config.json").read_text()))
    model, _ = load_checkpoint(ckpt)
    expected = validate(model, "joint", trained / "shards" / "val2017", cfg.input, cfg.schedule.batch_size)
    from_shards = evaluate_main(["--checkpoint", ckpt, "--shards", str(trained / "shards"), "--batch-size", "12"])
    np.testing.assert_allclose(from_shards[ckpt]["ap"], expected["ap"], rtol=1e-6)
    assert from_shards[ckpt]["OF1"] == pytest.approx(expected["OF1"])


def _voc2007(synthetic_root, tmp_path):
    """The synthetic val images as a VOC 2007 test set: class k of the synthetic set is VOC class k;
    in the first image every box of its first class is `difficult`."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    recs = read_coco(synthetic_root, "val2017").records
    for i, r in enumerate(recs):
        shutil.copy(r.path, root / "JPEGImages" / f"{i:06d}.jpg")
        objs = "".join(
            f"<object><name>{VOC_CLASSES[c]}</name><difficult>{int(i == 0 and c == r.gt_classes[0])}</difficult>"
            f"<bndbox><xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin><xmax>{x2:.0f}</xmax><ymax>{y2:.0f}</ymax>"
            f"</bndbox></object>" for (x1, y1, x2, y2), c in zip(r.gt_boxes, r.gt_classes))
        (root / "Annotations" / f"{i:06d}.xml").write_text(
            f"<annotation><size><width>{r.width}</width><height>{r.height}</height></size>{objs}</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i:06d}\n" for i in range(len(recs))))
    return root


def test_evaluate_voc2007_rows_rule_and_difficult(synthetic_root, tmp_path, capsys):
    voc = _voc2007(synthetic_root, tmp_path)
    ckpts = []  # different T share one proposal search; the stage-1 model uses none
    models = [(4, "region", "joint"), (16, "feature", "joint"), (8, "region", "global")]
    for seed, (t, gate, stage) in enumerate(models):
        torch.manual_seed(seed)
        ckpts.append(str(save_checkpoint(tmp_path / f"m{seed}", RGNN(ModelConfig(num_classes=20, gate=gate)),
                                         VOC_CLASSES, {"image_size": 80, "max_size": 160, "max_regions": t,
                                                       "global_size": 64}, stage=stage)))
    metrics = evaluate_main([*(a for c in ckpts for a in ("--checkpoint", c)), "--voc-root", str(voc.parent),
                             "--batch-size", "5"])
    labeled = read_voc(voc, "test")
    targets = np.stack([r.target(20) for r in labeled.records])
    ignore = np.stack([r.difficult_only(20) for r in labeled.records])
    assert ignore[0].sum() == 1 and ignore.sum() == 1
    for ckpt in ckpts:
        scores = scores_in_batches(Predictor.load(ckpt), [r.path for r in labeled.records], 5)
        np.testing.assert_allclose(metrics[ckpt]["ap"], average_precision(scores, targets, "voc07", ignore))
        assert metrics[ckpt]["CF1"] == pytest.approx(multilabel_prf(scores, targets, ignore=ignore)["CF1"])
    assert np.isnan(metrics[ckpts[0]]["ap"][10:]).all()  # VOC classes the set does not have: "-"
    out = capsys.readouterr().out
    assert "voc2007/test, VOC 2007 11-point AP" in out and all(out.count(f"| {c} |") == 1 for c in ckpts)


def test_evaluate_refuses_other_classes(trained, synthetic_root, tmp_path):
    names = shards.class_names(trained / "shards" / "val2017")
    save_checkpoint(tmp_path / "other", RGNN(ModelConfig(num_classes=10)), list(reversed(names)), {}, stage="joint")
    with pytest.raises(SystemExit, match="differ"):
        evaluate_main(["--checkpoint", str(tmp_path / "other"), "--coco-root", str(synthetic_root)])


def test_visualize_writes_figure_3_at_the_image_size(trained, synthetic_root, tmp_path):
    image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
    out = tmp_path / "fig.png"  # as the README runs it: a fresh interpreter, `python -m rgnn.infer.visualize`
    run = subprocess.run([sys.executable, "-m", "rgnn.infer.visualize", "--checkpoint", str(trained / "ckpt"), str(image),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fig = cv2.imread(str(out))[..., ::-1]  # RGB
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.shape == decode_image(image).shape
    red = np.all(fig == (255, 0, 0), axis=2).sum()
    green = np.all(fig == (0, 255, 0), axis=2).sum()
    assert red > 20 and green > 20  # box outlines, not a stray pixel

    names = shards.class_names(trained / "shards" / "val2017")
    save_checkpoint(tmp_path / "ungated", RGNN(ModelConfig(num_classes=10, gate="none")), names, {}, stage="regional")
    with pytest.raises(SystemExit, match="no gate picture"):
        visualize_main([str(image), "--checkpoint", str(tmp_path / "ungated"), "--out", str(tmp_path / "x.png")])


def test_class_gates_picks_what_figure_3_draws():
    names = ["a", "b"]
    per_class = np.array([[0.1, 0.9], [0.8, 0.3]], np.float32)  # (R, C)
    np.testing.assert_array_equal(class_gates(per_class, names, "b"), per_class[:, 1])
    np.testing.assert_array_equal(class_gates(per_class, names, None), per_class[[0, 1], [1, 0]])
    np.testing.assert_array_equal(class_gates(per_class[:, 0], names, None), per_class[:, 0])
    with pytest.raises(ValueError, match="'z'"):
        class_gates(per_class, names, "z")
    with pytest.raises(ValueError, match="per region"):
        class_gates(per_class[:, 0], names, "a")
    with pytest.raises(ValueError, match="fc6/fc7"):
        class_gates(np.ones((2, 7), np.float32), names, "a")


class _Payload:
    """A pickle that would create a file when loaded with plain pickle (or weights_only=False)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("module", sorted(MAINS))
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(module, trained, synthetic_root, tmp_path):
    victim = tmp_path / "pwned"
    payload = {"model": {}, "model_config": {"num_classes": 10}, "class_names": ["a"], "x": _Payload(victim)}
    (tmp_path / "evil").mkdir()
    torch.save(payload, tmp_path / "evil" / "checkpoint.pt")
    image = str(sorted((synthetic_root / "val2017").glob("*.jpg"))[0])
    args = {"rgnn.infer.predict": [image, "--out", str(tmp_path / "p.json")], "rgnn.infer.evaluate": ["--coco-root", str(synthetic_root)],
            "rgnn.infer.visualize": [image, "--out", str(tmp_path / "f.png")]}[module]
    with pytest.raises(SystemExit, match="not a safe RGNN checkpoint"):
        MAINS[module](["--checkpoint", str(tmp_path / "evil"), *args])
    assert not victim.exists()
    with pytest.raises(ValueError, match="not a safe RGNN checkpoint"):
        load_checkpoint(tmp_path / "evil")
    assert not victim.exists()


def test_an_image_over_the_pixel_limit_is_skipped_with_its_reason(trained, synthetic_root, tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("L", (20000, 20000)).save(folder / "huge.png")  # 400 Mpx in its header, a few KB on disk
    shutil.copy(sorted((synthetic_root / "val2017").glob("*.jpg"))[0], folder / "ok.jpg")
    result = predict_main(["--checkpoint", str(trained / "ckpt"), str(folder), "--out", str(tmp_path / "p.json")])
    assert [p["file"].split("/")[-1] for p in result["predictions"]] == ["ok.jpg"]  # the rest goes on
    (skipped,) = result["skipped"]
    assert skipped["file"].endswith("huge.png") and "pixel limit" in skipped["reason"]


def test_every_folder_entry_not_predicted_is_listed_with_its_reason(trained, synthetic_root, tmp_path):
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((synthetic_root / "val2017").glob("*.jpg"))[0], folder / "ok.jpg")
    (folder / ".hidden.jpg").write_bytes((folder / "ok.jpg").read_bytes())
    (folder / "sub").mkdir()
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    result = predict_main(["--checkpoint", str(trained / "ckpt"), str(folder), "--out", str(tmp_path / "p.json")])
    assert [p["file"].split("/")[-1] for p in result["predictions"]] == ["ok.jpg"]
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in result["skipped"]}
    assert reasons == {".hidden.jpg": "hidden file", "sub": "a folder (folders are not searched recursively)",
                       "dangling.jpg": "broken symbolic link (or a link loop)",
                       "loop.jpg": "broken symbolic link (or a link loop)",
                       "pipe.jpg": "not a regular file (FIFO, socket or device)"}


def test_one_bad_image_costs_no_other_prediction_and_a_stopped_run_resumes(trained, synthetic_root, tmp_path):
    """A 3 x 2000 image (a 1-pixel side once resized, before the minimum side) is predicted; an image the
    network fails on is skipped with its reason while the rest of its batch is predicted; predictions are
    written after every batch, and a second run predicts only what the first did not."""
    from PIL import Image

    from rgnn.infer.predict import predict_files

    folder = tmp_path / "in"
    folder.mkdir()
    for i, f in enumerate(sorted((synthetic_root / "val2017").glob("*.jpg"))[:5]):
        shutil.copy(f, folder / f"{i}.jpg")
    Image.new("RGB", (3, 2000), (90, 120, 30)).save(folder / "thin.png")
    predictor = Predictor.load(trained / "ckpt")
    calls = []

    class Flaky:
        """The predictor, failing on any batch that holds the image of 2.jpg."""

        def __init__(self, bad: np.ndarray):
            self.bad, self.class_names, self.stage = bad, predictor.class_names, predictor.stage

        def __call__(self, images):
            calls.append(len(images))
            if any(im.shape == self.bad.shape and np.array_equal(im, self.bad) for im in images):
                raise RuntimeError("the network failed")
            return predictor(images)

    out = tmp_path / "p.json"
    flaky = Flaky(decode_image(str(folder / "2.jpg")))
    result = predict_files(flaky, [str(folder)], batch_size=4, progress=False, out=out)
    names = sorted(p["file"].split("/")[-1] for p in result["predictions"])
    assert names == ["0.jpg", "1.jpg", "3.jpg", "4.jpg", "thin.png"]
    assert [(s["file"].split("/")[-1], s["reason"]) for s in result["skipped"]] == \
        [("2.jpg", "prediction failed: the network failed")]
    assert json.loads(out.read_text()) == result  # written as it went
    assert calls == [4, 1, 1, 1, 1, 2]  # the failing batch again image by image, then the last batch

    calls.clear()
    shutil.copy(folder / "0.jpg", folder / "5.jpg")
    again = predict_files(predictor=Flaky(np.zeros((1, 1, 3), np.uint8)), inputs=[str(folder)], batch_size=4,
                          progress=False, out=out)
    assert calls == [2]  # 2.jpg (skipped before) and the new 5.jpg; the five predicted are kept
    assert sorted(p["file"].split("/")[-1] for p in again["predictions"]) == sorted(names + ["2.jpg", "5.jpg"])
