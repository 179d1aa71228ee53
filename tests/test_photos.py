"""The photographic set (rgnn/data/photos.py): boxes are the visible alpha after every paste (checked
against a per-pixel painter's model), instances never cross splits, the same seed gives the same files,
and missing Debian packages are named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rgnn.data import photos
from rgnn.data.coco import read_coco

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not photos.STAMPS.is_dir() or not photos.BACKGROUNDS.is_dir(),
                                reason="needs Debian's " + photos.PACKAGES + " (.ci/system-packages installs them)")


@pytest.fixture(scope="module")
def library():
    return photos.Library.load("main", seed=0)


def painter(pastes: list[photos.Paste]) -> np.ndarray:
    """int [H, W]: the index of the last paste whose footprint covers each pixel, -1 for none."""
    W, H = photos.SIZE
    top = np.full((H, W), -1)
    for k, p in enumerate(pastes):
        ys, xs = np.nonzero(p.footprint)
        top[ys + p.y, xs + p.x] = k
    return top


def test_boxes_are_the_extent_of_the_visible_alpha(library):
    seen = hidden = 0
    for i in range(40):
        img, objects, pastes = photos.compose(np.random.default_rng([3, i]), library, "train2017")
        assert img.shape == (288, 384, 3) and img.dtype == np.uint8
        top = painter(pastes)
        expected = []
        for k, p in enumerate(pastes):
            if p.cls is None:
                continue
            own = p.footprint.sum()
            ys, xs = np.nonzero(top == k)
            if len(ys) >= photos.VISIBLE * own and len(ys):
                expected.append((p.cls, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]))
                area = (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min()) / (384 * 288)
                assert area <= photos.OBJECT_AREA[1] + 0.02  # the visible extent stays within 1-30%
            else:
                hidden += 1
        assert objects == expected
        seen += len(objects)
        assert len([p for p in pastes if p.cls is not None]) <= 4
    assert seen > 40 and hidden >= 1  # objects on most images, and some mostly hidden ones left out


def test_instances_are_disjoint_between_splits_and_every_class_has_both(library):
    for name, train, val in zip(library.class_names, library.train, library.val):
        assert train and val and not set(train) & set(val), name
        assert all("cartoon" not in f.parts and not f.stem.endswith("_mirror") for f in train + val)
    every = [f for files in library.train + library.val for f in files]
    assert len(every) == len(set(every))  # no stamp in two classes
    assert not set(library.clutter) & set(every)
    assert len(library.class_names) == 12 and len(library.backgrounds) == 4
    alt = photos.Library.load("alt", seed=0)
    assert set(alt.class_names) != set(library.class_names) and not set(alt.backgrounds) & set(library.backgrounds)


def test_the_generated_set_is_coco_deterministic_and_val_objects_are_unseen(tmp_path, library):
    a = photos.generate(tmp_path / "a", train=6, val=4, seed=1)
    b = photos.generate(tmp_path / "b", train=6, val=4, seed=1)
    c = photos.generate(tmp_path / "c", train=6, val=4, seed=2)
    for split in ("train2017", "val2017"):
        files = sorted(p.name for p in (a / split).iterdir())
        assert [(a / split / f).read_bytes() for f in files] == [(b / split / f).read_bytes() for f in files]
        ann = f"annotations/instances_{split}.json"
        assert (a / ann).read_bytes() == (b / ann).read_bytes() != (c / ann).read_bytes()
        labeled = read_coco(a, split)
        assert labeled.class_names == library.class_names and len(labeled.records) == (6 if split == "train2017" else 4)
    doc = json.loads((a / "annotations" / "instances_train2017.json").read_text())
    assert doc["annotations"] and all(a_["bbox"][2] > 0 and a_["bbox"][3] > 0 for a_ in doc["annotations"])


def test_missing_debian_packages_name_the_apt_get_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="sudo apt-get install tuxpaint-stamps-default mate-backgrounds"):
        photos.Library.load("main", stamps=tmp_path / "none")
    run = subprocess.run([sys.executable, "-m", "rgnn.data.photos", "--out", str(tmp_path / "x"), "--train", "2",
                          "--val", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "wrote 2 train + 1 val images" in run.stdout, run.stderr
    help_text = subprocess.run([sys.executable, "-m", "rgnn.data.photos", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300).stdout
    assert "--variant" in help_text and "apt-get install" in help_text
