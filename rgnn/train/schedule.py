"""The 4-stage schedule of section 4.2: what trains in each stage, and lambda of eq. 9 in stage 4.

| stage    | trains (set_trainable)                         | loss       |
| global   | backbone trunk + fc6, fc7, fc8                 | eq. 6      |
| regional | all but the gates (gates held open)            | eq. 6      |
| gates    | the gate parameters only                       | eq. 7      |
| joint    | everything                                     | eq. 9      |

"All" and "everything" mean every layer the stage's forward runs: when fc6 or fc7 is the pooled
layer the regional path never runs fc8 (and with fc6 pooled and the gates open or absent, never
fc7), so those stay frozen rather than trainable without a gradient, which DDP rejects.

The paper decreases lambda "slowly from 1 to 0" in stage 4; the family is a searched
hyper-parameter (tune/): constant, linear, cosine, step, exponential.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from rgnn.nn.model import RGNN, STAGES
LAMBDA_FAMILIES = ("constant", "linear", "cosine", "step", "exponential")
LR_SCHEDULES = ("constant", "cosine", "step")  # the rate through a stage; the paper's is constant


def lambda_at(progress: float, family: str = "linear", start: float = 1.0, end: float = 0.0, rate: float = 5.0,
              steps: tuple[float, ...] = (0.5,)) -> float:
    """Lambda of eq. 9 at `progress` in [0, 1] through stage 4.

    Families (each gives `start` at progress 0 and, except constant, `end` at progress 1):
        constant: start throughout.
        linear: start + (end - start) * p.
        cosine: end + (start - end) * (1 + cos(pi p)) / 2.
        step: piecewise constant; `steps` are the increasing progress points in (0, 1) where it
            drops, by equal amounts from start to end (after the last one it is end).
        exponential: end + (start - end) * (e^(-rate p) - e^(-rate)) / (1 - e^(-rate)), an exponential
            decay with `rate` > 0 rescaled to reach `end` exactly.
    """
    if family not in LAMBDA_FAMILIES:
        raise ValueError(f"lambda_schedule family {family!r}: expected one of {LAMBDA_FAMILIES}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress!r}: expected a value in [0, 1]")
    if family == "constant":
        return float(start)
    if family == "linear":
        return float(start + (end - start) * progress)
    if family == "cosine":
        return float(end + (start - end) * (1 + math.cos(math.pi * progress)) / 2)
    if family == "step":
        steps = tuple(steps)
        if not steps or any(not 0 < s < 1 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"steps={steps!r}: expected increasing progress points in (0, 1)")
        passed = sum(progress >= s for s in steps)
        return float(start + (end - start) * passed / len(steps))
    if not rate > 0:
        raise ValueError(f"rate={rate!r}: the exponential family needs rate > 0")
    floor = math.exp(-rate)
    return float(end + (start - end) * (math.exp(-rate * progress) - floor) / (1 - floor))


def lr_factor(progress: float, family: str = "constant", warmup: float = 0.0) -> float:
    """The multiplier of a stage's learning rate at `progress` in [0, 1] through it.

    A linear warm-up from 0.1 to 1 over the first `warmup` of the stage, then `family` over the rest:
    constant (the paper's), cosine (decay to 0 at the stage's last step) or step (x 0.1 from 2/3 on).
    """
    if family not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {family!r}: expected one of {LR_SCHEDULES}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup={warmup!r}: expected a fraction of the stage in [0, 1)")
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    rest = (progress - warmup) / (1.0 - warmup)
    return lambda_at(min(rest, 1.0), family, 1.0, 0.1 if family == "step" else 0.0, steps=(2 / 3,))


@dataclass
class LambdaSchedule:
    """A named lambda family with its parameters; `schedule(progress)` -> lambda (see `lambda_at`).

    `flat` names each field in flags, config files and MLflow params (rgnn.train.config).
    """

    family: str = field(default="linear", metadata={"flat": "lambda_schedule"})
    start: float = field(default=1.0, metadata={"flat": "lambda_start"})
    end: float = field(default=0.0, metadata={"flat": "lambda_end"})
    rate: float = field(default=5.0, metadata={"flat": "lambda_rate"})
    steps: tuple[float, ...] = field(default=(0.5,), metadata={"flat": "lambda_steps"})

    def __post_init__(self):
        self.steps = tuple(self.steps)
        self(0.0)  # validates the family and its parameters now, not at stage 4

    def __call__(self, progress: float) -> float:
        return lambda_at(progress, self.family, self.start, self.end, self.rate, self.steps)


def set_trainable(model: RGNN, stage: str) -> list[nn.Parameter]:
    """Set requires_grad for `stage` (the module docstring's table); returns the trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    if stage == "gates":
        if model.gate is None:
            raise ValueError("stage 'gates' trains the gate parameters, but the model has gate='none'")
        train = [model.gate]
    else:
        train = model.used_modules(regions=stage != "global", open_gates=stage == "regional")
    model.requires_grad_(False)
    for module in train:
        module.requires_grad_(True)
    for module in model.backbone.frozen:  # pretrained early layers that no stage trains
        module.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]
