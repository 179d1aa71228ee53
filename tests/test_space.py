"""tune/space.py: a search space file is checked completely before anything starts (issue 13)."""
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
    ({"max_regions": {"choice": ["many"]}}, "max_regions = 'many'"),
    ({"lr_warp": {"choice": [1]}}, "unknown setting 'lr_warp'"),
    ({"lambda_start": {"normal": [0, 1]}}, "loguniform/uniform/choice/grid"),
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
