"""One record type for every data set the project reads (COCO json, VOC xml, the synthetic set)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecord:
    """One image and its annotations, in original pixel coordinates.

    Attributes:
        image_id: the data set's id (COCO's integer id, VOC's file stem).
        path: absolute path of the image file.
        width, height: the image size in pixels, as the annotation file states it.
        labels: sorted contiguous class indices present in the image (crowd boxes included).
        gt_boxes: float32 ndarray[G, 4], x1 y1 x2 y2 of the boxes that are localization targets
            (COCO crowd boxes are not).
        gt_classes: int64 ndarray[G], the class index of each box.
        difficult: bool ndarray[G], VOC's `difficult` flag (all False for COCO).
    """

    image_id: int | str
    path: str
    width: int
    height: int
    labels: list[int]
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    gt_classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    def target(self, num_classes: int) -> np.ndarray:
        """float32 ndarray[C]: the multi-label indicator vector y of eq. 6."""
        bad = [c for c in self.labels if not (isinstance(c, (int, np.integer)) and 0 <= c < num_classes)]
        if bad:  # numpy would take -1 as the last class
            raise ValueError(f"image {self.image_id}: labels {bad} are not class indices in [0, {num_classes})")
        y = np.zeros(num_classes, np.float32)
        y[self.labels] = 1.0
        return y

    def difficult_only(self, num_classes: int) -> np.ndarray:
        """bool ndarray[C]: classes whose every box is VOC-difficult (ignored by VOC AP)."""
        mask = np.zeros(num_classes, bool)
        for c in set(self.gt_classes[self.difficult].tolist()):
            mask[c] = not np.any((self.gt_classes == c) & ~self.difficult)
        return mask


@dataclass
class LabeledSet:
    """The records of one split with the class list they index into.

    Attributes:
        name: e.g. "coco/train2017", "voc2007/trainval", "synthetic/val2017".
        class_names: list[str], index = contiguous class index.
        records: list[ImageRecord].
        category_ids: the data set's own id of each class (COCO's sparse ids; 1..20 for VOC).
        skipped: list of (path or id, reason) for inputs that could not be read.
    """

    name: str
    class_names: list[str]
    records: list[ImageRecord]
    category_ids: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)


def as_arrays(boxes: list[list[float]], classes: list[int], difficult: list[bool]):
    """A reader's lists -> (float32[G, 4], int64[G], bool[G]) for an ImageRecord."""
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64),
            np.asarray(difficult, bool))
