"""The 4 stages of section 4.2 as one plain-PyTorch run: stages, epochs, evaluation, lambda.

Both the Ray Train workers (cluster/loop.py) and in-process runs (rgnn.ablation) call
`run_stages`; Ray enters only through the two hooks: `wrap` (DDP via prepare_model) and
`report` (metrics + checkpoint after every epoch).
"""
from __future__ import annotations

import sys

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from rgnn.config import TrainConfig
from rgnn.data import shards
from rgnn.engine import StageModel, gather_predictions, predict, stage_progress, train_one_epoch
from rgnn.metrics import average_precision, multilabel_prf
from rgnn.model import RGNN, ModelConfig
from rgnn.schedule import STAGES, LambdaSchedule, set_trainable
from rgnn.tracking import RunLogger


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint. `epoch` counts finished epochs of `stage`."""

    stage: str = "global"
    epoch: int = 0
    global_step: int = 0
    maps: dict[str, float] = field(default_factory=dict)
    optimizer: dict | None = None
    last_map: float = float("nan")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_config(cfg: TrainConfig, num_classes: int) -> ModelConfig:
    return ModelConfig(num_classes=num_classes, backbone=cfg.backbone, gate=cfg.gate, scales=cfg.scales,
                       pool_layer=cfg.pool_layer, hidden=cfg.hidden, weights=cfg.weights,
                       dropout=cfg.dropout)


def lambda_schedule(cfg: TrainConfig) -> LambdaSchedule:
    return LambdaSchedule(family=cfg.lambda_schedule, start=cfg.lambda_start, end=cfg.lambda_end,
                          rate=cfg.lambda_rate, steps=tuple(cfg.lambda_steps))


def stages_to_run(cfg: TrainConfig) -> list[str]:
    """The stages with epochs, from --start-stage on; stage 3 needs a gate."""
    first = STAGES.index(cfg.start_stage)
    return [s for i, s in enumerate(STAGES)
            if i >= first and cfg.epochs[i] > 0 and not (s == "gates" and cfg.gate == "none")]


def check_classes(ckpt_classes: list[str], data_classes: list[str], where: str) -> None:
    """A class list that differs between checkpoint and data is an error, not a silent mismatch."""
    if list(ckpt_classes) != list(data_classes):
        raise ValueError(f"{where}: its {len(ckpt_classes)} classes {list(ckpt_classes)[:4]}... differ from "
                         f"the data's {len(data_classes)} classes {list(data_classes)[:4]}...")


def evaluate(model: RGNN, stage: str, val_dir: Path, cfg: TrainConfig, rank: int = 0, world: int = 1,
             device: torch.device = torch.device("cpu")) -> dict:
    """Scores of the whole val split gathered from every rank, then mAP, per-class AP, CF1/OF1.

    mAP is the area under the PR curve (COCO and VOC 2012 practice); for VOC 2007 `mAP_voc07`
    adds the 11-point rule. VOC difficult-only classes are ignored per image.
    """
    loader = shards.shard_loader(val_dir, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                 max_size=cfg.max_size, max_regions=cfg.max_regions,
                                 global_size=cfg.global_size if stage == "global" else None,
                                 rank=rank, world_size=world, num_workers=cfg.loader_workers, for_eval=True)
    scores, targets, ignore, ids = gather_predictions(*predict(StageModel(model, stage), loader, device))
    ap = average_precision(scores, targets, mode="area", ignore=ignore)
    result = {"mAP": float(np.nanmean(ap)), "ap": ap, "scores": scores, "targets": targets,
              "ignore": ignore, "ids": ids, **multilabel_prf(scores, targets)}
    if cfg.dataset == "voc" and "2007" in str(cfg.voc_root):
        result["mAP_voc07"] = float(np.nanmean(average_precision(scores, targets, mode="voc07", ignore=ignore)))
    return result


Report = Callable[[TrainState, dict], None]


def run_stages(cfg: TrainConfig, model: RGNN, class_names: list[str], train_dir: Path, val_dir: Path,
               device: torch.device, state: TrainState | None = None, rank: int = 0, world: int = 1,
               wrap: Callable[[nn.Module], nn.Module] = lambda m: m, report: Report | None = None,
               log: RunLogger | None = None) -> tuple[str, dict] | None:
    """Train `model` through the configured stages, from `state` on.

    Args:
        model: the bare RGNN on `device`, with the weights `state` describes.
        wrap: puts a StageModel under DDP (identity in one process).
        report: called after every epoch with the updated state and the epoch's metrics.
        log: rank 0's MLflow run (None elsewhere).

    Returns:
        (last stage, its final evaluation) or None when no stage ran.
    """
    state = state or TrainState(stage=cfg.start_stage)
    schedule = lambda_schedule(cfg)
    steps = shards.steps_per_epoch(train_dir, cfg.batch_size, world)
    final = None
    for stage in stages_to_run(cfg):
        si = STAGES.index(stage)
        if si < STAGES.index(state.stage):
            continue
        epochs = cfg.epochs[si]
        first_epoch = state.epoch if stage == state.stage else 0
        params = set_trainable(model, stage)
        net = wrap(StageModel(model, stage))
        optimizer = torch.optim.Adam(params, lr=cfg.lr_for(stage))
        if first_epoch and state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        for epoch in range(first_epoch, epochs):
            loader = shards.shard_loader(
                train_dir, batch_size=cfg.batch_size, image_size=cfg.image_size, max_size=cfg.max_size,
                max_regions=cfg.max_regions, global_size=cfg.global_size if stage == "global" else None,
                rank=rank, world_size=world, num_workers=cfg.loader_workers, shuffle=True,
                seed=cfg.seed, epoch=si * 1000 + epoch)

            def lam_at(step: int) -> float:  # eq. 9's lambda decays through stage 4 only
                return schedule(stage_progress(epoch, step, epochs, steps)) if stage == "joint" else 0.0

            def on_step(step: int, values: dict) -> None:
                if log is not None:
                    g = state.global_step + step
                    log.metrics({f"train/{k}": v for k, v in values.items()}, g)
                    log.metric("train/lr", optimizer.param_groups[0]["lr"], g)

            stats = train_one_epoch(net, loader, optimizer, stage, len(class_names), device, lam_at, on_step)
            state.global_step += stats["steps"]
            done = epoch + 1 == epochs
            metrics = {"stage": stage, "epoch": epoch + 1, "train/loss_cls": stats["loss_cls"],
                       "train/loss_loc": stats["loss_loc"], "train/lambda": stats["lambda"]}
            result = None
            if done or cfg.eval_every_epoch:
                result = evaluate(model, stage, val_dir, cfg, rank, world, device)
                state.last_map = result["mAP"]
                metrics.update({"val/CF1": result["CF1"], "val/OF1": result["OF1"]})
                if done:
                    state.maps[stage] = result["mAP"]
                    final = (stage, result)
            metrics["val/mAP"] = state.last_map
            state.stage, state.epoch, state.optimizer = stage, epoch + 1, optimizer.state_dict()
            if log is not None:
                _log_epoch(log, metrics, result, stage, done, state.global_step)
                # sys.__stdout__: under Ray Train a plain print reaches the job's log twice
                print(f"[{stage}] epoch {epoch + 1}/{epochs}: loss_cls {stats['loss_cls']:.4f} "
                      f"loss_loc {stats['loss_loc']:.4f} lambda {stats['lambda']:.3f}"
                      + (f" val mAP {result['mAP']:.4f}" if result else ""), file=sys.__stdout__, flush=True)
            if report is not None:
                report(state, {**metrics, "maps": dict(state.maps)})
        state.epoch, state.optimizer = 0, None
        if log is not None:
            log.tag("stage_reached", stage)
    return final


def _log_epoch(log: RunLogger, metrics: dict, result: dict | None, stage: str, done: bool, step: int) -> None:
    if result is not None:
        log.metrics({k: metrics[k] for k in ("val/mAP", "val/CF1", "val/OF1")}, step)
        if done:
            log.metric(f"val/mAP/{stage}", result["mAP"], step)
            if "mAP_voc07" in result:
                log.metric(f"val/mAP_voc07/{stage}", result["mAP_voc07"], step)
    log.flush()
