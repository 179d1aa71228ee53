"""MS-COCO layout reader: ROOT/annotations/instances_{split}.json and ROOT/{split}/*.jpg."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from pycocotools.coco import COCO

from rgnn.boxes import clip_box
from rgnn.data.records import ImageRecord, LabeledSet, as_arrays

log = logging.getLogger(__name__)


def read_coco(root: str | Path, split: str = "train2017", check_files: bool = True) -> LabeledSet:
    """Read one split of a COCO-layout data set.

    COCO's category ids (1..90 with gaps) map to contiguous indices in ascending id order.
    Images without annotations are kept as all-negative. `iscrowd` annotations count for the
    image's labels but are not box targets. An annotation that cannot be used (unknown category,
    malformed bbox) is left out and listed in `skipped`; so is an image whose file is missing
    (with `check_files`), with a warning naming it.

    Args:
        root: the folder holding `annotations/` and the image folders.
        split: e.g. "train2017", "val2017".
        check_files: stat every image file (cheap) and skip missing ones.

    Raises:
        FileNotFoundError: the annotation file is missing.
        ValueError: the annotation file does not parse as COCO json (the message names it).
    """
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file} is not valid JSON: {e}") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{ann_file} is not a COCO instances file: {e!r}") from None

    category_ids = sorted(coco.getCatIds())
    index_of = {cid: i for i, cid in enumerate(category_ids)}
    class_names = [coco.cats[cid]["name"] for cid in category_ids]
    records, skipped = [], []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        path = root / split / info["file_name"]
        if check_files and not path.is_file():
            log.warning("%s: image file missing, skipped: %s", ann_file, path)
            skipped.append((str(path), "image file missing"))
            continue
        w, h = int(info["width"]), int(info["height"])
        labels, boxes, classes = set(), [], []
        for ann in coco.imgToAnns.get(image_id, []):
            where = f"{ann_file} annotation {ann.get('id')} (image {info['file_name']})"
            try:
                c = index_of[ann["category_id"]]
                x, y, bw, bh = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError) as e:
                log.warning("%s: unreadable, skipped: %r", where, e)
                skipped.append((where, f"unreadable annotation: {e!r}"))
                continue
            labels.add(c)
            if ann.get("iscrowd", 0):
                continue
            box = clip_box([x, y, x + bw, y + bh], w, h, where)
            if box is not None:
                boxes.append(box)
                classes.append(c)
        gt_boxes, gt_classes, difficult = as_arrays(boxes, classes, [False] * len(boxes))
        records.append(ImageRecord(image_id, str(path.resolve()), w, h, sorted(labels),
                                   gt_boxes, gt_classes, difficult))
    return LabeledSet(f"{root.name}/{split}", class_names, records, category_ids, skipped)
