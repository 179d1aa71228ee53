"""Losses of section 3.3: balanced multi-label (eq. 6), localization (eqs. 7-8), multi-task (eq. 9).

The model returns logits and gates; these functions turn them into the scalars each stage
minimises (rgnn.train.schedule's table). Half-precision inputs (autocast) are computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from rgnn.nn.model import RGNNOutput, whole_image_regions

# eq. 8's target of a feature-level gate: the region's (the paper's bold 1/0) or per class (ours)
GATE_TARGETS = ("region", "class")


def _wide(t: Tensor) -> Tensor:
    """float32 for half-precision and integer tensors; float32/float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def balanced_multilabel_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Eq. 6 with the sign of a loss to minimise.

    L = -(1/N) sum_i [ mean_{j: y_ij=1} log p_ij + mean_{j: y_ij=0} log(1 - p_ij) ], p = sigmoid(logits),
    from `logsigmoid` for stability. An image without positives (or without negatives) contributes
    only the other term.

    Args:
        logits: Tensor[N, C]; targets: Tensor[N, C] of 0/1.

    Returns:
        scalar Tensor.
    """
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be [N, C]")
    logits = _wide(logits)
    pos = targets.to(logits.dtype)
    neg = 1.0 - pos
    log_p = F.logsigmoid(logits)  # log sigmoid(l)
    log_not_p = F.logsigmoid(-logits)  # log(1 - sigmoid(l))
    term_pos = (pos * log_p).sum(1) / pos.sum(1).clamp(min=1)  # (N,), 0 without positives
    term_neg = (neg * log_not_p).sum(1) / neg.sum(1).clamp(min=1)  # (N,)
    return -(term_pos + term_neg).mean()


def localization_targets(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
                         num_classes: int | None = None, theta: float = 0.5) -> Tensor:
    """Eq. 8: r_j = 1 where region j's max IoU with a ground-truth box exceeds theta, else 0.

    Args:
        boxes: Tensor[T, 4] regions; gt_boxes: Tensor[G, 4] ground truth (x1, y1, x2, y2, same pixels).
        gt_labels: long Tensor[G] with `num_classes`: the class-aware vector form for feature-level
            gates (`region_targets`' option): r_jc = 1 where region j overlaps a ground-truth box of class c by IoU > theta.
        theta: the IoU threshold (strictly greater counts; the paper uses 0.5).

    Returns:
        float Tensor[T] of 0/1, or Tensor[T, num_classes] with `gt_labels`.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[T, 4], got shape {tuple(boxes.shape)}")
    gt_boxes = gt_boxes.reshape(-1, 4) if gt_boxes.numel() == 0 else gt_boxes
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must be Tensor[G, 4], got shape {tuple(gt_boxes.shape)}")
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    hit = box_iou(boxes.to(dtype), gt_boxes.to(device=boxes.device, dtype=dtype)) > theta  # (T, G)
    if gt_labels is None:
        if num_classes is not None:
            raise ValueError("num_classes is given without gt_labels: pass both for class-aware targets")
        return hit.any(1).to(dtype)  # (T,)
    if num_classes is None or num_classes < 1:
        raise ValueError(f"class-aware targets need num_classes >= 1, got {num_classes!r}")
    gt_labels = gt_labels.reshape(-1).long().to(boxes.device)
    if gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"gt_labels has {gt_labels.shape[0]} entries for {gt_boxes.shape[0]} gt_boxes")
    if gt_labels.numel() and (gt_labels.min() < 0 or gt_labels.max() >= num_classes):
        raise ValueError(f"gt_labels {gt_labels.tolist()} outside [0, {num_classes})")
    one_hot = F.one_hot(gt_labels, num_classes).to(dtype)  # (G, C)
    return (hit.to(dtype) @ one_hot > 0).to(dtype)  # (T, C)


