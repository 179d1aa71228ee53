"""The checkpoint payload (rgnn.io.checkpoint): one form written and read back, every older form read with
its stage, and a payload of the wrong shape refused with its file named."""
from __future__ import annotations

import re
from dataclasses import asdict, fields

import pytest
import torch

from rgnn.infer.predict import Predictor
from rgnn.io.checkpoint import (CHECKPOINT_FILE, FORMAT, CheckpointPayload, checkpoint_classes, load_checkpoint,
                                read_checkpoint, read_payload, save_checkpoint, write_payload)
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.schedule import LambdaSchedule
from rgnn.train.stages import TrainState

torch.set_num_threads(1)
NAMES = ["cat", "dog", "bird"]


def _model(gate: str = "region") -> RGNN:
    torch.manual_seed(0)
    return RGNN(ModelConfig(num_classes=len(NAMES), gate=gate))


def _write(folder, raw):
    """`raw` saved as a checkpoint folder's .pt, the way the code of its time called torch.save."""
    folder.mkdir()
    torch.save(raw, folder / CHECKPOINT_FILE)
    return folder


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_payload_is_one_flat_form_that_round_trips_with_the_training_state(tmp_path):
    model = _model()
    state = TrainState(stage="gates", epoch=2, global_step=9, maps={"global": 0.25, "regional": 0.5},
                       optimizer=torch.optim.AdamW(model.parameters()).state_dict(),
                       ema={"updates": 3, "shadow": {}}, last_map=0.5)
    folder = save_checkpoint(tmp_path / "c", model, NAMES, {"image_size": 96}, **state.to_dict(),
                             lambda_schedule=asdict(LambdaSchedule()))
    raw = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert raw["format"] == FORMAT and raw["stage"] == "gates" and "state" not in raw

    payload = read_checkpoint(folder)
    assert TrainState.from_payload(payload) == state
    assert payload.lambda_schedule == asdict(LambdaSchedule()) and payload.class_names == NAMES
    rebuilt, same = load_checkpoint(folder)
    assert _same_weights(rebuilt.state_dict(), model.state_dict()) and same.stage == "gates"
    assert checkpoint_classes(folder) == NAMES
    assert {f.name for f in fields(TrainState)} <= {f.name for f in fields(CheckpointPayload)}
    assert Predictor.load(folder).stage == "gates"


def test_a_final_model_as_the_mlflow_artifact_saved_it_keeps_its_stage(tmp_path):
    """rgnn.tracking.artifacts: the stage beside the weights, no training state."""
    model = _model()
    folder = _write(tmp_path / "old", {"model": model.state_dict(), "model_config": asdict(model.cfg),
                                       "class_names": NAMES, "stage": "regional"})
    rebuilt, payload = load_checkpoint(folder)
    assert payload.stage == "regional" and payload.class_names == NAMES
    assert payload.epoch == 0 and payload.optimizer is None and payload.lambda_schedule is None
    assert _same_weights(rebuilt.state_dict(), model.state_dict())
    assert Predictor.load(folder).stage == "regional"  # what prediction runs: the payload's, not a guess


