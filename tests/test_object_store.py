"""Every storage location as an object-store URI, against a real S3-compatible server on loopback
(moto's standalone server): shards written to and resumed on the store, training streaming from it,
corrupt shards named there, checkpoints saved to and loaded from it (weights only, size-bounded),
the errors of a missing object, bucket or credentials. A Ray Train run on the store: tests/test_deployment.py."""
from __future__ import annotations

import argparse
import functools
import hashlib

import numpy as np
import pytest
import torch

import sharding.job as build_module
from cluster.data import prepare_shards
from rgnn.io import checkpoint, storage
from rgnn.train.config import TrainConfig, resolve
from rgnn.data import shards
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.data.transforms import InputConfig, Preprocess
from rgnn.nn.model import RGNN
from rgnn.infer.predict import Predictor
from rgnn.data.proposals import ProposalParams
from rgnn.train.stages import Hooks, model_config, run_stages
from sharding.job import build_shards

s3fs = pytest.importorskip("s3fs")
torch.set_num_threads(1)
BUCKET = "rgnn-test"  # conftest's s3
PARAMS = ProposalParams(max_boxes=16)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Checkpoints named by a URI are downloaded under tmp_path, not the user's ~/.cache."""
    monkeypatch.setattr(checkpoint, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def s3_shards(s3, synthetic_root):
    """`synthetic_root`'s splits as shards on the store, built as conftest's `shard_root` builds them locally."""
    out = f"{s3}/shards"
    for split in ("train2017", "val2017"):
        build_shards(read_coco(synthetic_root, split), out, actors=0, shard_size=60_000, params=PARAMS,
                     progress=False)
    return out


@functools.cache
def client() -> s3fs.S3FileSystem:
    """The tests' own client of the store (not the code's instance), listing afresh every time."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def objects(prefix: str) -> dict[str, bytes]:
    """name -> bytes of every object under a prefix."""
    return {p.rsplit("/", 1)[-1]: client().cat_file(p) for p in client().find(prefix.removeprefix("s3://"))}


def put(uri: str, data: bytes) -> None:
    client().pipe_file(uri.removeprefix("s3://"), data)


def test_shards_built_on_the_store_match_their_manifest_and_resume(s3_shards, shard_root, synthetic_root,
                                                                   monkeypatch):
    split_dir = f"{s3_shards}/train2017"
    m = shards.read_manifest(split_dir)
    stored = objects(split_dir)
    assert m["complete"] and len(m["shards"]) >= 3
    assert sorted(stored) == sorted([e["name"] for e in m["shards"]] + ["manifest.json"])  # no temporaries left
    for e in m["shards"]:
        assert len(stored[e["name"]]) == e["bytes"] and hashlib.sha256(stored[e["name"]]).hexdigest() == e["sha256"]
    assert m["shards"] == shards.read_manifest(shard_root / "train2017")["shards"]  # the bytes a local build writes
    shards.verify_shards(split_dir)

    built = []
    real = build_module.write_shard
    monkeypatch.setattr(build_module, "write_shard",
                        lambda task, *a, **k: built.append(task.name) or real(task, *a, **k))
    labeled = read_coco(synthetic_root, "train2017")
    build_shards(labeled, s3_shards, actors=0, shard_size=60_000, params=PARAMS, progress=False)
    assert built == []  # every shard verified on the store and kept

    victim = m["shards"][1]["name"]
    flipped = bytearray(stored[victim])
    flipped[700] ^= 0xFF  # same size, other bytes: only its sha256 tells
    put(f"{split_dir}/{victim}", bytes(flipped))
    build_shards(labeled, s3_shards, actors=0, shard_size=60_000, params=PARAMS, progress=False)
    assert built == [victim]
    assert objects(split_dir)[victim] == stored[victim] and shards.read_manifest(split_dir)["shards"] == m["shards"]


def test_training_streams_its_shards_from_the_store(s3_shards, shard_root):
    cfg = resolve(TrainConfig.from_flat({"shards": s3_shards, "smoke_test": True, "max_regions": 8, "image_size": 96,
                                         "global_size": 64, "batch_size": 6, "epochs": [1, 0, 0, 1]}))
    train_dir, val_dir = prepare_shards(cfg.data, cfg.input)  # checks sizes and sha256 on the store
    assert (train_dir, val_dir) == (f"{s3_shards}/train2017", f"{s3_shards}/val2017")

    preprocess = Preprocess(InputConfig(image_size=96, max_size=128, global_size=64, max_regions=8), MEAN, STD)
    remote = list(shards.shard_loader(val_dir, preprocess, batch_size=5, for_eval=True))
    local = list(shards.shard_loader(shard_root / "val2017", preprocess, batch_size=5, for_eval=True))
    assert [b.ids for b in remote] == [b.ids for b in local] and len(remote) == 3
    assert all(torch.equal(r.images, lo.images) and torch.equal(r.targets, lo.targets)
               for r, lo in zip(remote, local))

    names = shards.class_names(train_dir)
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    reports = []
    stage, result = run_stages(cfg, model, names, train_dir, val_dir, torch.device("cpu"),
                               hooks=Hooks(report=lambda s, m: reports.append((s.stage, s.epoch))))
    assert reports == [("global", 1), ("joint", 1)] and stage == "joint"
    assert result["scores"].shape == (12, len(names))  # every val image once, read from the store


def test_a_corrupt_or_missing_shard_on_the_store_is_named(s3_shards):
    src = objects(f"{s3_shards}/train2017")
    name = "train2017-000001.tar"

    def copy(tag: str) -> str:
        d = f"s3://{BUCKET}/broken-{tag}/train2017"
        for n, data in src.items():
            put(f"{d}/{n}", data)
        return d

    def load(d: str, **kw):
        pre = Preprocess(InputConfig(image_size=96, max_size=128, global_size=64, max_regions=8), MEAN, STD)
        return list(shards.shard_loader(d, pre, batch_size=2, **kw))

    d = copy("flipped")
    flipped = bytearray(src[name])
    flipped[700] ^= 0xFF
    put(f"{d}/{name}", bytes(flipped))
    with pytest.raises(ValueError, match=f"{d}/{name} does not match its manifest sha256"):
        shards.verify_shards(d)

    d = copy("truncated")
    put(f"{d}/{name}", src[name][:1000])
    with pytest.raises(ValueError, match=f"{d}/{name} is 1000 bytes"):
        load(d)

    d = copy("junk")
    put(f"{d}/{name}", bytes(len(src[name])))  # the right size, not a tar: the reader names it
    with pytest.raises(ValueError, match=f"{d}/{name}"):
        load(d, for_eval=True)

    d = copy("missing")
    client().rm(f"{d}/{name}".removeprefix("s3://"))
    with pytest.raises(FileNotFoundError, match=f"shard missing: {d}/{name}"):
        shards.verify_shards(d)


def test_checkpoints_saved_to_the_store_load_weights_only_through_the_cache(s3, synthetic_root, tmp_path, cache,
                                                                          monkeypatch):
    names = [f"c{i}" for i in range(4)]
    cfg = resolve(TrainConfig.from_flat(smoke_test=True, image_size=96, global_size=64, max_regions=8))
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    folder = f"{s3}/ckpts/run1"
    assert checkpoint.save_checkpoint(folder, model, names, cfg.to_flat(), stage="joint") == folder
    assert sorted(objects(folder)) == ["checkpoint.pt", "config.json"]
    checkpoint.save_checkpoint(tmp_path / "local", model, names, cfg.to_flat(), stage="joint")

    image = decode_image(next((synthetic_root / "val2017").iterdir()))
    expected = Predictor.load(tmp_path / "local")([image])[0].scores
    for uri in (folder, f"{folder}/checkpoint.pt"):  # --checkpoint: the folder or its .pt
        p = Predictor.load(uri)
        assert p.inputs.image_size == 96 and p.class_names == names  # config.json came along
        np.testing.assert_array_equal(p([image])[0].scores, expected)
    assert checkpoint.read_checkpoint(folder).class_names == names  # what --init-checkpoint reads

    fetched = []
    real = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda path: fetched.append(str(path)) or real(path))
    checkpoint.resolve_checkpoint(folder)
    assert fetched == []  # unchanged on the store: the cached copy is used
    torch.manual_seed(1)
    checkpoint.save_checkpoint(folder, RGNN(model_config(cfg, len(names))), names, cfg.to_flat(), stage="joint")
    assert not np.array_equal(Predictor.load(folder)([image])[0].scores, expected)  # rewritten: fetched again
    assert f"{folder}/checkpoint.pt" in fetched

    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 1000)
    monkeypatch.setattr(checkpoint, "CACHE", tmp_path / "empty-cache")
    with pytest.raises(ValueError, match=rf"{folder}/checkpoint.pt holds \d+ bytes, more than the 1000 allowed"):
        checkpoint.resolve_checkpoint(folder)
    assert not list((tmp_path / "empty-cache").rglob("checkpoint.pt*"))  # nothing written
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "CACHE", cache)

    evil = f"{s3}/ckpts/evil"  # a pickle holding an object: refused by weights_only, never run
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"model": {}, "model_config": {}, "class_names": names, "x": argparse.Namespace(a=1)}, f)
    put(f"{evil}/checkpoint.pt", (tmp_path / "evil.pt").read_bytes())
    with pytest.raises(ValueError, match="not a safe RGNN checkpoint"):
        Predictor.load(evil)


def test_errors_name_the_uri(s3, synthetic_root, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {s3}/nothing/here/checkpoint.pt"):
        Predictor.load(f"{s3}/nothing/here")
    with pytest.raises(FileNotFoundError, match=f"shard manifest not found: {s3}/nothing/train2017/manifest.json"):
        shards.read_manifest(f"{s3}/nothing/train2017")
    with pytest.raises(FileNotFoundError,
                       match="s3://no-such-bucket-x/train2017/manifest.json .no bucket 'no-such-bucket-x'"):
        shards.read_manifest("s3://no-such-bucket-x/train2017")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-x/shards/val2017/manifest.json"):
        build_shards(read_coco(synthetic_root, "val2017"), "s3://no-such-bucket-x/shards", actors=0, params=PARAMS,
                     progress=False)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()  # its clients hold the credentials they were made with
    try:
        with pytest.raises(PermissionError, match=f"no credentials for {s3}/shards/train2017/manifest.json"):
            shards.read_manifest(f"{s3}/shards/train2017")
        with pytest.raises(PermissionError, match=f"no credentials for {s3}/ckpts/run1"):
            Predictor.load(f"{s3}/ckpts/run1")
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.ray
def test_resuming_a_run_the_store_does_not_hold_is_named(s3, s3_shards, tmp_path):
    from cluster.driver import fit

    flat = dict(shards=s3_shards, smoke_test=True, storage=f"{s3}/runs", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(FileNotFoundError, match=f"no run 'gone' under {s3}/runs"):
        fit(resolve(TrainConfig.from_flat(flat, name="gone", resume=True)))
    # a whole Ray Train run on the store: tests/test_deployment.py
