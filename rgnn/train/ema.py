"""An exponential moving average (EMA) of a model's weights, evaluated beside the raw weights.

Not in the paper: a common aid when the last weights of a stage are noisy. After every
update, shadow <- d x shadow + (1 - d) x weights with d = min(decay, (1 + n) / (10 + n)) at the n-th
update (the warm-up keeps a short stage from being dominated by its starting weights). Integer
buffers are not averaged. The shadow is a dict of tensors: it goes into checkpoints as is.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, state: dict | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay}: expected a value in (0, 1)")
        self.decay = decay
        self.updates = 0 if state is None else int(state["updates"])
        source = model.state_dict() if state is None else state["shadow"]
        self.shadow = {k: v.detach().clone() for k, v in source.items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - d)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """`model` holds the averaged weights inside the block, its own after it."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            model.load_state_dict(raw, strict=False)
