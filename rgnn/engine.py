"""One epoch of training and one pass of scoring, in plain PyTorch (no Ray, no MLflow).

`StageModel` puts the stage's forward behind `forward()` so that DistributedDataParallel (which
only hooks `forward`) syncs gradients in every stage, the size-normalised global stage included,
and returns one type, `RGNNOutput`, whatever the stage.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rgnn.data.transforms import Batch
from rgnn.losses import balanced_multilabel_loss, localization_loss, multitask_loss, region_targets
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

    def forward(self, batch: Batch) -> RGNNOutput:
        return self.run(batch.images, batch.image_sizes, batch.boxes)

    def run(self, images: torch.Tensor, image_sizes: torch.Tensor, boxes: list[torch.Tensor]) -> RGNNOutput:
        """Tensor[N, 3, H, W], long Tensor[N, 2] (h, w), N x Tensor[T_i, 4] -> the stage's RGNNOutput."""
        if self.stage == "global":
            return RGNNOutput.whole_images(self.model.forward_global(images), image_sizes)
        return self.model(images, image_sizes, boxes, open_gates=self.stage == "regional")

    def extra_repr(self) -> str:
        return f"stage={self.stage}"


def stage_losses(out: RGNNOutput, batch: Batch, stage: str, lam: float, num_classes: int,
                 class_aware: bool = False) -> dict[str, torch.Tensor]:
    """The loss of each stage (rgnn.schedule's table): eq. 6, eq. 7, or eq. 9 = eq. 6 + lambda eq. 7.

    Args:
        class_aware: eq. 8's target of feature-level gates per class (see `losses.region_targets`).

    Returns:
        a dict with `loss` (what is minimised) and its parts `loss_cls`, `loss_loc`.
    """
    zero = out.logits.new_zeros(())
    loss_cls = balanced_multilabel_loss(out.logits, batch.targets) if stage != "gates" else zero
    loss_loc = zero
    if stage in ("gates", "joint") and out.gates is not None:
        targets = region_targets(out, batch.gt_boxes, batch.gt_classes, num_classes, class_aware)
        loss_loc = localization_loss(out.gates, targets, out.image_index, len(batch.boxes))
    loss = {"global": loss_cls, "regional": loss_cls, "gates": loss_loc}.get(stage)
    if loss is None:
        loss = multitask_loss(loss_cls, loss_loc, lam)
    return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_loc": loss_loc.detach()}


def train_one_epoch(model: nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer, stage: str,
                    num_classes: int, device: torch.device, lam_at: Callable[[int], float] = lambda step: 0.0,
                    on_step: Callable[[int, dict], None] | None = None, class_aware: bool = False) -> dict[str, float]:
    """One pass over `loader` for `stage`.

    Args:
        model: a StageModel, possibly DDP-wrapped.
        lam_at: step index within this epoch -> lambda of eq. 9 (the joint stage's schedule).
        on_step: called after each step with (step, {"loss_cls", "loss_loc", "lambda"} floats).
        class_aware: eq. 8's class-aware target for feature-level gates.

    Returns:
        the epoch's mean loss_cls, loss_loc, and the last lambda.
    """
    model.train()
    sums, steps, lam = {"loss_cls": 0.0, "loss_loc": 0.0}, 0, 0.0
    for step, batch in enumerate(loader):
        batch = batch.to(device)
        lam = lam_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # AMP on GPUs
            losses = stage_losses(model(batch), batch, stage, lam, num_classes, class_aware)
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
def collect_scores(model: StageModel, loader: Iterable[Batch], device: torch.device):
    """Scores on this process's part of a split.

    Returns:
        (scores float32[N, C] sigmoid probabilities, targets float32[N, C], ignore bool[N, C], ids list).
    """
    model.eval()
    scores, targets, ignore, ids = [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        scores.append(torch.sigmoid(model(batch).logits).float().cpu().numpy())
        targets.append(batch.targets.cpu().numpy())
        ignore.append(batch.ignore.cpu().numpy())
        ids.extend(batch.ids)
    if not scores:
        return (np.zeros((0, 0), np.float32),) * 2 + (np.zeros((0, 0), bool), [])
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(ignore), ids


def gather_predictions(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray, ids: list):
    """Concatenate every rank's predictions (all ranks get all of them), ordered by image id.

    Metrics are computed on everything, never averaged over ranks or batches.
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
