"""Pascal VOC layout reader: VOCdevkit/VOC20xx/{JPEGImages, Annotations, ImageSets/Main}."""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from rgnn.boxes import clip_box
from rgnn.data.records import ImageRecord, LabeledSet, as_arrays

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def voc_year_dir(root: str | Path, year: str | None = None) -> Path:
    """Resolve `root` (VOCdevkit/VOC2007 itself, or VOCdevkit) to the VOC20xx folder."""
    root = Path(root)
    if (root / "Annotations").is_dir():
        return root
    years = sorted(p for p in root.glob("VOC20*") if (p / "Annotations").is_dir())
    if year is not None:
        years = [p for p in years if p.name == f"VOC{year}"]
    if len(years) != 1:
        found = ", ".join(p.name for p in years) or "none"
        raise FileNotFoundError(
            f"{root}: expected VOCdevkit/VOC2007 or VOC2012 with Annotations/ (found: {found}); "
            "pass the VOC20xx folder or a year")
    return years[0]


def read_voc(root: str | Path, split: str = "trainval", year: str | None = None,
             check_files: bool = True) -> LabeledSet:
    """Read one image set of a Pascal VOC year.

    The 20 classes keep the standard order. `difficult` objects are kept, flagged, and their
    classes count as labels; evaluation ignores a class whose boxes in an image are all
    difficult (`ImageRecord.difficult_only`), as the VOC devkit does. Boxes become 0-based
    x1 y1 x2 y2 (VOC's are 1-based, inclusive).

    An object whose box has a NaN or inf coordinate is left out and listed in `skipped`.

    Raises:
        FileNotFoundError: the image set list or an annotation file is missing.
        ValueError: an annotation file does not parse or names an unknown class (names the file), or
            the image set lists a name with `/`, `\\` or `..` (names the list file).
    """
    year_dir = voc_year_dir(root, year)
    list_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    records, skipped = [], []
    for stem in _stems(list_file):
        xml_file = year_dir / "Annotations" / f"{stem}.xml"
        path = year_dir / "JPEGImages" / f"{stem}.jpg"
        if check_files and not path.is_file():
            log.warning("%s: image file missing, skipped: %s", list_file, path)
            skipped.append((str(path), "image file missing"))
            continue
        w, h, boxes, classes, difficult = _objects(xml_file, skipped)
        gt_boxes, gt_classes, diff = as_arrays(boxes, classes, difficult)
        records.append(ImageRecord(stem, str(path.resolve()), w, h, sorted(set(classes)),
                                   gt_boxes, gt_classes, diff))
    return LabeledSet(f"{year_dir.name.lower()}/{split}", list(VOC_CLASSES), records,
                      list(range(1, len(VOC_CLASSES) + 1)), skipped)


def _stems(list_file: Path) -> list[str]:
    """The image names an image set lists; a name with `/`, `\\` or `..` is refused."""
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC image set not found: {list_file}")
    stems = [s.strip() for s in list_file.read_text().splitlines() if s.strip()]
    bad = next((s for s in stems if "/" in s or "\\" in s or ".." in s), None)
    if bad is not None:
        raise ValueError(f"{list_file}: image {bad!r} is not a file stem (it has /, \\ or ..: a path out of "
                         "JPEGImages and Annotations)")
    return stems


def _objects(xml_file: Path, skipped: list) -> tuple[int, int, list, list[int], list[bool]]:
    """(width, height, boxes, class indices, difficult flags) of one annotation file; an object with a
    box that is not finite is appended to `skipped` instead."""
    index_of = {name: i for i, name in enumerate(VOC_CLASSES)}
    try:
        tree = ET.parse(xml_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"VOC annotation file not found: {xml_file}") from None
    except ET.ParseError as e:
        raise ValueError(f"{xml_file} is not valid XML: {e}") from None
    try:
        size = tree.find("size")
        w, h = int(size.findtext("width")), int(size.findtext("height"))
        boxes, classes, difficult = [], [], []
        for i, obj in enumerate(tree.iter("object")):
            name = obj.findtext("name").strip()
            if name not in index_of:
                raise ValueError(f"unknown class {name!r}")
            bb = obj.find("bndbox")
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            if not all(map(math.isfinite, box)):
                where = f"{xml_file} object {i} ({name})"
                log.warning("%s: box %s is not finite, skipped", where, box)
                skipped.append((where, f"box {box} is not finite"))
                continue
            box = clip_box([box[0] - 1, box[1] - 1, box[2], box[3]], w, h, str(xml_file))
            if box is None:
                continue
            boxes.append(box)
            classes.append(index_of[name])
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{xml_file}: malformed VOC annotation: {e}") from None
    return w, h, boxes, classes, difficult
