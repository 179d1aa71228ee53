"""Box helpers, x1 y1 x2 y2 in continuous pixel coordinates: area, IoU, clipping and scaling.

One home for what the readers (ground-truth checks), the proposals (recall), the input pipeline
(scaling with the image) and the model (area ratio of section 3.2) all need. eq. 8's IoU on
tensors is torchvision's `ops.box_iou`. Importing this module does not load torch: the sharding
job's actors use its numpy half and never need torch.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)


def box_area(boxes: Tensor) -> Tensor:
    """Tensor[R, 4] -> Tensor[R]; degenerate boxes have area 0 (torchvision's would be negative)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` with every box of `b` (numpy; for tensors use torchvision.ops.box_iou).

    Args:
        a: ndarray[A, 4]; b: ndarray[B, 4].

    Returns:
        float ndarray[A, B] (0 where a box has no area).
    """
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (A, B, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (A, B, 2)
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)  # (A, B)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)


def scale_boxes(boxes: np.ndarray, sx: float, sy: float, width: int, height: int) -> Tensor:
    """float ndarray[K, 4] -> Tensor[K, 4] scaled by (sx, sy) and clipped to a width x height image."""
    import torch

    b = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)) * torch.tensor([sx, sy, sx, sy])
    b[:, 0::2].clamp_(0, width)
    b[:, 1::2].clamp_(0, height)
    return b


def clip_box(box: list[float], width: int, height: int, where: str) -> list[float] | None:
    """Clip one ground-truth box to its image.

    Decision: a box that pokes outside its image is clipped with a warning; one with no
    area left inside the image is dropped with a warning. Both name the file and the box.

    Returns:
        the clipped box, or None when nothing of it is inside the image.
    """
    x1, y1, x2, y2 = box
    c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
         min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if c[2] <= c[0] or c[3] <= c[1]:
        log.warning("%s: box %s has no area inside the %dx%d image; dropped", where, box, width, height)
        return None
    if c != [x1, y1, x2, y2]:
        log.warning("%s: box %s lies partly outside the %dx%d image; clipped to %s", where, box, width, height, c)
    return c
