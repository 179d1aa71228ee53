"""The driver of one training on a Ray cluster: shards, MLflow run, Ray Train's TorchTrainer.

`fit` is what every entry point runs: `cluster/train_coco.py` and `cluster/train_voc.py` (through
`main`), each trial of `tune/search.py`, and the tests. It joins the cluster it is submitted to
(RAY_ADDRESS, or a running local head) or starts a local Ray.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.data import prepare_shards
from cluster.loop import train_loop_per_worker
from sharding.ray_setup import check_address, init_ray
from rgnn.io import storage
from rgnn.io.checkpoint import CHECKPOINT_FILE, check_classes, checkpoint_classes, resolve_checkpoint
from rgnn.io.redaction import redact
from rgnn.train.config import ClusterConfig, TrainConfig, parse_args
from rgnn.data import shards
from rgnn.metrics import GATE_METRICS
from rgnn.nn.backbones import imagenet_file
from rgnn.train.pretrain import pretrained_weights
from rgnn.train.schedule import STAGES
from rgnn.train.stages import CHECKPOINT_SCORE
from rgnn.io.storage import write_json, write_text
from rgnn.tracking.runs import (RunLogger, check_reachable, class_metric, dataset_input, git_commit, recall_metrics,
                                register_model, resolve_tracking_uri, run_page, run_results, training_run)
from rgnn.cli import user_errors

RUN_ID_FILE = "mlflow_run_id.txt"


def resolve_storage(path: str) -> str:
    """Ray Train's storage: a URI (s3://bucket/prefix) as it is, a path made absolute (workers run elsewhere)."""
    return str(storage.location(path)) if storage.is_uri(path) else str(Path(path).expanduser().resolve())


