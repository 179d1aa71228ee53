import os

import pytest

# Keep BLAS and OpenCV from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small built-in synthetic set (COCO 2017 layout), shared by the whole session."""
    from rgnn.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), train=24, val=12, seed=0)


@pytest.fixture(scope="session")
def shard_root(synthetic_root, tmp_path_factory):
    """`synthetic_root`'s splits as shards (16 proposals per image), built without Ray."""
    from rgnn.data.coco import read_coco
    from rgnn.proposals import ProposalParams
    from sharding.build_shards import build_shards

    out = tmp_path_factory.mktemp("shards")
    for split in ("train2017", "val2017"):
        build_shards(read_coco(synthetic_root, split), out, actors=0, shard_size=60_000,
                     params=ProposalParams(max_boxes=16), progress=False)
    return out
