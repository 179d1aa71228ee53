"""rgnn.train.pretrain: the ImageNet stand-in for the small backbone (tiny settings: seconds)."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rgnn.train import pretrain
from rgnn.nn.backbones import build_backbone
from rgnn.data import synthetic
from rgnn.train.pretrain import LABELS, TARGETS, PretrainSettings, pretrained_weights

ROOT = Path(__file__).resolve().parents[1]

TINY = PretrainSettings(crops=64, val_crops=32, epochs=1, batch_size=32, input_size=32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_label_space_holds_the_built_in_classes():
    assert len(set(LABELS)) == len(LABELS) > 2 * len(synthetic.CLASS_NAMES)
    assert [LABELS[i] for i in TARGETS] == synthetic.CLASS_NAMES
    # crops come from rng streams the built-in set does not use
    assert pretrain.STREAM not in synthetic.SPLITS.values()


def test_crops_cover_the_label_space():
    images, labels = pretrain.make_crops(seed=0, stream=1, n=600, input_size=40)
    assert images.shape == (600, 40, 40, 3) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() < len(LABELS)
    assert len(labels.unique()) > 0.9 * len(LABELS)
    assert images.float().std() > 20  # painted pictures, not blank
    again, _ = pretrain.make_crops(seed=0, stream=1, n=3, input_size=40)
    other, _ = pretrain.make_crops(seed=0, stream=2, n=3, input_size=40)
    assert torch.equal(again, images[:3]) and not torch.equal(other, images[:3])


@pytest.mark.parametrize("shape", ["star", "frame", "lshape"])
def test_new_shapes_paint_exact_boxes(shape):
    rng = np.random.default_rng(0)
    for size in (12, 31):
        img = np.zeros((50, 60, 3), np.float32)
        box = synthetic.paint(img, shape, "dstripes", 7, 5, size, rng, period=6)
        ys, xs = np.nonzero(img.any(axis=2))
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="crops=0"):
        PretrainSettings(crops=0)
    with pytest.raises(ValueError, match="input_size=16"):
        PretrainSettings(input_size=16)
    with pytest.raises(ValueError, match="'blob'"):
        synthetic.shape_mask("blob", 10)
    with pytest.raises(ValueError, match="'zigzag'"):
        synthetic.texture("zigzag", 10)


def test_tiny_build_loads_into_build_backbone(tmp_path):
    path = pretrained_weights(tmp_path, TINY, progress=False)
    assert path == tmp_path / "pretrained" / f"small-{TINY.key()}.pt" and path.is_file()
    assert path.with_suffix(".json").is_file()
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    state = _load(path)
    assert {k.split(".")[0] for k in state} == {"trunk", "fc6", "fc7"}
    backbone = build_backbone("small", weights=str(path))
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 4, 4)


def test_same_settings_same_tensors(tmp_path):
    a = _load(pretrained_weights(tmp_path / "a", TINY, progress=False))
    b = _load(pretrained_weights(tmp_path / "b", TINY, progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = dataclasses.replace(TINY, seed=1)
    assert other.key() != TINY.key()
    c = _load(pretrained_weights(tmp_path / "a", other, progress=False))
    assert not torch.equal(a["fc6.0.weight"], c["fc6.0.weight"])


def test_cache_is_reused(tmp_path, monkeypatch):
    path = pretrained_weights(tmp_path, TINY, progress=False)
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("rebuilt a cached file")

    monkeypatch.setattr(pretrain, "train", no_training)
    assert pretrained_weights(tmp_path, TINY, progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="rebuilt"):
        pretrained_weights(tmp_path, TINY, progress=False, force=True)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--tracking-uri" in out and "--force" in out and "ImageNet" in out


def test_cli_logs_an_mlflow_run(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--cache-dir", str(tmp_path / "cache"), "--seed", "3", "--crops", "64", "--val-crops", "32",
            "--epochs", "2", "--input-size", "32", "--tracking-uri", uri]
    # as the README runs it: a fresh interpreter, `python -m rgnn.train.pretrain`
    run = subprocess.run([sys.executable, "-m", "rgnn.train.pretrain", *argv], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = (tmp_path / "cache").rglob("*.pt")
    assert "epoch 2/2" in run.stdout and "10 target classes" in run.stdout and str(path) in run.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rgnn-pretrain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "3" and run.data.params["input_size"] == "32"
    assert {"train/loss", "val/acc", "val/acc_target"} <= run.data.metrics.keys()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [path.name]
    # a cached file is not rebuilt, and its run still gets the history saved beside it
    assert pretrain.main(argv) == path
    assert "cached" in capsys.readouterr().out
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and runs[0].data.metrics == run.data.metrics