def mlflow_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run of the Ray Train run in `run_dir` (a path or URI), None before its first start."""
    id_file = storage.join(run_dir, RUN_ID_FILE)
    return storage.read_text(id_file).strip() if storage.isfile(id_file) else None


def checkpoint_uri(checkpoint) -> str:
    """The checkpoint.pt of a Ray Train checkpoint as a local path or a URI (s3://...), what
    --init-checkpoint and rgnn.infer.predict --checkpoint take (Ray's `path` holds no scheme)."""
    kind = checkpoint.filesystem.type_name  # pyarrow's: "local", "s3", "gcs", ...
    folder = checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
    return str(storage.join(folder, CHECKPOINT_FILE))


def scaling(c: ClusterConfig, cluster_gpus: float) -> tuple[int, float]:
    """(DDP workers, GPUs per worker). The GPU path switches itself on where the cluster has a GPU for
    every worker; without `--workers`, one worker per GPU of the cluster, or 2 on CPUs."""
    workers = c.workers or (int(cluster_gpus) if cluster_gpus >= 1 else 2)
    gpus = c.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= workers else 0.0
    return workers, gpus


def check_weights(cfg: TrainConfig) -> None:
    """The backbone's weights, before any work: ImageNet's are found (or fetched) here, once, not in every
    worker; a --weights file that is not there is a FileNotFoundError naming it."""
    weights = cfg.model.weights
    if weights == "imagenet":
        print(f"backbone weights: {imagenet_file(cfg.model.backbone)}", flush=True)
    elif weights not in ("none", "standin") and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")


def describe(cfg: TrainConfig, train: dict, val: dict) -> str:
    """The run's description: data set, backbone, gate and stages (shown by the MLflow UI)."""
    m, s, c = cfg.model, cfg.schedule, cfg.cluster
    stages = ", ".join(f"{stage} {n}" for stage, n in zip(STAGES, s.epochs))
    gates = "no gates" if m.gate == "none" else f"{m.gate}-level gates"
    return (f"RGNN with {gates} (pooling {m.pool_layer}, {m.scales} scale bins) on a {m.backbone} backbone "
            f"(weights {m.weights}, recipe {cfg.recipe}). Data: {train['dataset']} ({train['samples']} images) / "
            f"{val['dataset']} ({val['samples']} images), {len(train['class_names'])} classes, "
            f"T = {cfg.input.max_regions} proposals at shorter side {cfg.input.image_size}. Epochs per stage: {stages}; "
            f"lr {s.lr:g}, {s.batch_size} images per step on each of {c.workers} workers.")


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-{cfg.model.gate}-{cfg.model.backbone}"


def run_folder(cfg: TrainConfig) -> tuple[str, str]:
    """(storage, the run's folder in it): the run is named by --name, else by its setting and the time;
    --resume needs the named folder to exist."""
    c = cfg.cluster
    storage_path = resolve_storage(c.storage)
    if c.resume and not c.name:
        raise ValueError("--resume needs --name: the run to continue")
    c.name = c.name or f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = storage.join(storage_path, c.name)
    if c.resume and not storage.isdir(run_dir):
        raise FileNotFoundError(f"--resume: no run {c.name!r} under {storage_path}")
    return storage_path, run_dir


def run_tags(cfg: TrainConfig, parent: str | None) -> dict[str, str]:
    """The MLflow tags of a new training run (the UI shows mlflow.source.git.commit as its source)."""
    commit = cfg.tracking.git_commit or git_commit()
    tags = {"gate": cfg.model.gate, "backbone": cfg.model.backbone, "dataset": cfg.dataset,
            "git_commit": commit, "mlflow.source.git.commit": commit, "stage_reached": "none",
            "ray_train_run": cfg.cluster.name, "recipe": cfg.recipe, "defaults_chosen": json.dumps(cfg.chosen)[:5000]}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def fit(cfg: TrainConfig, shard_dirs: tuple[Path | str, Path | str] | None = None, callbacks: list | None = None,
        parent: str | None = None, label: str | None = None, summary_path: str | None = None) -> dict:
    """Run one whole training; returns the summary dict (also written to summary_path).

    Args:
        cfg: a resolved TrainConfig.
        shard_dirs: (train, val) shard folders (paths or URIs) already prepared (else `prepare_shards`).
        callbacks: Ray Train callbacks (tune/ passes TuneReportCallback).
        parent: makes the MLflow run a child of this run (a search or an ablation).
        label: the MLflow run name (default data set, gate, backbone).
    """
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_reachable(uri)  # before any data or cluster work
    check_weights(cfg)
    cfg.tracking.tracking_uri = uri
    c = cfg.cluster
    storage_path, run_dir = run_folder(cfg)
    check_address(c.address)  # a head that does not answer fails here, before any shard is built
    train_dir, val_dir = shard_dirs or prepare_shards(cfg.data, cfg.input, cfg.schedule.seed, address=c.address)
    class_names = shards.class_names(train_dir)
    if class_names != shards.class_names(val_dir):
        raise ValueError(f"{train_dir} and {val_dir} have different class lists")
    if c.init_checkpoint:  # fail here, not in every worker
        check_classes(checkpoint_classes(c.init_checkpoint), class_names, str(resolve_checkpoint(c.init_checkpoint)))
    if cfg.chosen:
        print("defaults chosen for this run (recipe " + str(cfg.recipe) + "): "
              + ", ".join(f"{k}={v}" for k, v in cfg.chosen.items()), flush=True)
    if cfg.model.weights == "standin":  # built once here (with progress), found in the cache by the workers
        print(f"backbone weights: {pretrained_weights(cfg.data.cache_dir)}", flush=True)

    init_ray(c.address)
    c.workers, gpus = scaling(c, ray.cluster_resources().get("GPU", 0))
    # a run folder that already has an MLflow run (--resume, a restarted Tune trial) continues it
    with training_run(uri, cfg.tracking.experiment, label or run_name(cfg), cfg.flat(), run_tags(cfg, parent),
                      mlflow_run_id(run_dir)) as run_id:
        write_text(storage.join(run_dir, RUN_ID_FILE), run_id)
        log_inputs(RunLogger(uri, run_id), cfg, train_dir, val_dir)
        result = trainer(cfg, train_dir, val_dir, uri, run_id, gpus, storage_path, callbacks).fit()
    last = result.metrics or {}
    maps = last.get("maps", {})
    metrics, tags = run_results(uri, run_id)
    summary = {"run_id": run_id,
               "checkpoint": checkpoint_uri(result.checkpoint) if result.checkpoint else None,
               "best_checkpoint": best_checkpoint(result.best_checkpoints or []),
               "map": maps,
               "per_class_ap": {n: metrics[class_metric(n)] for n in class_names if class_metric(n) in metrics},
               "gates": {k: last[f"val/{k}"] for k in GATE_METRICS if f"val/{k}" in last},
               "tracking_uri": redact(uri), "experiment": cfg.tracking.experiment, "ui": run_page(uri, run_id),
               "model_uri": tags.get("model_uri")}
    if cfg.tracking.register_model and summary["model_uri"]:
        summary["registered_model"] = register_model(uri, summary["model_uri"], cfg.tracking.register_model)
    if summary_path:
        write_json(summary_path, summary)
    return summary


def log_inputs(log: RunLogger, cfg: TrainConfig, train_dir: Path | str, val_dir: Path | str) -> None:
    """The run's data sets, description (what the UI shows) and the shards' proposal recall per area bin."""
    manifests = {d: shards.read_manifest(d) for d in (train_dir, val_dir)}
    log.datasets([dataset_input(d, m, context) for (d, m), context in zip(manifests.items(), ("training", "validation"))])
    log.tag("mlflow.note.content", describe(cfg, *manifests.values()))
    for split_dir, manifest in manifests.items():
        log.metrics(recall_metrics(storage.basename(split_dir), manifest.get("proposal_recall", {})), 0)
    log.flush()


def trainer(cfg: TrainConfig, train_dir: Path | str, val_dir: Path | str, uri: str, run_id: str, gpus: float,
            storage_path: str, callbacks: list | None) -> TorchTrainer:
    """Ray Train's trainer of one training: `cfg.cluster.workers` DDP workers logging to MLflow run `run_id`."""
    c = cfg.cluster
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_flat(), "train_dir": str(train_dir), "val_dir": str(val_dir),
                           "tracking_uri": uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name=c.name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             # the best two by val mAP are kept beside the latest (which resumes)
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_SCORE,
                                                                checkpoint_score_order="max"),
                             callbacks=callbacks),
    )


