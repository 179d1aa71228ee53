"""Where a training's shards come from: --shards, --coco-root / --voc-root (built if missing), or a
generated set (the built-in synthetic one, or --photos) written into the cache folder."""
from __future__ import annotations

import hashlib
from pathlib import Path

import ray

from rgnn.io import storage
from rgnn.train.config import DataConfig
from rgnn.data import shards
from rgnn.data.coco import read_coco
from rgnn.data import photos, synthetic
from rgnn.data.transforms import InputConfig
from rgnn.data.voc import read_voc
from rgnn.data.proposals import ProposalParams
from sharding.job import build_shards


def prepare_shards(cfg: DataConfig, inputs: InputConfig, seed: int = 0, keep_ray: bool = True,
                   address: str | None = None) -> tuple[Path | str, Path | str]:
    """Return the (train, val) shard folders, building them through sharding/ where needed.

    --shards may be an object-store URI (s3://bucket/prefix): its manifests and shards are checked
    there (sizes and sha256, streamed) and the folders returned as URIs, which training streams from.

    Built shards are cached under cfg.cache_dir by data set and T. Every call runs the sharding
    job's resume: a shard is kept only when it verifies and its inputs (annotations, image files,
    class list, proposal settings) are those it was built from; the rest is rebuilt, on Ray.

    Args:
        inputs: T (max_regions) decides how many proposals are stored.
        seed: the built-in synthetic set's seed.
        keep_ray: False disconnects from the Ray a build joined or started (for callers that
            train without Ray and must not die with that Ray).
        address: the Ray cluster a build joins (--address; None: as `sharding.ray_setup.init_ray`).
    """
    if cfg.shards:
        dirs = storage.join(cfg.shards, cfg.train_split), storage.join(cfg.shards, cfg.val_split)
        for d in dirs:
            shards.verify_shards(d)  # names the missing or corrupt shard
        return dirs
    cache = Path(cfg.cache_dir).expanduser()
    params = ProposalParams(max_boxes=inputs.stored_proposals)
    if cfg.coco_root or cfg.voc_root:
        src = Path(cfg.coco_root or cfg.voc_root).expanduser().resolve()
        key = f"{cfg.dataset}-{hashlib.sha1(str(src).encode()).hexdigest()[:8]}"

        def read(split):
            return read_coco(src, split) if cfg.coco_root else read_voc(src, split)
    else:  # a generated set: the built-in synthetic one, or the photographs
        name = f"photos-{cfg.photos}" if cfg.photos else "synthetic"
        src = cache / f"{name}-{cfg.synthetic_train}-{cfg.synthetic_val}-seed{seed}"
        if not (src / "annotations" / "instances_val2017.json").is_file():
            if cfg.photos:
                photos.generate(src, cfg.synthetic_train, cfg.synthetic_val, seed, cfg.photos)
            else:
                synthetic.generate(src, cfg.synthetic_train, cfg.synthetic_val, seed)
        key = src.name

        def read(split):
            return read_coco(src, split)
    out = cache / "shards" / f"{key}-T{params.max_boxes}"
    dirs = []
    for split in (cfg.train_split, cfg.val_split):
        dirs.append(Path(build_shards(read(split), out, params=params, edge_model=cfg.edge_model, address=address)))
    if not keep_ray:
        ray.shutdown()  # a no-op when no build ran
    return tuple(dirs)
