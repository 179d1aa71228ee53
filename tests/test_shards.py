"""The shard format (rgnn.data.shardformat) and the reading side (rgnn.data.shards). Shards are built in
this process (`actors=0`, no Ray); tests/test_sharding.py runs the Ray job."""
import hashlib
import io
import os
import json
import re
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch


from rgnn.data import shards  # noqa: E402
from rgnn.data.coco import read_coco  # noqa: E402
from rgnn.data.records import ImageRecord, LabeledSet  # noqa: E402
from rgnn.data.shardformat import add_sample, decode_sample, encode_sample  # noqa: E402
from rgnn.data.transforms import InputConfig, Preprocess  # noqa: E402
from rgnn.nn.backbones import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from rgnn.data.proposals import ProposalParams  # noqa: E402
from sharding.job import build_shards, plan_shards  # noqa: E402

MAX_BOXES = 60


def load(split_dir, *, image_size=224, max_size=None, max_regions=200, global_size=None, **kwargs):
    """shards.shard_loader with the input given field by field."""
    inputs = InputConfig(image_size, max_size, global_size, max_regions)
    preprocess = Preprocess(inputs, IMAGENET_MEAN, IMAGENET_STD, whole_image=global_size is not None)
    return shards.shard_loader(split_dir, preprocess, **kwargs)


def tar_samples(path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} of one shard, read with plain tarfile (independent of the reader)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, field = m.name.split(".", 1)
            out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def _three_unequal_shards(records, max_boxes):
    """A shard size that cuts `records` into exactly 3 shards of different sizes."""
    for size in range(20_000, 400_000, 1_000):
        counts = [len(t.records) for t in plan_shards(records, "x", size, max_boxes)]
        if len(counts) == 3 and len(set(counts)) > 1:
            return size
    raise AssertionError("no shard size gives 3 unequal shards")


@pytest.fixture(scope="module")
def built(synthetic_root, tmp_path_factory):
    """23 images (an odd count) in 3 shards of unequal size."""
    labeled = read_coco(synthetic_root, "train2017")
    labeled = LabeledSet(labeled.name, labeled.class_names, labeled.records[:23], labeled.category_ids)
    size = _three_unequal_shards(labeled.records, MAX_BOXES)
    out = build_shards(labeled, tmp_path_factory.mktemp("shards"), actors=0, shard_size=size,
                       params=ProposalParams(max_boxes=MAX_BOXES), progress=False)
    return out, labeled


