"""Ground-truth box checks shared by the COCO and VOC readers."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def clip_box(box: list[float], width: int, height: int, where: str) -> list[float] | None:
    """Clip an x1 y1 x2 y2 box to its image.

    Decision (issue 2): a box that pokes outside its image is clipped with a warning; one with no
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


def as_arrays(boxes: list[list[float]], classes: list[int], difficult: list[bool]):
    """Lists -> (float32[G, 4], int64[G], bool[G])."""
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64),
            np.asarray(difficult, bool))