def localization_loss(gates: Tensor, targets: Tensor, image_index: Tensor, num_images: int) -> Tensor:
    """Eq. 7: L = (1/N) sum_i (1/T_i) sum_j ||r_ij - g_ij||^2.

    Args:
        gates: Tensor[R] or Tensor[R, D], the gate values g of all regions of the batch.
        targets: r, the same shape (see `localization_targets`, `region_targets`).
        image_index: long Tensor[R], the image of each region.
        num_images: N (an image without regions contributes 0).

    Returns:
        scalar Tensor.
    """
    if gates.shape != targets.shape or gates.dim() not in (1, 2):
        raise ValueError(f"gates {tuple(gates.shape)} and targets {tuple(targets.shape)} must both be [R] or [R, D]")
    if image_index.shape != gates.shape[:1]:
        raise ValueError(f"image_index {tuple(image_index.shape)} must be [R] with R={gates.shape[0]}")
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: expected >= 1")
    gates = _wide(gates)
    err = (gates - targets.to(gates.dtype)).pow(2)
    if err.dim() == 2:
        err = err.sum(1)  # (R,) ||r - g||^2
    per_image = err.new_zeros(num_images).index_add_(0, image_index, err)  # (N,)
    count = torch.bincount(image_index, minlength=num_images).clamp(min=1)  # (N,) T_i
    return (per_image / count).mean()


def multitask_loss(loss_cls: Tensor, loss_loc: Tensor, lam: float) -> Tensor:
    """Eq. 9: L = L_cls + lambda L_loc."""
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam={lam!r}: expected a finite number >= 0")
    return loss_cls + lam * loss_loc


def region_targets(out: RGNNOutput, gt_boxes: list[Tensor], gt_labels: list[Tensor], num_classes: int,
                   class_aware: bool = False, theta: float = 0.5) -> Tensor:
    """Eq. 8's targets r for every region of a batch, shaped like `out.gates`.

    Eq. 8 writes the feature-level target as a bold 1 or 0: the region's own 0/1 target on every
    dimension of its gate vector. That is the default. `class_aware` is our option for gates of
    fc8 or its softmax (D = C): r_jc = 1 where region j overlaps a ground-truth box *of class c*,
    which adds box-level class supervision the paper does not use.

    Args:
        out: the model's output (regions, their images, and the gates).
        gt_boxes: N x Tensor[G_i, 4] in the same resized pixels as the regions.
        gt_labels: N x long Tensor[G_i].
        class_aware: the per-class target above (feature-level gates with D = num_classes only).

    Returns:
        Tensor[R] (region-level) or Tensor[R, D] (feature-level).
    """
    N = len(gt_boxes)
    if len(gt_labels) != N:
        raise ValueError(f"got {N} gt box lists but {len(gt_labels)} label lists")
    if out.image_index.numel() and int(out.image_index.max()) >= N:
        raise ValueError(f"got {N} gt box lists for {int(out.image_index.max()) + 1} images")
    if out.gates is None:
        raise ValueError("eq. 8's targets need the gates in out.gates")
    feature_level = out.gates.dim() == 2
    if class_aware and not (feature_level and out.gates.shape[1] == num_classes):
        raise ValueError(f"the class-aware gate target needs feature-level gates with one dimension per class "
                         f"({num_classes}), got gates of shape {tuple(out.gates.shape)}")
    if not class_aware:
        targets = batch_targets(out.boxes, out.image_index, gt_boxes, theta)  # (R,)
        return targets.unsqueeze(1).expand(-1, out.gates.shape[1]) if feature_level else targets  # the bold 1/0
    targets = out.boxes.new_zeros((len(out.boxes), num_classes))
    for i in range(N):
        sel = out.image_index == i  # (R,) this image's regions
        targets[sel] = localization_targets(out.boxes[sel], gt_boxes[i], gt_labels[i], num_classes, theta)
    return targets


def batch_targets(boxes: Tensor, image_index: Tensor, gt_boxes: list[Tensor], theta: float = 0.5) -> Tensor:
    """Eq. 8's 0/1 region target for every region of a batch.

    Args:
        boxes: Tensor[R, 4]; image_index: long Tensor[R]; gt_boxes: N x Tensor[G_i, 4], the same pixels.

    Returns:
        Tensor[R] in the boxes' dtype.
    """
    targets = boxes.new_zeros(len(boxes))
    for i, gt in enumerate(gt_boxes):
        sel = image_index == i  # (R,) this image's regions
        targets[sel] = localization_targets(boxes[sel], gt, theta=theta)
    return targets


def object_regions(out: RGNNOutput, gt_boxes: list[Tensor], theta: float = 0.5) -> tuple[Tensor, Tensor]:
    """Eq. 8's region target and a mask of the proposals (every region but each image's whole-image
    region, which the model appends last): what gate quality is measured on.

    Returns:
        (float Tensor[R] of 0/1, bool Tensor[R]).
    """
    targets = batch_targets(out.boxes.float(), out.image_index, gt_boxes, theta)  # (R,)
    return targets, ~whole_image_regions(out.image_index)
