"""tune/space.py: a search space file is checked completely before anything starts."""
from __future__ import annotations

import json

import pytest

from rgnn.train.config import parse_args
from tune.space import load_space


@pytest.mark.parametrize("space, match", [
    ({"lr_joint": {"loguniform": [0.0, 1e-3]}}, "low > 0"),
    ({"lr_joint": {"uniform": [1e-3]}}, r"\[low, high\]"),
    ({"lr_joint": {"uniform": [1e-2, 1e-3]}}, "low < high"),
    ({"lr_joint": {"choice": []}}, "non-empty list"),
    ({"lambda_schedule": {"choice": ["linear", "sawtooth"]}}, "lambda_schedule = 'sawtooth'"),
    ({"gate": {"grid": ["region", "lstm"]}}, "gate = 'lstm'"),
    ({"lr_joint": {"choice": [-1.0]}}, "lr_joint = -1.0"),
    ({"epochs": [1, 2]}, "epochs = \\[1, 2\\]"),
    ({"max_regions": {"choice": ["many"]}}, "max_regions is an integer setting, got 'many'"),
    ({"lr_warp": {"choice": [1]}}, "unknown setting 'lr_warp'"),
    ({"lambda_start": {"normal": [0, 1]}}, "loguniform/uniform/choice/grid"),
    # a trial's name, storage or tracking would make every trial share one run folder and replay its metrics
    ({"name": "same", "lr_joint": {"grid": [1e-4, 1e-2]}}, "'name' is not a trainable setting"),
    ({"storage": {"choice": ["/tmp/a", "/tmp/b"]}}, "'storage' is not a trainable setting"),
    ({"tracking_uri": "sqlite:///x.db"}, "'tracking_uri' is not a trainable setting"),
    ({"resume": True}, "'resume' is not a trainable setting"),
    ({"max_regions": {"uniform": [16, 64]}}, "max_regions is an integer setting"),
    ({"batch_size": {"choice": [2, 2.5]}}, "batch_size is an integer setting, got 2.5"),
])
def test_bad_spaces_are_refused_naming_the_setting(tmp_path, space, match):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    base, _ = parse_args(["--smoke-test"])
    with pytest.raises(ValueError, match=match):
        load_space(path, base)


def test_a_good_space_passes(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr_joint: {loguniform: [1.0e-5, 3.0e-3]}\nlambda_schedule: {grid: [linear, cosine]}\ngate: feature\n")
    assert set(load_space(path, parse_args(["--smoke-test"])[0])) == {"lr_joint", "lambda_schedule", "gate"}
