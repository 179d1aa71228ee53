"""The multi-node path: 2 DDP training workers on a 2-node cluster simulated on one machine
(`ray.cluster_utils.Cluster`, one CPU and so one worker per node)."""
from __future__ import annotations

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from cluster.driver import fit
from rgnn.config import TrainConfig, resolve

pytestmark = pytest.mark.ray


def test_two_workers_on_two_nodes(tmp_path, monkeypatch):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    try:
        # accumulate: DDP's no_sync between updates, across nodes
        cfg = resolve(TrainConfig.from_flat(smoke_test=True, epochs=[1, 1, 0, 1], workers=2, cpus_per_worker=1,
                                            accumulate=2, clip_norm=10.0,
                                            cache_dir=str(tmp_path / "cache"), storage=str(tmp_path / "runs"),
                                            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
        summary = fit(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert list(summary["map"]) == ["global", "regional", "joint"]
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.tags["ray_nodes"] == "2" and run.data.params["accumulate"] == "2"
