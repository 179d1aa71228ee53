"""One epoch of training and one pass of scoring, in plain PyTorch (no Ray, no MLflow).

`StageModel` puts the stage's forward behind `forward()` so that DistributedDataParallel (which
only hooks `forward`) syncs gradients in every stage, the size-normalised global stage included,
and returns one type, `RGNNOutput`, whatever the stage.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rgnn.data.transforms import Batch
from rgnn.nn.losses import (balanced_multilabel_loss, batch_targets, localization_loss, multitask_loss, object_regions,
                         region_targets)
from rgnn.nn.model import RGNN, RGNNOutput
from rgnn.train.schedule import STAGES


GATE_LOSSES = ("multitask", "localization")  # what trains the gate in stage 4 (StageModel)


class StageModel(nn.Module):
    """Runs an RGNN the way a stage of section 4.2 needs it.

    global: size-normalised whole images, no regions (stage 1); regional: regions with the gates
    fixed open (stage 2); gates and joint: the full gated model (stages 3 and 4). `gate_loss`: what
    trains the gate in stage 4, eq. 9's multi-task loss (the paper's) or eq. 7's localization loss
    alone ("localization": the classifier reads the gates without a gradient into them). `theta`:
    eq. 8's IoU threshold of the oracle's gates.
    """

    def __init__(self, model: RGNN, stage: str, oracle: bool = False, gate_loss: str = "multitask",
                 theta: float = 0.5):
        super().__init__()
        if gate_loss not in GATE_LOSSES:
            raise ValueError(f"gate_loss={gate_loss!r}: expected one of {GATE_LOSSES}")
        self.model = model
        self.stage = stage
        self.oracle = oracle  # a diagnostic: gates fixed to eq. 8's targets (needs the ground truth)
        self.theta = theta
        self.detach_gates = stage == "joint" and gate_loss == "localization"

    def forward(self, batch: Batch) -> RGNNOutput:
        if self.oracle and self.stage != "global":
            all_boxes, image_index, _ = self.model.regions(batch.image_sizes, batch.boxes, batch.images.device,
                                                           batch.images.dtype)
            targets = batch_targets(all_boxes, image_index, batch.gt_boxes, self.theta)  # (R,)
            return self.model(batch.images, batch.image_sizes, batch.boxes, open_gates=True, fixed_gates=targets)
        return self.run(batch.images, batch.image_sizes, batch.boxes)

    def run(self, images: torch.Tensor, image_sizes: torch.Tensor, boxes: list[torch.Tensor]) -> RGNNOutput:
        """Tensor[N, 3, H, W], long Tensor[N, 2] (h, w), N x Tensor[T_i, 4] -> the stage's RGNNOutput."""
        if self.stage == "global":
            return RGNNOutput.whole_images(self.model.forward_global(images), image_sizes)
        return self.model(images, image_sizes, boxes, open_gates=self.stage == "regional",
                          detach_gates=self.detach_gates)

    def extra_repr(self) -> str:
        return f"stage={self.stage}"


def stage_losses(out: RGNNOutput, batch: Batch, stage: str, lam: float, num_classes: int,
                 class_aware: bool = False, theta: float = 0.5) -> dict[str, torch.Tensor]:
    """The loss of each stage (rgnn.train.schedule's table): eq. 6, eq. 7, or eq. 9 = eq. 6 + lambda eq. 7.

    Args:
        class_aware: eq. 8's target of feature-level gates per class (see `losses.region_targets`).
        theta: eq. 8's IoU threshold.

    Returns:
        a dict with `loss` (what is minimised) and its parts `loss_cls`, `loss_loc`.
    """
    zero = out.logits.new_zeros(())
    loss_cls = balanced_multilabel_loss(out.logits, batch.targets) if stage != "gates" else zero
    loss_loc = zero
    if stage in ("gates", "joint") and out.gates is not None:
        targets = region_targets(out, batch.gt_boxes, batch.gt_classes, num_classes, class_aware, theta)
        loss_loc = localization_loss(out.gates, targets, out.image_index, len(batch.boxes))
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    loss = {"global": loss_cls, "regional": loss_cls, "gates": loss_loc}.get(stage)
    if stage == "joint":
        loss = multitask_loss(loss_cls, loss_loc, lam)
    return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_loc": loss_loc.detach()}