def best_checkpoint(kept: list[tuple]) -> dict | None:
    """Of Ray's kept (checkpoint, metrics) pairs, the one whose own weights scored the highest val mAP
    (an epoch without an evaluation has none; its val/mAP is an earlier epoch's):
    {"checkpoint", "stage", "epoch", "val_mAP"}, or None."""
    scored = [(m[CHECKPOINT_SCORE], c, m) for c, m in kept if not math.isnan(m.get(CHECKPOINT_SCORE, math.nan))]
    if not scored:
        return None
    score, checkpoint, metrics = max(scored, key=lambda t: t[0])
    return {"checkpoint": checkpoint_uri(checkpoint), "stage": metrics["stage"],
            "epoch": metrics["epoch"], "val_mAP": score}


def main(argv: list[str] | None = None) -> None:
    """The command line of cluster/train_coco.py and cluster/train_voc.py."""
    with user_errors():
        cfg, summary_path = parse_args(argv)
        summary = fit(cfg, summary_path=summary_path)
    final = list(summary["map"].items())
    print(f"\nMLflow run {summary['run_id']} in experiment {summary['experiment']!r} at {summary['tracking_uri']}")
    served = summary["tracking_uri"].startswith(("http://", "https://"))
    print(f"  see it: {summary['ui']}" + ("" if served else
          f"   (after mlflow ui --backend-store-uri {summary['tracking_uri']})"))
    print("  val mAP per stage: " + ", ".join(f"{k} {v:.4f}" for k, v in final))
    if final:
        print(f"  final val mAP: {final[-1][1]:.4f}")
    if summary["gates"]:
        print("  gates on the val proposals: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["gates"].items()))
    print(f"  final checkpoint: {summary['checkpoint']}")
    if summary["model_uri"]:
        print(f"  MLflow Model: {summary['model_uri']}" + (f", registered as {summary['registered_model']}"
                                                           if "registered_model" in summary else ""))
    if summary["best_checkpoint"]:
        b = summary["best_checkpoint"]
        print(f"  best checkpoint by val mAP ({b['val_mAP']:.4f}, {b['stage']} epoch {b['epoch']}): {b['checkpoint']}")