def test_manifest_and_format(built):
    split_dir, labeled = built
    m = shards.read_manifest(split_dir)
    assert split_dir.name == "train2017" and m["split"] == "train2017" and m["complete"]
    assert m["class_names"] == labeled.class_names and m["category_ids"] == labeled.category_ids
    assert m["proposals"]["max_boxes"] == MAX_BOXES and m["records"] == 23
    assert [e["name"] for e in m["shards"]] == [f"train2017-{i:06d}.tar" for i in range(3)]
    assert len({e["samples"] for e in m["shards"]}) > 1
    assert sum(e["samples"] for e in m["shards"]) == m["samples"] == 23 and m["skipped"] == []
    by_id = {str(r.image_id): r for r in labeled.records}
    seen = []
    for e in m["shards"]:
        path = split_dir / e["name"]
        data = path.read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
        samples = tar_samples(path)
        assert len(samples) == e["samples"]
        for key, s in samples.items():
            rec = by_id[key]
            seen.append(key)
            assert set(s) == {"jpg", "boxes.npy", "scores.npy", "json"}
            assert s["jpg"] == Path(rec.path).read_bytes()  # never re-encoded
            boxes = np.load(io.BytesIO(s["boxes.npy"]))
            scores = np.load(io.BytesIO(s["scores.npy"]))
            assert boxes.dtype == scores.dtype == np.float32
            assert boxes.shape == (len(scores), 4) and 0 < len(scores) <= MAX_BOXES
            assert np.all(np.diff(scores) <= 0)
            assert np.all(boxes[:, 2:] > boxes[:, :2]) and boxes.min() >= 0
            assert np.all(boxes[:, [2, 3]] <= [rec.width, rec.height])
            meta = json.loads(s["json"])
            assert meta["id"] == rec.image_id and meta["file"] == rec.path
            assert (meta["width"], meta["height"]) == (rec.width, rec.height) and meta["labels"] == rec.labels
            gt = np.asarray(meta["gt_boxes"], np.float32).reshape(-1, 5)
            np.testing.assert_allclose(gt[:, :4], rec.gt_boxes)
            assert gt[:, 4].astype(int).tolist() == rec.gt_classes.tolist()
            assert meta["difficult"] == rec.difficult.tolist()
    assert seen == [str(r.image_id) for r in labeled.records]  # every image once, in plan order
    shards.verify_shards(split_dir)
    # the proposals' recall, among training's T (half of what is stored) and among all stored
    recall = m["proposal_recall"]
    assert set(recall) == {str(MAX_BOXES // 2), str(MAX_BOXES)}
    objects = sum(len(r.gt_boxes) for r in labeled.records)
    assert all(r["objects"] == objects == sum(b["objects"] for b in r["bins"].values()) for r in recall.values())
    half, full = recall[str(MAX_BOXES // 2)], recall[str(MAX_BOXES)]
    assert 0 < half["recall@0.5"] <= full["recall@0.5"] <= 1 and full["recall@0.7"] <= full["recall@0.5"]


def test_batch_contents(built):
    split_dir, labeled = built
    by_id = {r.image_id: r for r in labeled.records}
    raw = {k: v for e in shards.read_manifest(split_dir)["shards"] for k, v in tar_samples(split_dir / e["name"]).items()}
    batches = list(load(split_dir, batch_size=4, image_size=64, max_size=80, max_regions=7,
                                       for_eval=True))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
    b = batches[0]
    C = len(labeled.class_names)
    assert b.images.dtype == torch.float32 and b.images.shape[:2] == (4, 3)
    assert b.image_sizes.dtype == torch.long and b.targets.shape == b.ignore.shape == (4, C)
    assert b.images.shape[2:] == tuple(b.image_sizes.max(0).values.tolist())
    for i, image_id in enumerate(b.ids):
        rec = by_id[image_id]
        h, w = b.image_sizes[i].tolist()
        assert min(h, w) == 64 or max(h, w) == 80  # shorter side S unless the longer side hits the cap
        assert max(h, w) <= 80
        assert torch.all(b.images[i, :, h:, :] == 0) and torch.all(b.images[i, :, :, w:] == 0)
        assert b.images[i, :, :h, :w].abs().sum() > 0
        sx, sy = w / rec.width, h / rec.height
        scale = torch.tensor([sx, sy, sx, sy])
        props = np.load(io.BytesIO(raw[str(image_id)]["boxes.npy"]))
        scores = np.load(io.BytesIO(raw[str(image_id)]["scores.npy"]))
        top = torch.from_numpy(props[np.argsort(-scores, kind="stable")[:7]]) * scale
        top[:, 0::2].clamp_(0, w)
        top[:, 1::2].clamp_(0, h)
        torch.testing.assert_close(b.boxes[i], top)
        torch.testing.assert_close(b.gt_boxes[i], torch.from_numpy(rec.gt_boxes) * scale)
        assert b.gt_classes[i].tolist() == rec.gt_classes.tolist()
        assert b.targets[i].tolist() == rec.target(C).tolist()
        assert not b.ignore[i].any()  # COCO has no difficult boxes
    moved = b.to("cpu")
    assert torch.equal(moved.images, b.images) and moved.ids == b.ids


def test_global_stage_squares_without_regions(built):
    split_dir, _ = built
    b = next(iter(load(split_dir, batch_size=5, global_size=48, seed=3)))
    assert b.images.shape == (5, 3, 48, 48)
    assert b.image_sizes.tolist() == [[48, 48]] * 5
    assert all(x.shape == (0, 4) for x in b.boxes)
    assert all(float(g.max()) <= 48 for g in b.gt_boxes if len(g))


def test_difficult_boxes_set_ignore(tmp_path, synthetic_root):
    """A class whose boxes are all VOC-difficult is flagged in Batch.ignore (VOC AP skips it)."""
    labeled = read_coco(synthetic_root, "val2017")
    rec = next(r for r in labeled.records if len(set(r.gt_classes.tolist())) >= 2)
    hard = int(rec.gt_classes[0])
    rec.difficult = rec.gt_classes == hard
    split_dir = build_shards(LabeledSet("voc/test", labeled.class_names, [rec], labeled.category_ids), tmp_path,
                             actors=0, params=ProposalParams(max_boxes=10), progress=False)
    b = next(iter(load(split_dir, batch_size=1, image_size=32, for_eval=True)))
    assert b.ignore[0].nonzero().flatten().tolist() == [hard]
    assert b.targets[0, hard] == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_equal_batch_counts(built, num_workers):
    """3 shards of unequal size on 2 ranks: both ranks yield steps_per_epoch full batches."""
    split_dir, _ = built
    steps = shards.steps_per_epoch(split_dir, batch_size=3, world_size=2)
    assert steps == 23 // 2 // 3
    counts = []
    for rank in range(2):
        loader = load(split_dir, batch_size=3, image_size=32, max_regions=5, rank=rank,
                                     world_size=2, num_workers=num_workers, seed=1, epoch=2)
        batches = list(loader)
        assert len(loader) == len(batches) == steps
        assert all(len(b) == 3 for b in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1]


def test_more_slots_than_shards_still_balanced(built):
    """4 ranks x 2 DataLoader workers = 8 slots over 3 shards: shards are cut into parts, and every
    rank still yields exactly steps_per_epoch batches."""
    split_dir, _ = built
    steps = shards.steps_per_epoch(split_dir, batch_size=2, world_size=4)
    for rank in range(4):
        loader = load(split_dir, batch_size=2, image_size=16, max_regions=1, rank=rank,
                                     world_size=4, num_workers=2, seed=0)
        assert len(list(loader)) == len(loader) == steps


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_covers_every_sample_once(built, num_workers):
    split_dir, labeled = built
    per_rank = []
    for rank in range(2):
        loader = load(split_dir, batch_size=4, image_size=32, max_regions=3, rank=rank,
                                     world_size=2, num_workers=num_workers, for_eval=True)
        batches = list(loader)
        assert len(loader) == len(batches)
        per_rank.append([i for b in batches for i in b.ids])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(r.image_id for r in labeled.records)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(map(len, per_rank)) == [11, 12]


def test_shuffle_is_seeded_per_epoch(built):
    split_dir, _ = built

    def order(epoch):
        return [i for b in load(split_dir, batch_size=3, image_size=16, max_regions=1,
                                               seed=5, epoch=epoch) for i in b.ids]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_missing_or_corrupt_shard_is_named(built, tmp_path):
    src, _ = built
    name = "train2017-000001.tar"

    def copy():
        dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}" / "train2017"
        shutil.copytree(src, dst)
        return dst

    d = copy()
    (d / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        load(d, batch_size=2)
    with pytest.raises(FileNotFoundError, match=name):
        shards.verify_shards(d)

    d = copy()
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=name):
        load(d, batch_size=2)

    d = copy()
    flipped = bytearray((d / name).read_bytes())
    flipped[700] ^= 0xFF  # same size, different bytes
    (d / name).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=name):
        shards.verify_shards(d)

    d = copy()
    junk = bytes(len(data))  # right size, not a tar: the reader names the shard
    (d / name).write_bytes(junk)
    with pytest.raises(ValueError, match=name):
        list(load(d, batch_size=2, for_eval=True))


def test_manifest_errors_name_the_file(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / "manifest.json")):
        shards.read_manifest(tmp_path)
    src, _ = built
    d = tmp_path / "incomplete"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="incomplete"):
        shards.verify_shards(d)
    with pytest.raises(ValueError, match="incomplete"):
        load(d, batch_size=2)


