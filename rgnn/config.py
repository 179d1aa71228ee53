"""Training configuration: one dataclass, built from defaults, an optional JSON/YAML file and flags.

Precedence: built-in defaults < `--config FILE` < command-line flags. Fields left at None are
filled by `resolve()` with the paper's settings for real data (VGG-16, 10/10/10/20 epochs) or
small ones for the built-in synthetic set. The resolved config is saved beside every checkpoint
and logged to MLflow as flat params.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from rgnn.schedule import STAGES

LAMBDA_FAMILIES = ("constant", "linear", "cosine", "step", "exponential")


@dataclass
class TrainConfig:
    # data: exactly one of shards / coco_root / voc_root, or none for the built-in synthetic set
    shards: str | None = None
    coco_root: str | None = None
    voc_root: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    synthetic_train: int = 1200
    synthetic_val: int = 300
    cache_dir: str = "~/.cache/rgnn"
    edge_model: str | None = None
    # model (rgnn.model.ModelConfig)
    backbone: str | None = None
    gate: str = "region"
    scales: int = 5
    pool_layer: str = "softmax"
    hidden: int = 512
    dropout: float | None = None
    weights: str | None = None
    # the 4 stages (rgnn.schedule)
    epochs: list[int] | None = None
    lr: float | None = None
    stage_lr: dict[str, float] = field(default_factory=dict)
    lambda_schedule: str = "linear"
    lambda_start: float = 1.0
    lambda_end: float = 0.0
    lambda_rate: float = 5.0
    lambda_steps: list[float] = field(default_factory=lambda: [0.5])
    batch_size: int | None = None
    image_size: int | None = None
    max_size: int | None = None
    global_size: int | None = None
    max_regions: int | None = None
    eval_every_epoch: bool = False
    seed: int = 0
    # cluster
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    loader_workers: int = 0
    storage: str = "runs"
    name: str | None = None
    resume: bool = False
    start_stage: str = "global"
    init_checkpoint: str | None = None
    max_failures: int = 2
    # MLflow
    tracking_uri: str | None = None
    experiment: str = "rgnn"
    # a tiny synthetic run of the whole pipeline
    smoke_test: bool = False

    @property
    def dataset(self) -> str:
        if self.coco_root:
            return "coco"
        if self.voc_root:
            return "voc"
        return "shards" if self.shards else "synthetic"

    def lr_for(self, stage: str) -> float:
        return self.stage_lr.get(stage, self.lr)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, str]:
        """Flat string params for MLflow (lists and dicts as JSON)."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_dict().items()}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the None fields with data-dependent defaults and check every value."""
    real = cfg.dataset in ("coco", "voc", "shards")
    if sum(bool(x) for x in (cfg.shards, cfg.coco_root, cfg.voc_root)) > 1:
        raise ValueError("give at most one of --shards, --coco-root, --voc-root")
    if cfg.smoke_test:
        defaults = dict(backbone="small", epochs=[1, 1, 1, 2], lr=1e-3, dropout=0.1, batch_size=8,
                        image_size=128, global_size=128, max_regions=48, synthetic_train=48, synthetic_val=24)
    elif real:
        # the paper (section 4.2): VGG-16, 10/10/10/20 epochs, 224 px size-normalised global
        # input; Fast R-CNN's free-size input (shorter side 600, longer side at most 1000).
        defaults = dict(backbone="vgg16", epochs=[10, 10, 10, 20], lr=1e-4, dropout=0.5, batch_size=2,
                        image_size=600, max_size=1000, global_size=224, max_regions=500)
    else:
        # the small CNN trains from scratch: a larger rate, light dropout (measured on this set)
        defaults = dict(backbone="small", epochs=[4, 4, 2, 4], lr=1e-3, dropout=0.1, batch_size=16,
                        image_size=192, global_size=128, max_regions=64)
    for k, v in defaults.items():
        if getattr(cfg, k) is None or (cfg.smoke_test and k.startswith("synthetic_")):
            setattr(cfg, k, v)
    if cfg.max_size is None:
        cfg.max_size = cfg.image_size * 2
    if cfg.train_split is None:
        cfg.train_split = "trainval" if cfg.dataset == "voc" else "train2017"
    if cfg.val_split is None:
        cfg.val_split = "test" if cfg.dataset == "voc" else "val2017"
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    choices = {"backbone": ("vgg16", "resnet50", "small"), "gate": ("none", "region", "feature"),
               "scales": (1, 5), "pool_layer": ("fc6", "fc7", "fc8", "softmax"),
               "lambda_schedule": LAMBDA_FAMILIES, "start_stage": STAGES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: expected one of {allowed}")
    if len(cfg.epochs) != 4 or any(e < 0 for e in cfg.epochs):
        raise ValueError(f"epochs={cfg.epochs}: expected four counts >= 0 (global, regional, gates, joint)")
    for stage in cfg.stage_lr:
        if stage not in STAGES:
            raise ValueError(f"stage_lr has unknown stage {stage!r}: expected one of {STAGES}")
    if cfg.workers < 1 or cfg.batch_size < 1 or cfg.max_regions < 0:
        raise ValueError("workers and batch_size must be >= 1 and max_regions >= 0")
    if not 0.0 <= cfg.dropout < 1.0 or cfg.lr <= 0:
        raise ValueError(f"dropout={cfg.dropout} must be in [0, 1) and lr={cfg.lr} > 0")
    if cfg.start_stage != "global" and not (cfg.init_checkpoint or cfg.resume):
        raise ValueError(f"--start-stage {cfg.start_stage} needs --init-checkpoint (the weights to start from)")


def load_file(path: str | Path) -> dict:
    """A JSON or YAML config file -> dict of TrainConfig fields (unknown keys are an error)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid JSON/YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    return data


def _epochs(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected E1,E2,E3,E4 integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train an RGNN (Zhao et al., BMVC 2016) with Ray Train DDP through the paper's 4 stages: "
                    "global fine-tuning, regional with open gates, gates alone (localization loss), joint "
                    "(multi-task loss, lambda decaying). With no data flag it uses the built-in synthetic set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    d = p.add_argument_group("data")
    d.add_argument("--shards", help="shard folder made by sharding/build_shards.py (holds <split>/manifest.json)")
    d.add_argument("--coco-root", help="COCO root (annotations/, train2017/, val2017/); shards are built under --cache-dir if missing")
    d.add_argument("--voc-root", help="VOCdevkit/VOC2007 or VOC2012; trains on trainval, validates on test")
    d.add_argument("--train-split", help="training split name (default train2017, VOC trainval)")
    d.add_argument("--val-split", help="validation split name (default val2017, VOC test)")
    d.add_argument("--cache-dir", help="where the synthetic set and shards built on the fly go (default ~/.cache/rgnn)")
    d.add_argument("--synthetic-train", type=int, help="built-in set: training images (default 1200)")
    d.add_argument("--synthetic-val", type=int, help="built-in set: validation images (default 300)")
    d.add_argument("--edge-model", help="OpenCV structured-edge model.yml.gz for EdgeBoxes (paper's setting)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=("vgg16", "resnet50", "small"), help="default vgg16 on real data, small on the built-in set")
    m.add_argument("--gate", choices=("none", "region", "feature"), help="gate type (default region)")
    m.add_argument("--scales", type=int, choices=(1, 5), help="cross-region max pooling scales (default 5)")
    m.add_argument("--pool-layer", choices=("fc6", "fc7", "fc8", "softmax"), help="layer that is gated and pooled (default softmax)")
    m.add_argument("--weights", help="'imagenet' (torchvision weights from the local torch cache) or a .pth path; default random init")
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", type=_epochs, help="epochs per stage E1,E2,E3,E4 (0 skips a stage); paper 10,10,10,20")
    s.add_argument("--lr", type=float, help="Adam learning rate, all stages (default 1e-4 on real data, 1e-3 on the built-in set)")
    s.add_argument("--dropout", type=float, help="dropout after fc6, fc7 and the classifier's hidden layer (default 0.5 on real data as VGG, 0.1 on the built-in set)")
    s.add_argument("--lambda-schedule", choices=LAMBDA_FAMILIES, help="how lambda of eq. 9 decays through stage 4 (default linear)")
    s.add_argument("--lambda-start", type=float, help="lambda at the start of stage 4 (default 1)")
    s.add_argument("--lambda-end", type=float, help="lambda at the end of stage 4 (default 0)")
    s.add_argument("--batch-size", type=int, help="images per worker per step")
    s.add_argument("--image-size", type=int, help="shorter side of the free-size regional input")
    s.add_argument("--max-size", type=int, help="cap on the longer side (default 2x image size)")
    s.add_argument("--global-size", type=int, help="side of the size-normalised stage-1 input")
    s.add_argument("--max-regions", type=int, help="T: top proposals per image (the whole image is added)")
    s.add_argument("--eval-every-epoch", action="store_true", help="validate after every epoch, not only after each stage")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    c = p.add_argument_group("cluster and checkpoints")
    c.add_argument("--workers", type=int, help="DDP training workers (default 2)")
    c.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default 1)")
    c.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default: 1 where the cluster has GPUs, else 0)")
    c.add_argument("--loader-workers", type=int, help="DataLoader processes per training worker (default 0)")
    c.add_argument("--storage", help="Ray Train storage path or URI (a shared path or object store for several nodes; default ./runs)")
    c.add_argument("--name", help="run name (default: data set, gate, backbone and time)")
    c.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    c.add_argument("--start-stage", choices=STAGES, help="first stage to run (with --init-checkpoint)")
    c.add_argument("--init-checkpoint", help="checkpoint.pt or its folder whose weights start the run")
    c.add_argument("--max-failures", type=int, help="worker failures to recover from (default 2)")
    o = p.add_argument_group("tracking")
    o.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    o.add_argument("--experiment", help="MLflow experiment name (default rgnn)")
    o.add_argument("--config", help="JSON/YAML file of settings (the same names, underscores); flags override it")
    o.add_argument("--summary", help="write a JSON summary (run id, checkpoint, mAP per stage, per-class AP) here")
    o.add_argument("--smoke-test", action="store_true", help="the whole pipeline on a tiny synthetic set in a few minutes")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """argv -> (resolved TrainConfig, --summary path)."""
    args = vars(build_parser().parse_args(argv))
    summary = args.pop("summary", None)
    values = load_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    cfg = TrainConfig(**values)
    return resolve(cfg), summary
