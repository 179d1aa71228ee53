"""The per-worker function of Ray Train: rgnn.train.stages.run_stages inside a thin Ray shell.

Ray enters only here: `get_checkpoint` to resume, `prepare_model` for DDP, and `report` after
every epoch, with rank 0 attaching the checkpoint (model, optimiser, stage, epoch, lambda state)
and logging to the training's MLflow run. A worker group restarted by FailureConfig resumes from
the last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile

import ray
import ray.train
import ray.train.torch
import torch

from rgnn.io import storage
from rgnn.tracking.artifacts import log_final_artifacts
from rgnn.io.checkpoint import check_classes, read_checkpoint, resolve_checkpoint, save_checkpoint
from rgnn.train.config import TrainConfig
from rgnn.data import shards
from rgnn.nn.model import RGNN
from rgnn.tracking.runs import RunLogger, system_metrics
from rgnn.train.stages import Hooks, TrainState, epoch_line, model_config, run_stages


def quiet_logs() -> None:
    """Ray Train's INFO lines (each report's whole metrics dict, each checkpoint, the model's device and DDP
    wrapping) and MLflow's (system metrics, artifact downloads) off in this worker: the job's log keeps
    one line per epoch."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:  # the per-report line's logger is named after its file, outside the ray.train hierarchy
        from ray.train.v2._internal.execution import context  # noqa: PLC0415

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray: its lines stay
        pass


def restore(model: RGNN, cfg: TrainConfig, class_names: list[str], rank: int) -> TrainState:
    """Load Ray Train's checkpoint into `model` (a restart after a worker failure, or --resume) and return
    where training stands; else load --init-checkpoint's weights, or nothing, and start at --start-stage."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            payload = read_checkpoint(d)
        check_classes(payload.class_names, class_names, "checkpoint")
        model.load_state_dict(payload.model)
        state = TrainState.from_payload(payload)
        if rank == 0:
            print(f"resuming from checkpoint {ckpt.path}: stage {state.stage}, epoch {state.epoch} done",
                  file=sys.__stdout__, flush=True)
        return state
    if cfg.cluster.init_checkpoint:
        payload = read_checkpoint(cfg.cluster.init_checkpoint)
        check_classes(payload.class_names, class_names, str(resolve_checkpoint(cfg.cluster.init_checkpoint)))
        model.load_state_dict(payload.model)
    return TrainState(stage=cfg.cluster.start_stage)


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_flat(config["cfg"])
    if not cfg.cluster.verbose:
        quiet_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.schedule.seed)
    train_dir, val_dir = storage.location(config["train_dir"]), storage.location(config["val_dir"])
    class_names = shards.class_names(train_dir)
    model = RGNN(model_config(cfg, len(class_names)))
    state = restore(model, cfg, class_names, rank)
    model.to(device)
    log = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    nodes = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if log is not None:
        log.tag("ray_nodes", len(set(nodes)))  # how many nodes the DDP workers span

    def on_epoch(state: TrainState, metrics: dict, result: dict | None) -> None:
        log.epoch(state, metrics, result)
        # sys.__stdout__: under Ray Train a plain print reaches the job's log twice
        print(epoch_line(metrics, result), file=sys.__stdout__, flush=True)

    def report(state: TrainState, metrics: dict) -> None:
        """Every rank reports (it is a barrier); rank 0 attaches the epoch's checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, model, class_names, cfg.to_flat(redacted=True), **state.to_dict(),
                                lambda_schedule=dataclasses.asdict(cfg.schedule.lambdas))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def on_warning(message: str) -> None:
        print(f"\n{message}\n", file=sys.__stdout__, flush=True)
        log.tag("warning", "loss_not_falling")

    # rgnn.train.schedule.set_trainable freezes what a stage's forward does not run (fc8 when fc6/fc7
    # is pooled, all but the gate in stage 3), so every trainable parameter gets a gradient.
    hooks = Hooks(wrap=ray.train.torch.prepare_model, report=report,
                  on_step=log.step if log else None, on_epoch=on_epoch if log else None,
                  on_warning=on_warning if log else lambda message: None)  # rank 0 speaks for all
    # one system-metrics monitor per node (its first worker): system/node<N>/... in the run
    monitor = (system_metrics(config["tracking_uri"], config["run_id"], f"node{ctx.get_node_rank()}")
               if ctx.get_local_rank() == 0 else contextlib.nullcontext())
    with monitor:
        final = run_stages(cfg, model, class_names, train_dir, val_dir, device, state, rank, world, hooks)
    if log is not None and final is not None:
        log_final_artifacts(log, model, *final, class_names, val_dir, cfg)
        log.flush()
