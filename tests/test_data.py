import hashlib
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from rgnn.data import synthetic
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.data.voc import VOC_CLASSES, read_voc

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- synthetic set

def test_synthetic_layout_and_pycocotools(synthetic_root):
    for split, n in (("train2017", 24), ("val2017", 12)):
        coco = COCO(str(synthetic_root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert len(coco.getCatIds()) >= 8
        for info in coco.imgs.values():
            img = cv2.imread(str(synthetic_root / split / info["file_name"]))
            assert img is not None and img.shape[:2] == (info["height"], info["width"])
        # real JPEG files
        first = next((synthetic_root / split).glob("*.jpg")).read_bytes()
        assert first[:3] == b"\xff\xd8\xff"


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", train=5, val=2, seed=7)
    b = synthetic.generate(tmp_path / "b", train=5, val=2, seed=7)
    c = synthetic.generate(tmp_path / "c", train=5, val=2, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_synthetic_statistics():
    """Scales span below 1/32 to above 1/4, 0..5 objects, varied sizes, every class present."""
    rng = np.random.default_rng(0)
    areas, counts, shapes, classes = [], [], set(), set()
    for _ in range(300):
        img, objects = synthetic.make_image(rng)
        h, w = img.shape[:2]
        shapes.add((h, w))
        counts.append(len(objects))
        for c, (x1, y1, x2, y2) in objects:
            areas.append((x2 - x1) * (y2 - y1) / (w * h))
            classes.add(c)
    areas = np.array(areas)
    assert (areas < 1 / 32).mean() > 0.1 and (areas > 1 / 4).mean() > 0.03
    assert min(counts) == 0 and max(counts) == 5
    assert len(shapes) > 100
    assert classes == set(range(len(synthetic.CLASS_NAMES)))


def test_synthetic_boxes_are_exact():
    """A painted object's box is exactly the extent of the pixels it changed."""
    rng = np.random.default_rng(3)
    for shape in synthetic.SHAPES:
        for size in (12, 31, 80):
            img = np.zeros((120, 140, 3), np.float32)
            box = synthetic.paint(img, shape, "hstripes", 7, 5, size, rng)
            ys, xs = np.nonzero(img.any(axis=2))
            assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_synthetic_labels_match_boxes(synthetic_root):
    s = read_coco(synthetic_root, "train2017")
    ann = json.loads((synthetic_root / "annotations/instances_train2017.json").read_text())
    per_image = {}
    for a in ann["annotations"]:
        per_image.setdefault(a["image_id"], set()).add([synthetic.category_id(c) for c in range(len(synthetic.CLASS_NAMES))].index(a["category_id"]))
    for r in s.records:
        assert r.labels == sorted(per_image.get(r.image_id, set()))
        assert sorted(set(r.gt_classes.tolist())) == r.labels


def test_synthetic_cli(tmp_path):
    """As the README runs it: `python -m rgnn.data.synthetic --out DIR` (and --variant glyphs) in a fresh interpreter."""
    for variant in ("shapes", "glyphs"):
        run = subprocess.run([sys.executable, "-m", "rgnn.data.synthetic", "--out", str(tmp_path / variant), "--train",
                              "3", "--val", "1", "--seed", "1", "--variant", variant], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert len(list((tmp_path / variant / "train2017").glob("*.jpg"))) == 3 and "3 train" in run.stdout
        assert len(read_coco(tmp_path / variant, "val2017").records) == 1
    assert (tmp_path / "shapes/annotations/instances_train2017.json").read_bytes() != \
        (tmp_path / "glyphs/annotations/instances_train2017.json").read_bytes()


# ---------------------------------------------------------------- COCO reader

def _write_jpg(path, h=40, w=60, gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w) if gray else (h, w, 3), 128, np.uint8)
    cv2.imwrite(str(path), img)


@pytest.fixture
def coco_tree(tmp_path):
    root = tmp_path / "coco"
    _write_jpg(root / "val2017" / "a.jpg")
    _write_jpg(root / "val2017" / "b.png", gray=True)
    _write_jpg(root / "val2017" / "c.jpg")
    doc = {
        "images": [{"id": 30, "file_name": "a.jpg", "width": 60, "height": 40},
                   {"id": 10, "file_name": "b.png", "width": 60, "height": 40},
                   {"id": 20, "file_name": "c.jpg", "width": 60, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 30, "category_id": 90, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 30, "category_id": 1, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 7, "bbox": [50, 30, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 4, "image_id": 10, "category_id": 999, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                       {"id": 7, "name": "train"}],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return root


def test_coco_reader(coco_tree, caplog):
    with caplog.at_level(logging.WARNING):
        s = read_coco(coco_tree, "val2017")
    assert s.class_names == ["person", "train", "toothbrush"]  # ascending category id
    assert s.category_ids == [1, 7, 90]
    assert [r.image_id for r in s.records] == [10, 20, 30]
    by_id = {r.image_id: r for r in s.records}
    # crowd annotation: a label, not a box target
    assert by_id[30].labels == [0, 2]
    np.testing.assert_array_equal(by_id[30].gt_boxes, [[1, 2, 11, 12]])
    np.testing.assert_array_equal(by_id[30].gt_classes, [2])
    # image without annotations: kept, all negative
    assert by_id[20].labels == [] and by_id[20].gt_boxes.shape == (0, 4)
    np.testing.assert_array_equal(by_id[20].target(3), [0, 0, 0])
    # box outside the image: clipped with a warning naming the file
    np.testing.assert_array_equal(by_id[10].gt_boxes, [[50, 30, 60, 40]])
    assert "clipped" in caplog.text and "instances_val2017.json" in caplog.text
    # annotation with an unknown category: skipped and listed
    assert len(s.skipped) == 1 and "annotation 4" in s.skipped[0][0]
    # grayscale PNG decodes to RGB
    assert decode_image(by_id[10].path).shape == (40, 60, 3)


def test_coco_missing_image_is_skipped_and_listed(coco_tree):
    (coco_tree / "val2017" / "c.jpg").unlink()
    s = read_coco(coco_tree, "val2017")
    assert [r.image_id for r in s.records] == [10, 30]
    assert any("c.jpg" in where and "missing" in why for where, why in s.skipped)


def test_coco_bad_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        read_coco(tmp_path, "val2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2017.json"):
        read_coco(tmp_path, "val2017")


# ---------------------------------------------------------------- VOC reader

def _voc_xml(objects, w=60, h=40):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects)
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"


@pytest.fixture
def voc_tree(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem in ("000001", "000002"):
        _write_jpg(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / "000001.xml").write_text(_voc_xml(
        [("dog", False, (1, 1, 20, 20)), ("person", True, (5, 5, 30, 30)), ("dog", True, (2, 2, 8, 8))]))
    (root / "Annotations" / "000002.xml").write_text(_voc_xml([("tvmonitor", False, (10, 10, 70, 30))]))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    return root


def test_voc_reader(voc_tree):
    s = read_voc(voc_tree.parent, "trainval")  # VOCdevkit folder resolves to its one year
    assert s.name == "voc2007/trainval" and s.class_names == list(VOC_CLASSES)
    r1, r2 = s.records
    dog, person = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    assert r1.labels == sorted([dog, person])
    np.testing.assert_array_equal(r1.difficult, [False, True, True])
    np.testing.assert_array_equal(r1.gt_boxes[0], [0, 0, 20, 20])  # 1-based -> 0-based
    ignore = r1.difficult_only(20)
    assert ignore[person] and not ignore[dog] and ignore.sum() == 1
    np.testing.assert_array_equal(r2.gt_boxes, [[9, 9, 60, 30]])  # clipped to the 60 px width


def test_voc_broken_xml_names_file(voc_tree):
    (voc_tree / "Annotations" / "000002.xml").write_text("<annotation><size>")
    with pytest.raises(ValueError, match="000002.xml"):
        read_voc(voc_tree, "trainval")


def test_voc_unknown_class_and_missing_set(voc_tree):
    (voc_tree / "Annotations" / "000002.xml").write_text(_voc_xml([("unicorn", False, (1, 1, 5, 5))]))
    with pytest.raises(ValueError, match="unicorn"):
        read_voc(voc_tree, "trainval")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        read_voc(voc_tree, "test")


# ---------------------------------------------------------------- decoding

def test_decode_image_errors(tmp_path):
    good = tmp_path / "g.jpg"
    _write_jpg(good)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.jpg"):
        decode_image(tmp_path / "trunc.jpg")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        decode_image(tmp_path / "nope.jpg")
    assert decode_image(data).shape == (40, 60, 3)


def test_glyph_variant_is_another_labelled_set(tmp_path):
    root = synthetic.generate(tmp_path, train=12, val=4, seed=3, variant="glyphs")
    labeled = read_coco(root, "train2017")
    assert labeled.class_names == list(synthetic.GLYPHS)
    assert all(len(r.gt_boxes) >= 1 for r in labeled.records)  # every image has a glyph
    for r in labeled.records:
        image = decode_image(r.path)
        for x1, y1, x2, y2 in r.gt_boxes:
            assert 0 <= x1 < x2 <= r.width and 0 <= y1 < y2 <= r.height and image.shape[:2] == (r.height, r.width)
    with pytest.raises(ValueError, match="variant"):
        synthetic.generate(tmp_path / "x", 1, 1, variant="letters")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "animated"])
def test_every_image_mode_decodes_to_its_8_bit_rgb(mode, tmp_path):
    from PIL import Image

    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # (8, 64) a ramp from 0 to 252
    fmt = "TIFF" if mode == "CMYK" else "GIF" if mode in ("P", "animated") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    if mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 16-bit: the same ramp, full range
    elif mode == "animated":
        frames = [Image.fromarray(grey).convert("P"), Image.fromarray(255 - grey).convert("P")]
        frames[0].save(path, save_all=True, append_images=frames[1:])
    else:
        Image.fromarray(grey).convert(mode).save(path, fmt)
    rgb = decode_image(path)
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    if mode == "CMYK":  # CMYK -> RGB is PIL's naive inversion: grey stays ordered, not exact
        assert (np.diff(rgb[0, :, 0].astype(int)) >= 0).all() and rgb[0, -1, 0] > rgb[0, 0, 0] + 200
    else:
        np.testing.assert_allclose(rgb[..., 0], grey, atol=2)  # the first frame, never all white


def _coco_doc(tmp_path, edit):
    """A valid 2-image COCO file under tmp_path, changed by `edit(doc)`."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(root / "val2017" / name), np.zeros((20, 30, 3), np.uint8))
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20},
                      {"id": 2, "file_name": "b.jpg", "width": 30, "height": 20}],
           "categories": [{"id": 5, "name": "cat"}, {"id": 7, "name": "dog"}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0},
                           {"id": 11, "image_id": 2, "category_id": 7, "bbox": [2, 2, 6, 6], "iscrowd": 0}]}
    edit(doc)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["images"].append({"id": 1, "file_name": "b.jpg", "width": 30, "height": 20}), r"duplicate image ids \[1\]"),
    (lambda d: d["categories"].append({"id": 5, "name": "cat2"}), r"duplicate category ids \[5\]"),
    (lambda d: d["images"][0].pop("width"), "image 1 .*width and height"),
    (lambda d: d["images"][1].update(height="tall"), "image 2 .*width and height"),
    (lambda d: d["images"][1].pop("file_name"), "image 2 has no file_name"),
    (lambda d: d["images"][1].update(id="2"), "image ids must be integers"),
    (lambda d: d["images"][0].update(file_name="../../etc/passwd"), "leaves the image folder"),
    (lambda d: d["images"][0].update(file_name="/etc/passwd"), "leaves the image folder"),
    (lambda d: d["images"][1].update(file_name="./a.jpg"), r"images 1 and 2 have one file './a.jpg'"),
    (lambda d: d["categories"][1].update(name="cat"), "categories 5 and 7 are both named 'cat'"),
    (lambda d: d["categories"][1].pop("name"), "category 7 has no name"),
])
def test_coco_files_with_broken_invariants_are_named_errors(tmp_path, edit, match):
    root = _coco_doc(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as e:
        read_coco(root, "val2017")
    assert "instances_val2017.json" in str(e.value)


def test_coco_orphan_and_nan_annotations_are_left_out_and_counted(tmp_path):
    def edit(d):
        d["annotations"].append({"id": 12, "image_id": 99, "category_id": 5, "bbox": [1, 1, 2, 2]})
        d["annotations"].append({"id": 13, "image_id": 2, "category_id": 5, "bbox": [float("nan"), 1, 2, 2]})
    labeled = read_coco(_coco_doc(tmp_path, edit), "val2017")
    reasons = {where.split(" annotation ")[1].split(" ")[0]: why for where, why in labeled.skipped}
    assert reasons["12"] == "points at no image" and "not finite" in reasons["13"]
    assert [r.labels for r in labeled.records] == [[0], [1]]  # the good annotations are kept


def test_coco_bbox_and_iscrowd_of_the_wrong_kind_are_left_out_and_counted(tmp_path):
    """A string bbox ("1234" would unpack as 1, 2, 3, 4), the wrong length, an iscrowd other than 0/1/bool."""
    bad = {12: {"bbox": "1234"}, 13: {"bbox": [1, 1, 5]}, 14: {"bbox": [1, 1, 5, 5, 5]},
           15: {"bbox": [1, "1", 5, 5]}, 16: {"iscrowd": 2}, 17: {"iscrowd": "yes"}, 18: {"iscrowd": True}}

    def edit(d):
        for i, fields in bad.items():
            d["annotations"].append({"id": i, "image_id": 2, "category_id": 5, "bbox": [1, 1, 5, 5], **fields})
    labeled = read_coco(_coco_doc(tmp_path, edit), "val2017")
    reasons = {where.split(" annotation ")[1].split(" ")[0]: why for where, why in labeled.skipped}
    assert sorted(reasons) == ["12", "13", "14", "15", "16", "17"]  # iscrowd True is a crowd
    assert all("is not a list of 4 numbers" in reasons[i] for i in ("12", "13", "14", "15"))
    assert "iscrowd 2 is not 0 or 1" in reasons["16"] and "iscrowd 'yes'" in reasons["17"]
    assert all("instances_val2017.json annotation" in where for where, _ in labeled.skipped)
    assert [r.labels for r in labeled.records] == [[0], [0, 1]]  # the crowd counts as a label, not a box
    np.testing.assert_array_equal(labeled.records[1].gt_boxes, [[2, 2, 8, 8]])


def test_coco_json_nested_thousands_deep_is_a_named_error(tmp_path):
    root = _coco_doc(tmp_path, lambda d: None)
    (root / "annotations" / "instances_val2017.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"instances_val2017.json: its JSON is nested too deeply"):
        read_coco(root, "val2017")


def test_voc_non_finite_boxes_are_left_out_and_listed(voc_tree):
    (voc_tree / "Annotations" / "000002.xml").write_text(_voc_xml(
        [("cat", False, ("nan", 1, 5, 5)), ("dog", False, (1, 1, "inf", 5)), ("tvmonitor", False, (10, 10, 70, 30))]))
    s = read_voc(voc_tree, "trainval")
    r2 = s.records[1]
    assert r2.labels == [VOC_CLASSES.index("tvmonitor")]
    np.testing.assert_array_equal(r2.gt_boxes, [[9, 9, 60, 30]])
    assert [(w.split("/")[-1], why) for w, why in s.skipped] == [
        ("000002.xml object 0 (cat)", "box [nan, 1.0, 5.0, 5.0] is not finite"),
        ("000002.xml object 1 (dog)", "box [1.0, 1.0, inf, 5.0] is not finite")]


@pytest.mark.parametrize("stem", ["../VOC2012/000001", "sub/000001", "..\\000001", ".."])
def test_voc_an_image_set_naming_a_path_is_refused(voc_tree, stem):
    list_file = voc_tree / "ImageSets" / "Main" / "trainval.txt"
    list_file.write_text(f"000001\n{stem}\n")
    with pytest.raises(ValueError, match=re.escape(f"{list_file}: image {stem!r} is not a file stem")):
        read_voc(voc_tree, "trainval")


def test_a_label_outside_the_class_list_is_an_error_not_the_last_class():
    from rgnn.data.records import ImageRecord

    rec = ImageRecord(7, "x.jpg", 4, 4, [0, 2])
    assert rec.target(3).tolist() == [1.0, 0.0, 1.0]
    for labels in ([-1], [3], [1.5]):
        with pytest.raises(ValueError, match="image 7: labels"):
            ImageRecord(7, "x.jpg", 4, 4, labels).target(3)
