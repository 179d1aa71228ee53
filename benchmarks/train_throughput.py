"""Training throughput with 1 and 2 DDP workers (gloo, one thread each), and the input pipeline's
rate against the training step's.

    python benchmarks/train_throughput.py [--stage joint] [--steps 12] [--tiny] [--out FILE]

Data: the built-in synthetic set's shards with the demo's defaults (rgnn.train.config: small backbone,
shorter side 192, T = 128, batch 16 per worker), built on first use by cluster/data.py. Each worker
decodes its batches before the clock starts, so the training rate is the step's alone (forward,
eq. 9's loss, backward, DDP all-reduce, Adam). The pipeline rate is one process reading shards,
decoding, resizing and collating (`rgnn.data.shards.shard_loader`, no DataLoader workers), the
same work a training worker's loader does. Targets: scaling efficiency = 2-worker rate /
(2 x 1-worker rate) >= 0.8; pipeline >= 3x the 1-worker training rate. Prints and writes JSON.
`--tiny` (CI): 8 synthetic images at a 96-pixel shorter side, T = 16, 2 images per worker, random
weights, the shards built in this process (no Ray) in a temporary folder: a check that it runs,
not a speed.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.data import prepare_shards
from report import RESULTS, write_result
from rgnn.train.config import TrainConfig, resolve
from rgnn.data import shards, synthetic
from rgnn.data.coco import read_coco
from rgnn.data.proposals import ProposalParams
from rgnn.data.transforms import Preprocess
from rgnn.train.engine import StageModel, train_one_epoch
from rgnn.nn.model import RGNN
from rgnn.train.schedule import set_trainable
from rgnn.train.stages import model_config
from sharding.job import build_shards

TARGET_EFFICIENCY = 0.8
TARGET_PIPELINE = 3.0
# --tiny: the demo's small CNN at a tiny input, on a tiny set, with random weights (the stand-in's
# would be pretrained first when missing; the step's cost does not depend on the values)
TINY = dict(weights="none", batch_size=2, image_size=96, max_size=128, global_size=96, max_regions=16)
TINY_IMAGES = 8


def loader(cfg: TrainConfig, split_dir: Path, stage: str, rank: int = 0, world: int = 1):
    return shards.shard_loader(split_dir, Preprocess.for_stage(cfg.input, cfg.model, stage),
                               batch_size=cfg.schedule.batch_size, rank=rank, world_size=world, shuffle=True)


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, split_dir: str, stage: str, steps: int,
            warmup: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    names = shards.class_names(split_dir)
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    params = set_trainable(model, stage)
    net = torch.nn.parallel.DistributedDataParallel(StageModel(model, stage))
    optimizer = torch.optim.Adam(params, lr=cfg.schedule.lr)
    batches = list(itertools.islice(itertools.cycle(loader(cfg, Path(split_dir), stage, rank, world)),
                                    warmup + steps))
    device = torch.device("cpu")
    train_one_epoch(net, batches[:warmup], optimizer, stage, len(names), device, lam_at=lambda s: 0.5)
    dist.barrier()
    start = time.perf_counter()
    train_one_epoch(net, batches[warmup:], optimizer, stage, len(names), device, lam_at=lambda s: 0.5)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        results.put(world * steps * cfg.schedule.batch_size / elapsed)
    dist.destroy_process_group()


def train_rate(cfg: TrainConfig, split_dir: Path, stage: str, world: int, steps: int, warmup: int) -> float:
    """Training images/s (all workers together) of `world` DDP processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_worker, args=(world, port, cfg, str(split_dir), stage, steps, warmup, results),
                       nprocs=world, start_method="spawn")
    return results.get()


def tiny_shards(cfg: TrainConfig, folder: Path) -> Path:
    """The train split of a TINY_IMAGES-image synthetic set under `folder`, as shards of T proposals
    built in this process."""
    root = synthetic.generate(folder / "synthetic", train=TINY_IMAGES, val=2, seed=cfg.schedule.seed)
    return Path(build_shards(read_coco(root, cfg.data.train_split), folder / "shards", actors=0,
                             params=ProposalParams(max_boxes=cfg.input.stored_proposals), progress=False))


def pipeline_rate(cfg: TrainConfig, split_dir: Path, stage: str, batches: int) -> float:
    """Images/s of one process reading, decoding, resizing and collating shards."""
    torch.set_num_threads(1)
    it = itertools.cycle(loader(cfg, split_dir, stage))
    next(it)
    start, n = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        n += len(batch)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", default="joint", choices=("global", "regional", "gates", "joint"),
                   help="which stage's step to time")
    p.add_argument("--steps", type=int, default=12, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--tiny", action="store_true", help="a tiny set and input, shards built without Ray (CI)")
    p.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    cfg = TrainConfig()
    for name, value in (TINY if args.tiny else {}).items():
        cfg.set(name, value)
    cfg = resolve(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            train_dir = tiny_shards(cfg, Path(tmp))
        else:
            train_dir, _ = prepare_shards(cfg.data, cfg.input, cfg.schedule.seed)
        one = train_rate(cfg, train_dir, args.stage, 1, args.steps, args.warmup)
        two = train_rate(cfg, train_dir, args.stage, 2, args.steps, args.warmup)
        pipe = pipeline_rate(cfg, train_dir, args.stage, args.steps)
    result = {
        "stage": args.stage, "tiny": args.tiny, "backbone": cfg.model.backbone, "batch_per_worker": cfg.schedule.batch_size,
        "image_size": cfg.input.image_size, "max_regions": cfg.input.max_regions, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "train_images_per_s_1_worker": round(one, 2), "train_images_per_s_2_workers": round(two, 2),
        "scaling_efficiency": round(two / (2 * one), 3), "pipeline_images_per_s": round(pipe, 2),
        "pipeline_over_training": round(pipe / one, 2),
    }
    print(f"{args.stage} stage, {cfg.model.backbone} backbone, batch {cfg.schedule.batch_size}/worker, shorter side "
          f"{cfg.input.image_size}, T={cfg.input.max_regions}, one thread per worker")
    print(f"  training, 1 worker : {one:7.2f} images/s")
    print(f"  training, 2 workers: {two:7.2f} images/s   scaling efficiency {result['scaling_efficiency']:.2f} "
          f"(target >= {TARGET_EFFICIENCY})")
    print(f"  input pipeline     : {pipe:7.2f} images/s   {result['pipeline_over_training']:.1f}x the 1-worker "
          f"training rate (target >= {TARGET_PIPELINE}x)")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
