"""The training and evaluation loop of the 4 stages, in plain PyTorch (Ray wraps it in cluster/).

`StageModel` puts the stage's forward behind `forward()` so that DistributedDataParallel (which
only hooks `forward`) syncs gradients in every stage, the size-normalised global stage included.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rgnn.losses import balanced_multilabel_loss, localization_loss, region_targets
from rgnn.model import RGNN, RGNNOutput


class StageModel(nn.Module):
    """Runs an RGNN the way a stage of section 4.2 needs it.

    global: size-normalised whole images, no regions (stage 1); regional: regions with the gates
    fixed open (stage 2); gates and joint: the full gated model (stages 3 and 4).
    """

    def __init__(self, model: RGNN, stage: str):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch) -> torch.Tensor | RGNNOutput:
        if self.stage == "global":
            return self.model.forward_global(batch.images)  # (N, C)
        return self.model(batch.images, batch.image_sizes, batch.boxes,
                          open_gates=self.stage == "regional")

    def extra_repr(self) -> str:
        return f"stage={self.stage}"


def stage_losses(out, batch, stage: str, lam: float, num_classes: int) -> dict[str, torch.Tensor]:
    """The loss of each stage (DESIGN.md's table): eq. 6, eq. 7, or eq. 9 = eq. 6 + lambda eq. 7.

    Returns a dict with `loss` (what is minimised) and its parts `loss_cls`, `loss_loc`.
    """
    logits = out if stage == "global" else out.logits
    zero = logits.new_zeros(())
    loss_cls = balanced_multilabel_loss(logits, batch.targets) if stage != "gates" else zero
    loss_loc = zero
    if stage in ("gates", "joint") and out.gates is not None:
        feature_level = out.gates.dim() == 2
        targets = region_targets(out, batch.gt_boxes, batch.gt_classes, feature_level, num_classes)
        loss_loc = localization_loss(out.gates, targets, out.image_index, len(batch.boxes))
    loss = {"global": loss_cls, "regional": loss_cls, "gates": loss_loc}.get(stage, loss_cls + lam * loss_loc)
    return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_loc": loss_loc.detach()}


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, stage: str,
                    num_classes: int, device: torch.device, lam_at: Callable[[int], float] = lambda step: 0.0,
                    on_step: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """One pass over `loader` for `stage`.

    Args:
        model: a StageModel, possibly DDP-wrapped.
        lam_at: step index within this epoch -> lambda of eq. 9 (the joint stage's schedule).
        on_step: called after each step with (step, {"loss_cls", "loss_loc", "lambda"} floats).

    Returns:
        the epoch's mean loss_cls, loss_loc, and the last lambda.
    """
    model.train()
    sums, steps, lam = {"loss_cls": 0.0, "loss_loc": 0.0}, 0, 0.0
    for step, batch in enumerate(loader):
        batch = batch.to(device)
        lam = lam_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # AMP on GPUs
            losses = stage_losses(model(batch), batch, stage, lam, num_classes)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"{stage} stage step {step}: loss is {losses['loss'].item()}")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        values = {k: losses[k].item() for k in sums}
        for k in sums:
            sums[k] += values[k]
        steps += 1
        if on_step is not None:
            on_step(step, {**values, "lambda": lam})
    return {**{k: v / max(steps, 1) for k, v in sums.items()}, "lambda": lam, "steps": steps}


@torch.no_grad()
def predict(model: StageModel, loader: Iterable, device: torch.device):
    """Scores on this process's part of a split.

    Returns:
        (scores float32[N, C] sigmoid probabilities, targets float32[N, C], ignore bool[N, C], ids list).
    """
    model.eval()
    scores, targets, ignore, ids = [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch)
        logits = out if model.stage == "global" else out.logits
        scores.append(torch.sigmoid(logits).float().cpu().numpy())
        targets.append(batch.targets.cpu().numpy())
        ignore.append(batch.ignore.cpu().numpy())
        ids.extend(batch.ids)
    if not scores:
        return (np.zeros((0, 0), np.float32),) * 2 + (np.zeros((0, 0), bool), [])
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(ignore), ids


def gather_predictions(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray, ids: list):
    """Concatenate every rank's predictions (all ranks get all of them), ordered by image id.

    Metrics are computed on everything, never averaged over ranks or batches (STYLE.md, 6).
    """
    parts = [(scores, targets, ignore, ids)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (scores, targets, ignore, ids))
    parts = [p for p in parts if len(p[3])]
    ids = [i for p in parts for i in p[3]]
    order = np.argsort(np.array([str(i) for i in ids]), kind="stable")
    cat = [np.concatenate([p[k] for p in parts])[order] for k in range(3)]
    return (*cat, [ids[i] for i in order])


def stage_progress(epoch: int, step: int, epochs: int, steps: int) -> float:
    """Progress in [0, 1] through a stage of `epochs` x `steps` steps at (epoch, step): the
    argument of the lambda schedule (0 at the stage's first step, 1 at its last)."""
    return min((epoch * steps + step) / max(epochs * steps - 1, 1), 1.0)