@pytest.mark.parametrize("ext, image_id", [(".jpg", "2008_000123.v2"), (".png", 17), (".webp", 5)])
def test_a_written_sample_reads_back_as_written(tmp_path, ext, image_id):
    """The writer's encoding (encode_sample, add_sample) through the reader's shard reading and decoding."""
    pixels = np.random.default_rng(0).integers(0, 255, (12, 20, 3), np.uint8)
    data = cv2.imencode(ext, pixels)[1].tobytes()
    rec = ImageRecord(image_id, str(tmp_path / f"a{ext}"), 20, 12, [0, 3],
                      np.array([[1, 2, 10.5, 11], [0, 0, 20, 12]], np.float32), np.array([3, 0], np.int64),
                      np.array([False, True]))
    boxes = np.random.default_rng(1).uniform(0, 12, (7, 4)).astype(np.float32)
    scores = np.sort(np.random.default_rng(2).uniform(size=7))[::-1]  # float64: stored as float32
    sample = encode_sample(rec, data, boxes, scores)
    with tarfile.open(tmp_path / "x.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, sample)
    (raw,) = shards._read_shard(str(tmp_path / "x.tar"), 1)
    assert {k: v for k, v in raw.items() if not k.startswith("__")} == {k: v for k, v in sample.items() if k != "__key__"}
    s = decode_sample(raw, "x.tar")
    assert s.key == sample["__key__"] == str(image_id).replace(".", "_")
    assert s.image_field == {".jpg": "jpg", ".png": "png", ".webp": "webp"}[ext] and s.image == data
    assert s.boxes.dtype == s.scores.dtype == np.float32
    np.testing.assert_array_equal(s.boxes, boxes)
    np.testing.assert_array_equal(s.scores, scores.astype(np.float32))
    got = s.record
    assert (got.image_id, got.path, got.width, got.height, got.labels) == (image_id, rec.path, 20, 12, [0, 3])
    np.testing.assert_array_equal(got.gt_boxes, rec.gt_boxes)
    assert got.gt_classes.tolist() == [3, 0] and got.difficult.tolist() == [False, True]
    assert json.loads(raw["json"]) == {"id": image_id, "file": rec.path, "width": 20, "height": 12, "labels": [0, 3],
                                       "gt_boxes": [[1, 2, 10.5, 11, 3], [0, 0, 20, 12, 0]],
                                       "difficult": [False, True]}


def test_a_sample_missing_a_field_is_named():
    sample = encode_sample(ImageRecord("a", "a.jpg", 1, 1, []), b"\xff\xd8\xff", np.zeros((0, 4)), np.zeros(0))
    del sample["scores.npy"]
    with pytest.raises(ValueError, match=r"x.tar sample 'a'.*scores.npy"):
        decode_sample(sample, "x.tar")


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("field, data, what", [
    ("boxes.npy", _npy_header((10 ** 11, 4)) + bytes(16), r"boxes.npy declares shape \(100000000000, 4\)"),
    ("boxes.npy", _npy_header((2, -4)) + bytes(32), r"boxes.npy declares shape \(2, -4\)"),
    ("scores.npy", _npy_header((3,), "<f8") + bytes(24), "scores.npy holds float64, expected float32"),
    ("scores.npy", _npy_header((1,), "|O") + bytes(8), "scores.npy holds object, expected float32"),
    ("scores.npy", b"\x93NUMPY\x01", "scores.npy is not a .npy array"),
])
def test_a_npy_field_is_checked_from_its_header_before_it_is_read(field, data, what):
    """A header declaring 1.6 TB is refused before numpy allocates it; only float32 is read."""
    sample = encode_sample(ImageRecord("a", "a.jpg", 1, 1, []), b"\xff\xd8\xff", np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match=r"x.tar sample 'a': " + what):
        decode_sample({**sample, field: data}, "x.tar")


def test_a_sample_whose_json_is_nested_thousands_deep_is_named():
    sample = encode_sample(ImageRecord("a", "a.jpg", 1, 1, []), b"\xff\xd8\xff", np.zeros((0, 4)), np.zeros(0))
    sample["json"] = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ValueError, match=r"x.tar sample 'a': its json is nested too deeply"):
        decode_sample(sample, "x.tar")