def test_a_training_checkpoint_as_ray_train_saved_it_resumes_where_it_stood(tmp_path):
    """cluster.loop: the stage inside `state` with the epoch, optimiser, EMA, mAPs; the lambda schedule beside."""
    model = _model()
    state = {"stage": "gates", "epoch": 1, "global_step": 12, "maps": {"global": 0.25, "regional": 0.5},
             "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "ema": None, "last_map": 0.5}
    folder = _write(tmp_path / "old", {"model": model.state_dict(), "model_config": asdict(model.cfg),
                                       "class_names": NAMES, "state": state,
                                       "lambda_schedule": asdict(LambdaSchedule())})
    payload = read_checkpoint(folder)
    assert payload.stage == "gates" and TrainState.from_payload(payload) == TrainState(**state)
    assert payload.lambda_schedule == asdict(LambdaSchedule())
    assert Predictor.load(folder).stage == "gates"


def test_stage1_weights_as_the_ablation_saved_them_read_as_the_global_stage(tmp_path):
    """cluster.ablation: the backbone's and fc8's tensors alone; the caller knows what they lack."""
    model = _model(gate="none")
    stage1 = {k: v for k, v in model.state_dict().items() if k.startswith(("backbone.", "fc8."))}
    file = tmp_path / "table.md.global-seed0.pt"
    torch.save(stage1, file)
    with pytest.raises(ValueError, match=re.escape(str(file)) + ".*stage-1 weights alone"):
        read_payload(file)
    payload = read_payload(file, fill={"model_config": asdict(model.cfg), "class_names": NAMES})
    assert payload.stage == "global" and payload.class_names == NAMES and _same_weights(payload.model, stage1)

    write_payload(file, CheckpointPayload.of(model, NAMES, "global"))  # what the ablation writes now
    again = read_payload(file)
    assert again.stage == "global" and _same_weights(again.model, model.state_dict())


def _good() -> dict:
    model = _model()
    return {"model": model.state_dict(), "model_config": asdict(model.cfg), "class_names": NAMES, "stage": "joint"}


class _Opens:
    """A pickle that would create a file when loaded with plain pickle (or weights_only=False)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


BAD = {
    "a list": (lambda g: [1, 2], "expected a dict, got list"),
    "a tensor": (lambda g: torch.zeros(3), "expected a dict, got Tensor"),
    "no model": (lambda g: {k: v for k, v in g.items() if k != "model"}, "has no model"),
    "no stage": (lambda g: {k: v for k, v in g.items() if k != "stage"}, "has no stage"),
    "model not tensors": (lambda g: {**g, "model": {"w": [1.0]}}, "model should be a state_dict"),
    "model_config a list": (lambda g: {**g, "model_config": [1]}, "model_config should be"),
    "class_names a string": (lambda g: {**g, "class_names": "cat"}, "class_names should be a list of strings"),
    "class_names numbers": (lambda g: {**g, "class_names": [1, 2, 3]}, "class_names should be a list of strings"),
    "unknown stage": (lambda g: {**g, "stage": "finetune"}, "stage should be one of"),
    "epoch a string": (lambda g: {**g, "epoch": "3"}, "epoch should be an int"),
    "epoch a bool": (lambda g: {**g, "epoch": True}, "epoch should be an int"),
    "maps not numbers": (lambda g: {**g, "maps": {"global": "high"}}, "maps should be"),
    "optimizer a list": (lambda g: {**g, "optimizer": [1]}, "optimizer should be None or a dict"),
    "unknown entry": (lambda g: {**g, "extra": 1}, r"unknown entries \['extra'\]"),
    "a later format": (lambda g: {**g, "format": FORMAT + 1}, f"format {FORMAT + 1}"),
    "state not a dict": (lambda g: {**{k: v for k, v in g.items() if k != "stage"}, "state": [1]}, "its `state`"),
    "stage twice": (lambda g: {**g, "state": {"stage": "global"}}, "its `state`"),
    "a class name short": (lambda g: {**g, "class_names": NAMES[:2]},
                           "2 class_names for the model_config's num_classes 3"),
    "a million classes": (lambda g: {**g, "model_config": {**g["model_config"], "num_classes": 10 ** 6}},
                          "3 class_names for the model_config's num_classes 1000000"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_payload_of_the_wrong_shape_is_refused_with_its_file_named(case, tmp_path):
    make, what = BAD[case]
    folder = _write(tmp_path / "bad", make(_good()))
    pattern = re.escape(str(folder / CHECKPOINT_FILE)) + " is not an RGNN checkpoint.*" + what
    with pytest.raises(ValueError, match=pattern):
        read_checkpoint(folder)
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(folder)
    with pytest.raises(ValueError, match=pattern):
        Predictor.load(folder)


def test_a_cut_file_or_one_that_would_run_code_is_refused(tmp_path):
    cut = _write(tmp_path / "cut", _good()) / CHECKPOINT_FILE
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(str(cut)) + " is not an RGNN checkpoint"):
        read_checkpoint(cut)
    victim = tmp_path / "pwned"
    folder = _write(tmp_path / "evil", {**_good(), "x": _Opens(victim)})
    with pytest.raises(ValueError, match=re.escape(str(folder / CHECKPOINT_FILE)) + " is not a safe RGNN checkpoint"):
        read_checkpoint(folder)
    assert not victim.exists()


def test_a_payload_of_the_wrong_shape_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="stage should be one of"):
        save_checkpoint(tmp_path / "c", _model(), NAMES, stage="finetune")
    with pytest.raises(ValueError, match="class_names should be a list of strings"):
        save_checkpoint(tmp_path / "c", _model(), [1, 2, 3], stage="joint")
    assert not (tmp_path / "c" / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("hidden", [10_000_000, 10 ** 12])
def test_a_config_larger_than_its_weights_is_refused_before_the_model_is_built(hidden, tmp_path):
    """The config is checked against the weights' shapes first: 10**12 x 15 floats could never be allocated."""
    good = _good()
    folder = _write(tmp_path / "big", {**good, "model_config": {**good["model_config"], "hidden": hidden}})
    pattern = (re.escape(str(folder / CHECKPOINT_FILE)) + r" is not an RGNN checkpoint of its model_config: "
               + re.escape(f"classifier.0.weight has shape (512, 15), the config implies ({hidden}, 15)"))
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(folder)
    with pytest.raises(ValueError, match=pattern):
        Predictor.load(folder)


def test_weights_with_a_nan_or_an_inf_are_refused_naming_the_tensor(tmp_path):
    for key, value in (("classifier.3.bias", float("nan")), ("fc8.weight", float("-inf"))):
        good = _good()
        good["model"][key].view(-1)[0] = value
        folder = _write(tmp_path / key, good)
        pattern = re.escape(f"{folder / CHECKPOINT_FILE}: weight {key} holds 1 NaN or inf values")
        with pytest.raises(ValueError, match=pattern):
            load_checkpoint(folder)
        with pytest.raises(ValueError, match=pattern):
            Predictor.load(folder)
