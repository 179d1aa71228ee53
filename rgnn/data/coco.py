"""MS-COCO layout reader: ROOT/annotations/instances_{split}.json and ROOT/{split}/*.jpg."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path, PurePosixPath

from pycocotools.coco import COCO

from rgnn.boxes import clip_box
from rgnn.data.records import ImageRecord, LabeledSet, as_arrays

log = logging.getLogger(__name__)


def read_coco(root: str | Path, split: str = "train2017", check_files: bool = True) -> LabeledSet:
    """Read one split of a COCO-layout data set.

    COCO's category ids (1..90 with gaps) map to contiguous indices in ascending id order.
    Images without annotations are kept as all-negative. `iscrowd` annotations count for the
    image's labels but are not box targets. An annotation that cannot be used (unknown category, a
    bbox that is not 4 finite numbers, an `iscrowd` other than 0, 1 or a bool) is left out and listed
    in `skipped`; so is an image whose file is missing
    (with `check_files`), with a warning naming it.

    Args:
        root: the folder holding `annotations/` and the image folders.
        split: e.g. "train2017", "val2017".
        check_files: stat every image file (cheap) and skip missing ones.

    Raises:
        FileNotFoundError: the annotation file is missing.
        ValueError: the annotation file does not parse as COCO json or is nested too deeply to read,
            or breaks an invariant of check_coco (the message names it).
    """
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    coco, orphans = _load(ann_file)
    category_ids = sorted(coco.getCatIds())
    index_of = {cid: i for i, cid in enumerate(category_ids)}
    class_names = [coco.cats[cid]["name"] for cid in category_ids]
    records, skipped = [], [(f"{ann_file} annotation {a.get('id')}", "points at no image") for a in orphans]
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
                c, (x, y, bw, bh), crowd = _annotation(ann, index_of)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("%s: unreadable, skipped: %r", where, e)
                skipped.append((where, f"unreadable annotation: {e!r}"))
                continue
            labels.add(c)
            box = None if crowd else clip_box([x, y, x + bw, y + bh], w, h, where)
            if box is not None:
                boxes.append(box)
                classes.append(c)
        gt_boxes, gt_classes, difficult = as_arrays(boxes, classes, [False] * len(boxes))
        records.append(ImageRecord(image_id, str(path.resolve()), w, h, sorted(labels),
                                   gt_boxes, gt_classes, difficult))
    return LabeledSet(f"{root.name}/{split}", class_names, records, category_ids, skipped)


def _load(ann_file: Path) -> tuple[COCO, list[dict]]:
    """The parsed, checked annotation file indexed by pycocotools, and its annotations of no image."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{ann_file}: its JSON is nested too deeply to read") from None
    orphans = check_coco(data, ann_file)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
    except (KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{ann_file} is not a COCO instances file: {e!r}") from None
    return coco, orphans


def _annotation(ann: dict, index_of: dict[int, int]) -> tuple[int, tuple[float, float, float, float], int]:
    """(class index, (x, y, w, h), iscrowd) of one annotation; KeyError/TypeError/ValueError if unusable."""
    c = index_of[ann["category_id"]]
    bbox, crowd = ann["bbox"], ann.get("iscrowd", 0)
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_real, bbox)):
        raise ValueError(f"bbox {bbox!r} is not a list of 4 numbers")
    x, y, bw, bh = (float(v) for v in bbox)
    if not all(map(math.isfinite, (x, y, bw, bh))):
        raise ValueError(f"bbox {bbox} is not finite")
    if not isinstance(crowd, int) or crowd not in (0, 1):
        raise ValueError(f"iscrowd {crowd!r} is not 0 or 1")
    return c, (x, y, bw, bh), crowd


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_coco(data, ann_file: Path) -> list[dict]:
    """Check a COCO instances document's invariants before anything is built from it.

    Errors (ValueError naming the file and the offending ids): not a mapping with images /
    annotations / categories lists; an image or category id that is not an int (COCO's ids are, and
    mixing ints and strings breaks ordering), or appears twice (pycocotools would keep the last,
    silently giving one image another's boxes); an image without a usable `file_name`, `width`,
    `height` (positive numbers), a file name that leaves the image folder (absolute or `..`), or one
    file name under two image ids (one image read twice, with two sets of boxes); a category without a
    name, or two categories of one name (two classes no one could tell apart).
    Returned (each left out and counted in the reader's `skipped`): the annotations whose image id
    names no image. Annotations with an unknown category or a bad bbox or iscrowd are left out later.
    """
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"{ann_file} is not a COCO instances file: expected lists images, annotations, categories")

    def ids(items: list, what: str) -> set:
        bad = [i.get("id") if isinstance(i, dict) else i for i in items
               if not isinstance(i, dict) or not isinstance(i.get("id"), int) or isinstance(i.get("id"), bool)]
        if bad:
            raise ValueError(f"{ann_file}: {what} ids must be integers, got {bad[:5]}")
        seen, twice = set(), set()
        for i in items:
            (twice if i["id"] in seen else seen).add(i["id"])
        if twice:
            raise ValueError(f"{ann_file}: duplicate {what} ids {sorted(twice)[:10]}")
        return seen

    image_ids = ids(data["images"], "image")
    ids(data["categories"], "category")
    category_of = {}
    for cat in data["categories"]:
        name = cat.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{ann_file}: category {cat['id']} has no name")
        if name in category_of:
            raise ValueError(f"{ann_file}: categories {category_of[name]} and {cat['id']} are both named {name!r}")
        category_of[name] = cat["id"]
    image_of = {}
    for im in data["images"]:
        name, w, h = im.get("file_name"), im.get("width"), im.get("height")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{ann_file}: image {im['id']} has no file_name")
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise ValueError(f"{ann_file}: image {im['id']} file_name {name!r} leaves the image folder")
        same = str(PurePosixPath(name.replace("\\", "/")))
        if same in image_of:
            raise ValueError(f"{ann_file}: images {image_of[same]} and {im['id']} have one file {name!r}")
        image_of[same] = im["id"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (w, h)):
            raise ValueError(f"{ann_file}: image {im['id']} ({name}) needs positive numeric width and height, "
                             f"got {w!r} x {h!r}")
    orphans = [a for a in data["annotations"] if not isinstance(a, dict) or a.get("image_id") not in image_ids]
    if orphans:
        log.warning("%s: %d annotations point at no image, left out (ids %s)", ann_file, len(orphans),
                    [a.get("id") if isinstance(a, dict) else a for a in orphans[:10]])
    data["annotations"] = [a for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in image_ids]
    return [a if isinstance(a, dict) else {"id": None} for a in orphans]
