"""Train an RGNN on a Ray cluster: `ray job submit -- python cluster/train_coco.py [flags]`.

Joins the cluster it is submitted to (RAY_ADDRESS, or a running local head) or starts a local
Ray; builds or finds the shards; runs the 4 stages with Ray Train DDP; logs to MLflow. Run
`python cluster/train_coco.py --help` for every flag.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import ray  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from mlflow.tracking import MlflowClient  # noqa: E402

from cluster.data import prepare_shards  # noqa: E402
from cluster.loop import train_loop_per_worker  # noqa: E402
from rgnn.checkpoint import checkpoint_classes, resolve_checkpoint  # noqa: E402
from rgnn.config import TrainConfig, parse_args  # noqa: E402
from rgnn.data import shards  # noqa: E402
from rgnn.tracking import check_reachable, git_commit, resolve_tracking_uri, start_run  # noqa: E402
from rgnn.training import check_classes  # noqa: E402
from sharding.build_shards import init_ray  # noqa: E402

RUN_ID_FILE = "mlflow_run_id.txt"


def mlflow_run_id(run_dir: Path) -> str | None:
    """The MLflow run of the Ray Train run in `run_dir`, None before its first start."""
    id_file = run_dir / RUN_ID_FILE
    return id_file.read_text().strip() if id_file.is_file() else None


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-{cfg.gate}-{cfg.backbone}"


def train(cfg: TrainConfig, summary_path: str | None = None, callbacks: list | None = None,
          shard_dirs: tuple[Path, Path] | None = None, parent_run_id: str | None = None,
          label: str | None = None) -> dict:
    """Run one whole training; returns the summary dict (also written to summary_path).

    Args:
        callbacks: Ray Train callbacks (tune/ passes TuneReportCallback).
        shard_dirs: (train, val) shard folders already prepared (else prepare_shards(cfg)).
        parent_run_id: makes the MLflow run a child of this one (a search or an ablation).
        label: the MLflow run name (default data set, gate, backbone).
    """
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_reachable(uri)  # before any data or cluster work
    cfg.tracking_uri = uri
    storage = cfg.storage if "://" in cfg.storage else str(Path(cfg.storage).expanduser().resolve())
    if cfg.resume and not cfg.name:
        raise ValueError("--resume needs --name: the run to continue")
    cfg.name = cfg.name or f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(storage) / cfg.name
    if cfg.resume and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: no run {cfg.name!r} under {storage}")
    train_dir, val_dir = shard_dirs or prepare_shards(cfg)
    class_names = shards.class_names(train_dir)
    if class_names != shards.class_names(val_dir):
        raise ValueError(f"{train_dir} and {val_dir} have different class lists")
    if cfg.init_checkpoint:  # fail here, not in every worker
        check_classes(checkpoint_classes(cfg.init_checkpoint), class_names, str(resolve_checkpoint(cfg.init_checkpoint)))

    init_ray()
    old_id = mlflow_run_id(run_dir)
    tags = {"gate": cfg.gate, "backbone": cfg.backbone, "dataset": cfg.dataset, "git_commit": git_commit(),
            "stage_reached": "none", "ray_train_run": cfg.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # a run folder that already has an MLflow run (--resume, a restarted Tune trial) continues it
    run_id = start_run(uri, cfg.experiment, label or run_name(cfg), cfg.flat(), tags, old_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_ID_FILE).write_text(run_id)

    gpus = cfg.gpus_per_worker
    if gpus is None:  # the GPU path switches itself on where the cluster has GPUs
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= cfg.workers else 0.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "train_dir": str(train_dir), "val_dir": str(val_dir),
                           "tracking_uri": uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
    )
    client = MlflowClient(uri)
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    maps = result.metrics.get("maps", {}) if result.metrics else {}
    per_class = _per_class_ap(client, run_id, class_names)
    summary = {"run_id": run_id, "checkpoint": str(Path(result.checkpoint.path) / "checkpoint.pt") if result.checkpoint else None,
               "map": maps, "per_class_ap": per_class, "tracking_uri": uri, "experiment": cfg.experiment}
    if summary_path:
        Path(summary_path).write_text(json.dumps(summary, indent=2))
    return summary


def _per_class_ap(client, run_id: str, class_names: list[str]) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {n: metrics[f"val/AP/{n}"] for n in class_names if f"val/AP/{n}" in metrics}


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, summary_path = parse_args(argv)
        summary = train(cfg, summary_path)
    except (ValueError, FileNotFoundError, ConnectionError) as e:  # bad input: a message, not a traceback
        sys.exit(f"error: {e}")
    final = list(summary["map"].items())
    print(f"\nMLflow run {summary['run_id']} in experiment {summary['experiment']!r} at {summary['tracking_uri']}")
    print(f"  see it: mlflow ui --backend-store-uri {summary['tracking_uri']}   (then open http://127.0.0.1:5000)")
    print("  val mAP per stage: " + ", ".join(f"{k} {v:.4f}" for k, v in final))
    if final:
        print(f"  final val mAP: {final[-1][1]:.4f}")
    print(f"  final checkpoint: {summary['checkpoint']}")


if __name__ == "__main__":
    main()