def test_a_manifest_listing_a_shard_outside_its_split_is_refused(built, tmp_path):
    """An absolute path or `..` would read another split's shard (here: a copy of the same one, size and all)."""
    src, _ = built
    other = tmp_path / "val2017"
    shutil.copytree(src, other)
    d = tmp_path / "train2017"
    for name in (str(other / "train2017-000001.tar"), "../val2017/train2017-000001.tar", "..\\val2017\\x.tar", ""):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        m = json.loads((d / "manifest.json").read_text())
        m["shards"][1]["name"] = name
        (d / "manifest.json").write_text(json.dumps(m))
        pattern = re.escape(f"{d / 'manifest.json'}: shard {name!r} is not a file name in the split's folder")
        with pytest.raises(ValueError, match=pattern):
            load(d, batch_size=2)
        with pytest.raises(ValueError, match=pattern):
            shards.verify_shards(d)


def test_png_source_keeps_its_bytes(tmp_path, synthetic_root):
    labeled = read_coco(synthetic_root, "val2017")
    rec = labeled.records[0]
    image = cv2.imread(rec.path, cv2.IMREAD_GRAYSCALE)  # a grayscale PNG
    png = tmp_path / "img.png"
    cv2.imwrite(str(png), image)
    rec.path = str(png)
    split_dir = build_shards(LabeledSet("x/val2017", labeled.class_names, [rec], labeled.category_ids),
                             tmp_path / "out", actors=0, params=ProposalParams(max_boxes=10), progress=False)
    (s,) = tar_samples(split_dir / "val2017-000000.tar").values()
    assert set(s) == {"png", "boxes.npy", "scores.npy", "json"} and s["png"] == png.read_bytes()
    b = next(iter(load(split_dir, batch_size=1, image_size=24, for_eval=True)))
    assert b.images.shape[1] == 3 and min(b.image_sizes[0].tolist()) == 24


