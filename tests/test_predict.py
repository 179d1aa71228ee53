"""Using a trained model: rgnn.predict on a folder with a broken file, rgnn.evaluate's table against
the metrics module, and rgnn.visualize's Figure 3 file."""
from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from rgnn.checkpoint import save_checkpoint
from rgnn.config import TrainConfig, resolve
from rgnn.data import shards
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.evaluate import main as evaluate_main
from rgnn.metrics import average_precision, multilabel_prf
from rgnn.model import RGNN, ModelConfig
from rgnn.predict import Predictor, main as predict_main
from rgnn.proposals import ProposalParams
from rgnn.training import model_config, run_stages
from rgnn.visualize import main as visualize_main
from sharding.build_shards import build_shards


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A small RGNN trained through all 4 stages on the tiny synthetic set, saved as cluster/ saves it."""
    out = tmp_path_factory.mktemp("trained")
    for split in ("train2017", "val2017"):
        build_shards(read_coco(synthetic_root, split), out / "shards", actors=0,
                     params=ProposalParams(max_boxes=16), progress=False)
    cfg = resolve(TrainConfig(shards=str(out / "shards"), smoke_test=True, epochs=[1, 1, 1, 1], max_regions=12,
                              image_size=96, global_size=64, batch_size=12))
    names = shards.class_names(out / "shards" / "train2017")
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    run_stages(cfg, model, names, out / "shards" / "train2017", out / "shards" / "val2017", torch.device("cpu"))
    save_checkpoint(out / "ckpt", model, names, cfg.to_dict(), stage="joint")
    return out


def test_predict_folder_with_broken_and_mixed_files(trained, synthetic_root, tmp_path):
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
    predict_main(["--checkpoint", str(trained / "ckpt"), str(folder), "--out", str(out), "--batch-size", "3"])
    result = json.loads(out.read_text())
    assert sorted(p["file"].split("/")[-1] for p in result["predictions"]) == sorted(
        [f.name for f in jpgs] + ["colour.png", "grey.png"])
    assert sorted(s["file"].split("/")[-1] for s in result["skipped"]) == ["broken.jpg", "notes.txt"]
    assert all(s["reason"] for s in result["skipped"])
    h, w = rgb.shape[:2]
    for p in result["predictions"]:
        assert set(p["scores"]) == set(result["classes"]) and len(result["classes"]) == 10
        assert p["labels"] == [n for n in result["classes"] if p["scores"][n] >= 0.5]
        gates = [r["gate"] for r in p["top_regions"]]
        assert 1 <= len(gates) <= 5 and gates == sorted(gates, reverse=True)
    colour = next(p for p in result["predictions"] if p["file"].endswith("colour.png"))
    for r in colour["top_regions"]:  # boxes in the original image's pixels
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= w + 0.1 and 0 <= y1 < y2 <= h + 0.1


def test_predict_errors_name_the_problem(trained, tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found.*missing"):
        predict_main(["--checkpoint", str(tmp_path / "missing"), str(tmp_path)])


def _csv_rows(path) -> dict[str, list[str]]:
    rows = list(csv.reader(path.open()))
    return {r[0]: r[1:] for r in rows[1:]} | {"header": rows[0][1:]}


def test_evaluate_table_equals_the_metrics_module(trained, synthetic_root, tmp_path, capsys):
    ckpt = str(trained / "ckpt")
    metrics = evaluate_main(["--checkpoint", ckpt, "--coco-root", str(synthetic_root), "--batch-size", "4",
                             "--markdown", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")])
    labeled = read_coco(synthetic_root, "val2017")
    predictor = Predictor.load(ckpt)
    recs = labeled.records
    scores = np.stack([p.scores for i in range(0, len(recs), 4)
                       for p in predictor([decode_image(r.path) for r in recs[i:i + 4]])])  # same batches
    targets = np.stack([r.target(10) for r in labeled.records])
    ap = average_precision(scores, targets, mode="area")
    np.testing.assert_allclose(metrics[ckpt]["ap"], ap, rtol=1e-6)
    assert metrics[ckpt]["CF1"] == pytest.approx(multilabel_prf(scores, targets)["CF1"])
    rows = _csv_rows(tmp_path / "t.csv")
    assert rows["header"] == [*labeled.class_names, "mAP"]
    assert rows[ckpt][-1] == f"{100 * np.nanmean(ap):.1f}"
    assert [c for c in rows[ckpt][:-1]] == ["-" if np.isnan(a) else f"{100 * a:.1f}" for a in ap]
    assert "area under the precision-recall curve" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text().count("|") > 10

    from_shards = evaluate_main(["--checkpoint", ckpt, "--shards", str(trained / "shards")])
    assert 0.0 <= from_shards[ckpt]["mAP"] <= 1.0 and len(from_shards[ckpt]["ap"]) == 10


def test_evaluate_refuses_other_classes(trained, synthetic_root, tmp_path):
    names = shards.class_names(trained / "shards" / "val2017")
    save_checkpoint(tmp_path / "other", RGNN(ModelConfig(num_classes=10)), list(reversed(names)), {}, stage="joint")
    with pytest.raises(SystemExit, match="differ"):
        evaluate_main(["--checkpoint", str(tmp_path / "other"), "--coco-root", str(synthetic_root)])


def test_visualize_writes_figure_3_at_the_image_size(trained, synthetic_root, tmp_path):
    image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
    out = visualize_main([str(image), "--checkpoint", str(trained / "ckpt"), "--out", str(tmp_path / "fig.png")])
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
