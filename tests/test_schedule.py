"""The lambda families of stage 4 and which parameters each of the 4 stages trains."""
import math

import pytest

from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.schedule import LAMBDA_FAMILIES, STAGES, LambdaSchedule, lambda_at, set_trainable


def test_stage_names():
    assert STAGES == ("global", "regional", "gates", "joint")
    assert set(LAMBDA_FAMILIES) == {"constant", "linear", "cosine", "step", "exponential"}


@pytest.mark.parametrize("family", ["linear", "cosine", "step", "exponential"])
def test_decaying_families_go_from_start_to_end_monotonically(family):
    values = [lambda_at(i / 20, family, start=1.0, end=0.1) for i in range(21)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_family_values():
    assert lambda_at(0.3, "constant", start=0.8) == 0.8
    assert lambda_at(0.25, "linear") == pytest.approx(0.75)
    assert lambda_at(0.25, "linear", start=2.0, end=1.0) == pytest.approx(1.75)
    assert lambda_at(0.5, "cosine") == pytest.approx(0.5)
    assert lambda_at(0.25, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert [lambda_at(p, "step") for p in (0.0, 0.49, 0.5, 1.0)] == [1.0, 1.0, 0.0, 0.0]
    steps = (0.25, 0.75)
    assert [lambda_at(p, "step", steps=steps) for p in (0.1, 0.25, 0.5, 0.8)] == [1.0, 0.5, 0.5, 0.0]
    e = math.exp(-5.0)
    assert lambda_at(0.2, "exponential") == pytest.approx((math.exp(-1.0) - e) / (1 - e))
    assert lambda_at(0.2, "exponential", rate=1.0) > lambda_at(0.2, "exponential", rate=8.0)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="family"):
        lambda_at(0.5, "sigmoid")
    with pytest.raises(ValueError, match="progress"):
        lambda_at(1.5)
    with pytest.raises(ValueError, match="steps"):
        lambda_at(0.5, "step", steps=(0.6, 0.3))
    with pytest.raises(ValueError, match="steps"):
        lambda_at(0.5, "step", steps=())
    with pytest.raises(ValueError, match="rate"):
        lambda_at(0.5, "exponential", rate=0.0)
    with pytest.raises(ValueError, match="family"):
        LambdaSchedule(family="warmup")  # at construction, not at stage 4


def test_lambda_schedule_object():
    s = LambdaSchedule(family="step", start=1.0, end=0.2, steps=[0.5])
    assert s.steps == (0.5,)
    assert [s(0.0), s(0.7)] == [1.0, pytest.approx(0.2)]
    assert LambdaSchedule()(0.5) == lambda_at(0.5)


def prefixes(model, stage):
    params = {id(p) for p in set_trainable(model, stage)}
    names = [n for n, p in model.named_parameters() if id(p) in params]
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    return {".".join(n.split(".")[:2]) if n.startswith("backbone.") else n.split(".")[0] for n in names}


def test_set_trainable_follows_the_stage_table():
    model = RGNN(ModelConfig(num_classes=3))  # region gate on softmax
    everything = {"backbone.trunk", "backbone.fc6", "backbone.fc7", "fc8", "gate", "classifier"}
    assert prefixes(model, "global") == {"backbone.trunk", "backbone.fc6", "backbone.fc7", "fc8"}
    assert prefixes(model, "regional") == everything - {"gate"}
    assert prefixes(model, "gates") == {"gate"}
    assert prefixes(model, "joint") == everything
    # the stages can run in any order: each call sets every flag
    assert prefixes(model, "global") == {"backbone.trunk", "backbone.fc6", "backbone.fc7", "fc8"}


def test_set_trainable_freezes_layers_the_regional_path_does_not_run():
    fc6 = RGNN(ModelConfig(num_classes=3, gate="none", pool_layer="fc6"))
    assert prefixes(fc6, "regional") == {"backbone.trunk", "backbone.fc6", "classifier"}
    assert prefixes(fc6, "joint") == {"backbone.trunk", "backbone.fc6", "classifier"}
    gated = RGNN(ModelConfig(num_classes=3, gate="feature", pool_layer="fc7"))
    assert prefixes(gated, "regional") == {"backbone.trunk", "backbone.fc6", "backbone.fc7", "classifier"}
    assert prefixes(gated, "joint") == {"backbone.trunk", "backbone.fc6", "backbone.fc7", "gate", "classifier"}


def test_set_trainable_rejects_bad_stages():
    with pytest.raises(ValueError, match="gate='none'"):
        set_trainable(RGNN(ModelConfig(num_classes=3, gate="none")), "gates")
    with pytest.raises(ValueError, match="stage"):
        set_trainable(RGNN(ModelConfig(num_classes=3)), "finetune")
