import json

import pytest

from rgnn.config import TrainConfig, load_file, parse_args, resolve


def test_defaults_depend_on_data():
    syn, _ = parse_args([])
    assert syn.dataset == "synthetic" and syn.backbone == "small"
    coco, _ = parse_args(["--coco-root", "/data/coco"])
    assert coco.backbone == "vgg16" and coco.epochs == [10, 10, 10, 20]  # the paper's, section 4.2
    assert (coco.train_split, coco.val_split) == ("train2017", "val2017")
    voc, _ = parse_args(["--voc-root", "/data/VOC2007"])
    assert (voc.train_split, voc.val_split) == ("trainval", "test")


def test_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gate: feature\nlr: 0.001\nepochs: [1, 2, 3, 4]\n")
    cfg, summary = parse_args(["--config", str(f), "--lr", "0.01", "--summary", "s.json"])
    assert (cfg.gate, cfg.lr, cfg.epochs, summary) == ("feature", 0.01, [1, 2, 3, 4], "s.json")


def test_saved_config_round_trips(tmp_path):
    cfg, _ = parse_args(["--gate", "none", "--epochs", "1,0,0,2"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg.to_dict()))
    again, _ = parse_args(["--config", str(f)])
    assert again == cfg


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "1,2,3"], "four counts"),
    (["--coco-root", "a", "--voc-root", "b"], "at most one"),
    (["--start-stage", "joint"], "init-checkpoint"),
])
def test_bad_settings(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_bad_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"gate": "region", "typo_field": 1}))
    with pytest.raises(ValueError, match="typo_field"):
        load_file(f)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_file(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="lambda_schedule"):
        resolve(TrainConfig(lambda_schedule="sawtooth"))


def test_flat_params_are_strings():
    cfg, _ = parse_args(["--smoke-test"])
    flat = cfg.flat()
    assert all(isinstance(v, str) for v in flat.values())
    assert json.loads(flat["epochs"]) == cfg.epochs