@dataclass(frozen=True)
class StepOptions:
    """How the steps of an epoch compute and update (ScheduleConfig's settings of the same names).

    Attributes:
        class_aware: eq. 8's class-aware target for feature-level gates.
        theta: eq. 8's IoU threshold (the gates' training target; gate quality is measured at 0.5).
        accumulate: batches per update. Each batch's loss is scaled by 1/accumulate, so `accumulate`
            batches of b images update as one batch of accumulate x b would (eqs. 6, 7 and 9 are means
            over images); the epoch's last, shorter group is the mean over its batches. Under DDP the
            batches before an update skip the gradient all-reduce (`no_sync`).
        clip_norm: the gradients' global norm is clipped to this before each update (None: not clipped).
        precision: the forward pass's autocast (see `autocast_dtype`); the loss is float32 regardless.
    """

    class_aware: bool = False
    accumulate: int = 1
    clip_norm: float | None = None
    precision: str = "auto"
    theta: float = 0.5


def train_one_epoch(model: nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer, stage: str,
                    num_classes: int, device: torch.device, options: StepOptions = StepOptions(),
                    lam_at: Callable[[int], float] = lambda step: 0.0, lr_at: Callable[[int], float] | None = None,
                    on_step: Callable[[int, dict], None] | None = None, on_update: Callable[[], None] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over `loader` for `stage`.

    Args:
        model: a StageModel, possibly DDP-wrapped.
        lam_at: step index within this epoch -> lambda of eq. 9 (the joint stage's schedule).
        lr_at: step index -> the learning rate of the update made at that step (None: left as it is).
        on_step: called after each step with (step, {"loss_cls", "loss_loc", "lambda"} floats, and
            "grad_norm" on the steps that update when `options.clip_norm` is set).
        on_update: called after each update (an EMA of the weights follows them there).
        scaler: fp16's loss scaler, kept by the caller across epochs (required for fp16, else None).

    Returns:
        the epoch's mean loss_cls, loss_loc, the last lambda and the step (batch) count.
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    dtype = autocast_dtype(options.precision, device)
    if dtype == torch.float16 and scaler is None:
        raise ValueError("fp16 training needs a GradScaler (torch.amp.GradScaler), kept by the caller across epochs")
    sums, steps, lam, pending = {"loss_cls": 0.0, "loss_loc": 0.0}, 0, 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for step, (batch, last) in enumerate(_mark_last(loader)):
        batch = batch.to(device)
        lam = lam_at(step)
        pending += 1
        update = pending == options.accumulate or last
        with contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = stage_losses(model(batch), batch, stage, lam, num_classes, options.class_aware,
                                      options.theta)
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"{stage} stage step {step}: loss is {losses['loss'].item()}")
            loss = losses["loss"] / options.accumulate
            (loss if scaler is None else scaler.scale(loss)).backward()
        values = {k: losses[k].item() for k in sums}
        if update:
            grad_norm = _update(optimizer, params, options.accumulate / pending, scaler, options.clip_norm,
                                None if lr_at is None else lr_at(step))
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            pending = 0
            if on_update is not None:
                on_update()
        for k in sums:
            sums[k] += values[k]
        steps += 1
        if on_step is not None:
            on_step(step, {**values, "lambda": lam})
    return {**{k: v / max(steps, 1) for k, v in sums.items()}, "lambda": lam, "steps": steps}


def _update(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], rescale: float,
            scaler: torch.amp.GradScaler | None, clip_norm: float | None, lr: float | None) -> float | None:
    """One optimizer update from the accumulated gradients; returns their norm before clipping (None when
    not clipped). `rescale` (accumulate / batches accumulated) makes a shorter last group a mean."""
    if rescale != 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(rescale)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and the step see the true gradients
    grad_norm = None if clip_norm is None else nn.utils.clip_grad_norm_(params, clip_norm).item()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    if scaler is None:
        optimizer.step()
    else:  # skips the step when fp16 overflowed, and adapts the scale
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype, None for plain float32. "auto" is bfloat16 on GPUs (no
    loss scaling needed) and float32 elsewhere; fp16 needs a loss scaler (the caller's, see train_one_epoch)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


MEMORY_FORMATS = ("channels_last", "contiguous")


def memory_format(layout: str) -> torch.memory_format:
    """The convolutions' memory layout: channels_last (NHWC, the default) or contiguous (NCHW).

    Convolutions follow their weight's layout, so `model.to(memory_format=...)` is enough (RoI
    pooling reads either; results agree to float rounding). channels_last made the built-in set's
    training step 1.4-1.6x faster on this project's CPUs (README: Benchmarks), and cuDNN's
    tensor-core kernels for bf16/fp16 work in NHWC.
    """
    if layout not in MEMORY_FORMATS:
        raise ValueError(f"memory_format={layout!r}: expected one of {MEMORY_FORMATS}")
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _mark_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, whether it is the last) for each item."""
    it = iter(items)
    previous = next(it, _END)
    while previous is not _END:
        item = next(it, _END)
        yield previous, item is _END
        previous = item


_END = object()


@torch.no_grad()
def batch_loss(model: StageModel, batch: Batch, num_classes: int) -> float:
    """The stage's loss on one batch in eval mode (no dropout, lambda 0): the same images measured
    before and after an epoch show whether training moves the loss at all."""
    model.eval()
    return stage_losses(model(batch), batch, model.stage, 0.0, num_classes)["loss"].item()


@torch.no_grad()
def collect_scores(model: StageModel, loader: Iterable[Batch], device: torch.device) -> dict:
    """Scores on this process's part of a split, and the gates of its proposals.

    Returns:
        {"scores": float32[N, C] sigmoid probabilities, "targets": float32[N, C], "ignore": bool[N, C],
        "ids": list, "gates": float32[P] (feature-level: the mean over dimensions) and "gate_targets":
        float32[P] eq. 8's region target at the paper's theta = 0.5 whatever the gates were trained to,
        over the P proposals (whole-image regions left out), empty without gates}.
    """
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("scores", "targets", "ignore", "gates", "gate_targets")}
    ids = []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch)
        parts["scores"].append(torch.sigmoid(out.logits).float().cpu().numpy())
        parts["targets"].append(batch.targets.cpu().numpy())
        parts["ignore"].append(batch.ignore.cpu().numpy())
        ids.extend(batch.ids)
        if out.gates is not None:
            targets, proposal = object_regions(out, batch.gt_boxes)
            gates = out.gates.float() if out.gates.dim() == 1 else out.gates.float().mean(1)  # (R,)
            parts["gates"].append(gates[proposal].cpu().numpy())
            parts["gate_targets"].append(targets[proposal].cpu().numpy())
    result = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
    if not parts["scores"]:
        result.update(scores=np.zeros((0, 0), np.float32), targets=np.zeros((0, 0), np.float32),
                      ignore=np.zeros((0, 0), bool))
    return {**result, "ids": ids}


def gather_predictions(part: dict) -> dict:
    """Every rank's `collect_scores` joined (all ranks get all of it), images ordered by id.

    Metrics are computed on everything, never averaged over ranks or batches.
    """
    parts = [part]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    with_images = [p for p in parts if len(p["ids"])]
    ids = [i for p in with_images for i in p["ids"]]
    order = np.argsort(np.array([str(i) for i in ids]), kind="stable")
    out = {k: np.concatenate([p[k] for p in with_images])[order] for k in ("scores", "targets", "ignore")}
    gates = {k: np.concatenate([p[k] for p in parts]) for k in ("gates", "gate_targets")}
    return {**out, **gates, "ids": [ids[i] for i in order]}


def stage_progress(epoch: int, step: int, epochs: int, steps: int) -> float:
    """Progress in [0, 1] through a stage of `epochs` x `steps` steps at (epoch, step): the
    argument of the lambda schedule (0 at the stage's first step, 1 at its last)."""
    return min((epoch * steps + step) / max(epochs * steps - 1, 1), 1.0)
