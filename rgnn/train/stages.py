"""The 4 stages of section 4.2 as one plain-PyTorch run: stages, epochs, evaluation, lambda.

No Ray and no MLflow here: the Ray Train workers (cluster/loop.py) and in-process runs (the
ablation) call `run_stages` and enter through `Hooks`: `wrap` (DDP), `on_step` and `on_epoch`
(what to log or print), `report` (metrics + checkpoint after every epoch).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rgnn.train.config import TrainConfig
from rgnn.io.checkpoint import CheckpointPayload
from rgnn.data import shards
from rgnn.data.transforms import Batch, InputConfig, Preprocess
from rgnn.train.ema import EMA
from rgnn.train.engine import (StageModel, StepOptions, autocast_dtype, batch_loss, collect_scores, gather_predictions,
                               memory_format, stage_progress, train_one_epoch)
from rgnn.metrics import GATE_METRICS, average_precision, gate_quality, mean_ap, multilabel_prf
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.pretrain import pretrained_weights
from rgnn.train.schedule import STAGES, lr_factor, set_trainable

log = logging.getLogger(__name__)
MIN_DROP = 0.02  # a first epoch whose loss falls by less than this (relative) has not learned


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint. `epoch` counts finished epochs of `stage`."""

    stage: str = "global"
    epoch: int = 0
    global_step: int = 0
    maps: dict[str, float] = field(default_factory=dict)
    optimizer: dict | None = None
    ema: dict | None = None  # the stage's EMA of the weights (rgnn.train.ema), with --ema
    last_map: float = float("nan")

    def to_dict(self) -> dict:
        """The fields, as CheckpointPayload takes them (rgnn.io.checkpoint.save_checkpoint's stage and training)."""
        return dict(self.__dict__)

    @classmethod
    def from_payload(cls, payload: CheckpointPayload) -> TrainState:
        """Where the training of a checkpoint stood (a final model's: its stage, epoch 0)."""
        return cls(**{f.name: getattr(payload, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Hooks:
    """How a caller sees and shapes a run of `run_stages`.

    Attributes:
        wrap: puts a StageModel under DDP (identity in one process).
        on_step: after every step: (global step, {"train/loss_cls", "train/loss_loc", "train/lambda", "train/lr"}).
        on_epoch: after every epoch: (state, metrics as `report` gets them, the evaluation or None).
        report: after `on_epoch`, on every rank (Ray Train's report is a barrier): (state, metrics).
        on_warning: a message the user must see (default: logged as a warning).
    """

    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    on_step: Callable[[int, dict], None] | None = None
    on_epoch: Callable[[TrainState, dict, dict | None], None] | None = None
    report: Callable[[TrainState, dict], None] | None = None
    on_warning: Callable[[str], None] = log.warning


# what Ray ranks the kept checkpoints by: the val mAP of the epoch's own weights, NaN where the epoch
# was not evaluated (Ray ranks NaN lowest); val/mAP carries the last evaluation over such epochs
CHECKPOINT_SCORE = "checkpoint/val_mAP"


def stalled(before: float, after: float) -> bool:
    """The loss on the same batch fell by less than MIN_DROP (relative) over an epoch."""
    return after > before * (1 - MIN_DROP)


def no_learning_warning(stage: str, before: float, after: float, lr: float, images: int, recipe: str) -> str:
    cause = ("a learning rate too small for random weights (--recipe scratch uses 1e-3 per 16 images)" if recipe == "scratch"
             else "random weights fine-tuned at a pretrained backbone's rate (--weights none takes --recipe scratch)")
    return (f"WARNING: the training loss has not fallen in the first epoch of the {stage} stage (on its first batch "
            f"{before:.3f} before, {after:.3f} after; eq. 6 at chance is 1.386). Likely causes: too few images "
            f"({images} per epoch on this rank, so few steps: later epochs may still learn), or {cause}; "
            f"lr {lr:g}, recipe {recipe}. See --epochs, --lr, --recipe and --weights.")


def model_config(cfg: TrainConfig, num_classes: int) -> ModelConfig:
    """The training config's model with the data's class count and its weights as the model takes
    them: "none" is random init, "standin" the file of rgnn.train.pretrain (built here if missing)."""
    weights = {"none": None}.get(cfg.model.weights, cfg.model.weights)
    if weights == "standin":
        weights = str(pretrained_weights(cfg.data.cache_dir, progress=False))
    return dataclasses.replace(cfg.model, num_classes=num_classes, weights=weights)


def stages_to_run(epochs: list[int], start_stage: str, gated: bool) -> list[str]:
    """The stages with epochs, from `start_stage` on; stage 3 needs a gate."""
    first = STAGES.index(start_stage)
    return [s for i, s in enumerate(STAGES) if i >= first and epochs[i] > 0 and not (s == "gates" and not gated)]


def validate(model: RGNN, stage: str, val_dir: Path, inputs: InputConfig, batch_size: int, *, rank: int = 0,
             world: int = 1, device: torch.device = torch.device("cpu"), loader_workers: int = 0,
             voc07: bool = False, oracle: bool = False, theta: float = 0.5) -> dict:
    """Scores of the whole val split gathered from every rank, then mAP, per-class AP, CF1/OF1.

    `oracle`, `theta`: the gates fixed to eq. 8's targets at IoU threshold theta (the diagnostic
    `--oracle-gates`, evaluated as it was trained).

    mAP is the area under the PR curve (COCO and VOC 2012 practice); `voc07` adds `mAP_voc07`,
    VOC 2007's 11-point rule. VOC difficult-only classes are ignored per image. With gates, the
    result adds `metrics.gate_quality` over every proposal of the split (`gate_auc`, `gate_ap`,
    `gate_mean_object`, `gate_mean_other`).
    """
    loader = shards.shard_loader(val_dir, Preprocess.for_stage(inputs, model.cfg, stage), batch_size=batch_size,
                                 rank=rank, world_size=world, num_workers=loader_workers, for_eval=True)
    got = gather_predictions(collect_scores(StageModel(model, stage, oracle, theta=theta), loader, device))
    scores, targets, ignore = got["scores"], got["targets"], got["ignore"]
    ap = average_precision(scores, targets, mode="area", ignore=ignore)
    result = {"mAP": mean_ap(ap), "ap": ap, "scores": scores, "targets": targets,
              "ignore": ignore, "ids": got["ids"], **multilabel_prf(scores, targets)}
    if len(got["gates"]):  # gated stages: how well the gates pick eq. 8's object regions
        result.update(gate_quality(got["gates"], got["gate_targets"]))
    if voc07:
        result["mAP_voc07"] = mean_ap(average_precision(scores, targets, mode="voc07", ignore=ignore))
    return result


def epoch_line(metrics: dict, result: dict | None) -> str:
    """The one line a run prints per epoch."""
    line = (f"[{metrics['stage']}] epoch {metrics['epoch']}/{metrics['epochs']}: loss_cls {metrics['train/loss_cls']:.4f} "
            f"loss_loc {metrics['train/loss_loc']:.4f} lambda {metrics['train/lambda']:.3f}")
    if result:
        line += f" val mAP {result['mAP']:.4f}"
        if "gate_auc" in result:
            line += (f" gate AUC {result['gate_auc']:.3f} AP {result['gate_ap']:.3f} (mean gate: objects "
                     f"{result['gate_mean_object']:.2f}, other {result['gate_mean_other']:.2f})")
    return line


def run_stages(cfg: TrainConfig, model: RGNN, class_names: list[str], train_dir: Path, val_dir: Path,
               device: torch.device, state: TrainState | None = None, rank: int = 0, world: int = 1,
               hooks: Hooks = Hooks()) -> tuple[str, dict] | None:
    """Train `model` through the configured stages, from `state` on.

    Args:
        model: the bare RGNN on `device`, with the weights `state` describes.

    Returns:
        (last stage, its final evaluation), or None when no stage ran. A state at the end of the last
        stage (a worker restarted after its last report, while the artifacts were logged) trains
        nothing and evaluates that stage again, so the caller logs the artifacts again (or fails again)
        instead of ending the run without them.
    """
    s = cfg.schedule
    state = state or TrainState(stage=cfg.cluster.start_stage)
    stages = stages_to_run(s.epochs, cfg.cluster.start_stage, model.gate is not None)
    finished = bool(stages) and state.stage == stages[-1] and state.epoch >= s.epochs[STAGES.index(state.stage)]
    model.to(memory_format=memory_format(s.memory_format))  # in place: the parameters stay the same objects
    run = _Run(cfg, model, len(class_names), train_dir, val_dir, device, state, rank, world, hooks,
               shards.steps_per_epoch(train_dir, s.batch_size, world))
    final = None
    model.backbone.use_cache(s.feature_cache_mb << 20)  # the same images each epoch: their frozen features once
    try:
        for stage in stages:
            if STAGES.index(stage) >= STAGES.index(state.stage):
                final = run.stage(stage) or final
        return (stages[-1], run.evaluate(stages[-1])) if finished else final
    finally:
        model.backbone.use_cache(0)


@dataclass
class _Run:
    """What the stages and epochs of one run_stages call share; `state` follows the training."""

    cfg: TrainConfig
    model: RGNN
    num_classes: int
    train_dir: Path
    val_dir: Path
    device: torch.device
    state: TrainState
    rank: int
    world: int
    hooks: Hooks
    steps: int  # per epoch

    def evaluate(self, stage: str) -> dict:
        """The val set's evaluation of the model's weights as they are (`validate`)."""
        s, c = self.cfg.schedule, self.cfg
        return validate(self.model, stage, self.val_dir, c.input, s.batch_size, rank=self.rank, world=self.world,
                        device=self.device, loader_workers=c.cluster.loader_workers,
                        voc07=c.dataset == "voc" and "2007" in str(c.data.voc_root), oracle=s.oracle_gates,
                        theta=s.gate_iou)

    def stage_model(self, stage: str) -> StageModel:
        """The model as `stage` runs it, with the schedule's gate options (oracle, gate loss, eq. 8's theta)."""
        s = self.cfg.schedule
        return StageModel(self.model, stage, s.oracle_gates, s.gate_loss, s.gate_iou)

    def stage(self, stage: str) -> tuple[str, dict] | None:
        """Train `stage` on from where the state stands: (stage, its final evaluation), None if it was over."""
        s, state, model = self.cfg.schedule, self.state, self.model
        first_epoch = state.epoch if stage == state.stage else 0
        params = set_trainable(model, stage)
        net = self.hooks.wrap(self.stage_model(stage))
        optimizer = (torch.optim.AdamW(params, lr=s.lr_for(stage), weight_decay=s.weight_decay) if s.weight_decay
                     else torch.optim.Adam(params, lr=s.lr_for(stage)))
        if first_epoch and state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        preprocess = Preprocess.for_stage(self.cfg.input, model.cfg, stage, self.cfg.augment)
        scaler = (torch.amp.GradScaler(self.device.type)
                  if autocast_dtype(s.precision, self.device) == torch.float16 else None)
        # an EMA restarts with each stage: what trains, and the loss, change there
        ema = EMA(model, s.ema, state.ema if first_epoch else None) if s.ema else None
        final = None
        for epoch in range(first_epoch, s.epochs[STAGES.index(stage)]):
            final = self.epoch(stage, epoch, net, optimizer, preprocess, scaler, ema) or final
        state.epoch, state.optimizer, state.ema = 0, None, None
        return final

    def epoch(self, stage: str, epoch: int, net: nn.Module, optimizer: torch.optim.Optimizer, preprocess: Preprocess,
              scaler: torch.amp.GradScaler | None, ema: EMA | None) -> tuple[str, dict] | None:
        """Train one epoch, evaluate where due, report; (stage, evaluation) at the stage's last epoch."""
        s, state, model, hooks = self.cfg.schedule, self.state, self.model, self.hooks
        si = STAGES.index(stage)
        epochs, steps = s.epochs[si], self.steps
        loader = shards.shard_loader(self.train_dir, preprocess, batch_size=s.batch_size, rank=self.rank,
                                     world_size=self.world, num_workers=self.cfg.cluster.loader_workers, shuffle=True,
                                     seed=s.seed, epoch=si * 1000 + epoch)

        def lam_at(step: int) -> float:  # eq. 9's lambda decays through stage 4 only
            return s.lambdas(stage_progress(epoch, step, epochs, steps)) if stage == "joint" else 0.0

        def lr_at(step: int) -> float:
            return s.lr_for(stage) * lr_factor(stage_progress(epoch, step, epochs, steps), s.lr_schedule, s.warmup)

        def on_step(step: int, values: dict) -> None:
            if hooks.on_step is not None:
                hooks.on_step(state.global_step + step, {**{f"train/{k}": v for k, v in values.items()},
                                                         "train/lr": optimizer.param_groups[0]["lr"]})

        probe = self._probe(stage, loader)
        options = StepOptions(s.gate_target == "class", s.accumulate, s.clip_norm, s.precision, s.gate_iou)
        stats = train_one_epoch(net, loader, optimizer, stage, self.num_classes, self.device, options, lam_at, lr_at,
                                on_step, None if ema is None else (lambda: ema.update(model)), scaler)
        if probe is not None:
            self._check_learned(stage, *probe, steps)
        state.global_step += stats["steps"]
        done = epoch + 1 == epochs
        metrics = {"stage": stage, "epoch": epoch + 1, "epochs": epochs, "train/loss_cls": stats["loss_cls"],
                   "train/loss_loc": stats["loss_loc"], "train/lambda": stats["lambda"]}
        result = self._evaluate_with_ema(stage, ema, done, metrics) if done or s.eval_every_epoch else None
        if result is not None:
            state.last_map = result["mAP"]
            metrics.update({"val/CF1": result["CF1"], "val/OF1": result["OF1"],
                            **{f"val/{k}": result[k] for k in GATE_METRICS if k in result}})
            if done:
                state.maps[stage] = result["mAP"]
        metrics["val/mAP"] = state.last_map  # the last evaluation's (what MLflow and Tune follow)
        metrics[CHECKPOINT_SCORE] = result["mAP"] if result else float("nan")  # this epoch's weights' own
        state.stage, state.epoch, state.optimizer = stage, epoch + 1, optimizer.state_dict()
        state.ema = None if ema is None else ema.state_dict()
        if hooks.on_epoch is not None:
            hooks.on_epoch(state, metrics, result)
        if hooks.report is not None:
            hooks.report(state, {**metrics, "maps": dict(state.maps)})
        return (stage, result) if done else None

    def _probe(self, stage: str, loader) -> tuple[Batch, float] | None:
        """A fresh run's first batch and its loss before the first epoch (does that epoch learn?)."""
        if self.state.global_step != 0 or stage == "gates":
            return None
        batch = next(iter(loader)).to(self.device)
        return batch, batch_loss(self.stage_model(stage), batch, self.num_classes)

    def _check_learned(self, stage: str, batch: Batch, before: float, steps: int) -> None:
        s = self.cfg.schedule
        after = batch_loss(self.stage_model(stage), batch, self.num_classes)
        if stalled(before, after):
            self.hooks.on_warning(no_learning_warning(stage, before, after, s.lr_for(stage), steps * s.batch_size,
                                                      self.cfg.recipe))

    def _evaluate_with_ema(self, stage: str, ema: EMA | None, done: bool, metrics: dict) -> dict:
        """The epoch's evaluation. With an EMA, of the averaged weights beside the raw ones (both mAPs into
        `metrics`); at a stage's end the better of the two on val go on."""
        result = self.evaluate(stage)
        if ema is None:
            return result
        with ema.applied(self.model):
            averaged = self.evaluate(stage)
        metrics.update({"val/raw_mAP": result["mAP"], "val/ema_mAP": averaged["mAP"]})
        if done:
            metrics["val/ema_chosen"] = float(averaged["mAP"] > result["mAP"])
            if averaged["mAP"] > result["mAP"]:
                ema.copy_to(self.model)
                result = averaged
        return result
