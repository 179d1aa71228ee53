import os

import pytest

import services
from exit_status import pytest_sessionfinish  # noqa: F401  (a pytest hook)

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
    from rgnn.data.proposals import ProposalParams
    from sharding.job import build_shards

    out = tmp_path_factory.mktemp("shards")
    for split in ("train2017", "val2017"):
        build_shards(read_coco(synthetic_root, split), out, actors=0, shard_size=60_000,
                     params=ProposalParams(max_boxes=16), progress=False)
    return out


@pytest.fixture(scope="session")
def trained(synthetic_root, tmp_path_factory):
    """A small RGNN trained through all 4 stages on the tiny synthetic set: `ckpt/` saved as cluster/
    saves it, `shards/` its data (24 proposals per image)."""
    import torch

    from rgnn.io.checkpoint import save_checkpoint
    from rgnn.train.config import TrainConfig, resolve
    from rgnn.data import shards
    from rgnn.data.coco import read_coco
    from rgnn.nn.model import RGNN
    from rgnn.data.proposals import ProposalParams
    from rgnn.train.stages import model_config, run_stages
    from sharding.job import build_shards

    out = tmp_path_factory.mktemp("trained")
    for split in ("train2017", "val2017"):
        build_shards(read_coco(synthetic_root, split), out / "shards", actors=0,
                     params=ProposalParams(max_boxes=24), progress=False)
    cfg = resolve(TrainConfig.from_flat(shards=str(out / "shards"), smoke_test=True, epochs=[1, 1, 1, 1],
                                        max_regions=12, image_size=96, global_size=64, batch_size=12))
    names = shards.class_names(out / "shards" / "train2017")
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    run_stages(cfg, model, names, out / "shards" / "train2017", out / "shards" / "val2017", torch.device("cpu"))
    save_checkpoint(out / "ckpt", model, names, cfg.to_flat(), stage="joint")
    return out


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """s3://rgnn-test on an S3-compatible server of this session (tests/services.py), reached through the
    standard AWS environment, set for the rest of the session (Ray workers started later inherit it)."""
    s3fs = pytest.importorskip("s3fs")
    nowhere = tmp_path_factory.mktemp("aws") / "none"  # no ~/.aws profile of the machine's user
    with services.s3_server() as aws, pytest.MonkeyPatch.context() as mp:
        for k, v in {**aws, "AWS_CONFIG_FILE": str(nowhere), "AWS_SHARED_CREDENTIALS_FILE": str(nowhere)}.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("rgnn-test")
        yield "s3://rgnn-test"
        s3fs.S3FileSystem.clear_instance_cache()