def test_bad_arguments(built):
    split_dir, _ = built
    for kwargs in ({"batch_size": 0}, {"batch_size": 2, "rank": 2, "world_size": 2},
                   {"batch_size": 2, "max_regions": -1}):
        with pytest.raises(ValueError):
            load(split_dir, **kwargs)
    with pytest.raises(ValueError):
        shards.steps_per_epoch(split_dir, batch_size=0, world_size=1)
    assert shards.class_names(split_dir) == shards.read_manifest(split_dir)["class_names"]


def test_shards_follow_their_sources(synthetic_root, tmp_path, caplog):
    """Relabelling an image or replacing its file rebuilds exactly the shard that holds it."""
    import dataclasses

    src = tmp_path / "src"
    shutil.copytree(synthetic_root, src)
    labeled = read_coco(src, "train2017")
    labeled = LabeledSet(labeled.name, labeled.class_names, labeled.records[:23], labeled.category_ids)
    size = _three_unequal_shards(labeled.records, MAX_BOXES)
    kw = dict(actors=0, shard_size=size, params=ProposalParams(max_boxes=MAX_BOXES), progress=False)
    split_dir = build_shards(labeled, tmp_path / "out", **kw)
    before = {e["name"]: e["sha256"] for e in shards.read_manifest(split_dir)["shards"]}
    first = shards.read_manifest(split_dir)["shards"][0]["samples"]

    relabelled = list(labeled.records)
    r = relabelled[first]  # the first image of the second shard gets another class
    relabelled[first] = dataclasses.replace(r, gt_classes=(r.gt_classes + 1) % 10, labels=sorted({(c + 1) % 10 for c in r.labels}))
    caplog.set_level("WARNING")
    split_dir = build_shards(LabeledSet(labeled.name, labeled.class_names, relabelled, labeled.category_ids),
                             tmp_path / "out", **kw)
    after = {e["name"]: e["sha256"] for e in shards.read_manifest(split_dir)["shards"]}
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed == ["train2017-000001.tar"] and "inputs (annotations or image files) of 1 shards changed" in caplog.text
    meta = json.loads(tar_samples(split_dir / changed[0])[str(r.image_id)]["json"])
    assert meta["labels"] == relabelled[first].labels  # trained on the new labels

    os.utime(relabelled[-1].path, ns=(1, 1))  # the last image's file changed on disk
    split_dir = build_shards(LabeledSet(labeled.name, labeled.class_names, relabelled, labeled.category_ids),
                             tmp_path / "out", **kw)
    again = {e["name"]: e["sha256"] for e in shards.read_manifest(split_dir)["shards"]}
    assert [n for n in after if after[n] != again[n]] == [] and "of 1 shards changed" in caplog.text


def test_a_second_build_on_the_same_folder_stops_with_a_clear_error(built):
    from sharding.writer import exclusive

    split_dir, labeled = built
    with exclusive(str(split_dir)):  # a first job holds the folder
        with pytest.raises(RuntimeError, match="another sharding job is writing"):
            build_shards(labeled, split_dir.parent, actors=0, params=ProposalParams(max_boxes=MAX_BOXES), progress=False)
    shards.verify_shards(split_dir)  # nothing of the first job's was touched


def test_written_files_take_the_umask_mode(tmp_path):
    """Shards, manifests, checkpoints and predictions are readable by the other users of a shared folder
    as a plain open() would leave them (mkstemp alone gives 0600)."""
    import os

    from rgnn.io.storage import write_text

    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.json", "{}")
        assert (path.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (write_text(tmp_path / "b.json", "{}").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
