"""The production path end to end, on loopback only, as the README's "Running on a cluster" section runs it:
shards built into an object store (S3-compatible server), 2 DDP workers on a 2-node Ray cluster
(`ray.cluster_utils.Cluster`, one CPU per node) streaming them, checkpoints in the store, an `mlflow
server` whose backend store is PostgreSQL and whose artifacts it proxies to the object store, one
training worker killed mid-stage and the run finishing from its checkpoint in the store, the final
model registered, then predicted from models:/ by a client without object-store credentials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

import services
from cluster.driver import RUN_ID_FILE, mlflow_run_id
from rgnn.io import storage
from rgnn.data import shards
from rgnn.infer.predict import Predictor

pytestmark = pytest.mark.ray
s3fs = pytest.importorskip("s3fs")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["global", "regional", "gates", "joint"]
MODEL = "rgnn-e2e"


@pytest.fixture(scope="module")
def tracking_server(s3, tmp_path_factory):
    """`mlflow server` on PostgreSQL, artifacts proxied to s3://rgnn-test/mlartifacts."""
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    with services.postgres_server() as db, services.mlflow_server(db, f"{s3}/mlartifacts", aws, log) as url:
        yield url


def train_worker_pids() -> list[int]:
    """This test's RayTrainWorker processes: they descend from this process (through the cluster's raylets),
    unlike those of any other Ray on the machine."""
    table = services.processes()
    return [pid for pid in services.descendants({os.getpid()}, table) - {os.getpid()}
            if "RayTrainWorker" in table[pid][1]]


def run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def test_two_nodes_object_store_tracking_server_killed_worker_and_registry(s3, tracking_server, synthetic_root,
                                                                           tmp_path):
    store = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for split in ("train2017", "val2017"):  # the shards, built into the store
        run(["sharding/build_shards.py", "--synthetic-dir", str(synthetic_root), "--split", split, "--out",
             f"{s3}/shards", "--max-boxes", "16", "--actors", "0", "--no-progress"], env)
    assert store.isfile(f"{s3.removeprefix('s3://')}/shards/train2017/manifest.json")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    runs = f"{s3}/runs"
    args = ["cluster/train_coco.py", "--smoke-test", "--shards", f"{s3}/shards", "--storage", runs, "--name", "e2e",
            "--tracking-uri", tracking_server, "--experiment", "e2e", "--register-model", MODEL,
            "--workers", "2", "--cpus-per-worker", "1", "--epochs", "1,2,1,2", "--accumulate", "2",
            "--max-regions", "8", "--image-size", "96", "--global-size", "64", "--batch-size", "6",
            "--summary", str(tmp_path / "summary.json")]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**env, "RAY_ADDRESS": cluster.address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        # a checkpoint folder exists before its report is registered: wait until a later one exists
        while len(store.glob(f"{runs.removeprefix('s3://')}/e2e/checkpoint_*")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its third checkpoint"
            time.sleep(0.5)
        victims = train_worker_pids()
        assert len(victims) == 2, victims
        os.kill(max(victims), signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()
    assert proc.returncode == 0, output[-4000:]
    assert "resuming from checkpoint" in output

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["map"]) == STAGES
    ckpt = summary["checkpoint"]  # in the store, loadable from there
    assert ckpt.startswith(f"{runs}/e2e/checkpoint_") and storage.isfile(ckpt)
    assert mlflow_run_id(f"{runs}/e2e") == summary["run_id"] and storage.isfile(f"{runs}/e2e/{RUN_ID_FILE}")
    names = shards.class_names(f"{s3}/shards/train2017")
    assert Predictor.load(ckpt).class_names == names

    client = MlflowClient(tracking_server)  # the run, on PostgreSQL behind the server
    mlrun = client.get_run(summary["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["stage_reached"] == "joint"
    assert mlrun.data.tags["ray_nodes"] == "2" and mlrun.data.params["accumulate"] == "2"
    assert mlrun.data.metrics["val/mAP/joint"] == pytest.approx(summary["map"]["joint"])
    assert mlrun.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server ...
    stored = store.find(f"{s3.removeprefix('s3://')}/mlartifacts")  # ... into the object store
    assert any(p.endswith(f"{summary['run_id']}/artifacts/pr_curves.png") for p in stored)
    assert any(p.endswith("artifacts/checkpoint/checkpoint.pt") for p in stored)  # the MLflow Model's weights

    assert summary["registered_model"] == f"models:/{MODEL}/1"
    image = str(next((synthetic_root / "val2017").glob("*.jpg")))
    client_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # MLflow needs no store credentials
    client_env.update(MLFLOW_TRACKING_URI=tracking_server, HOME=str(tmp_path))  # HOME: the download cache
    run(["-m", "rgnn.infer.predict", "--checkpoint", summary["registered_model"], image, "--out", str(tmp_path / "p.json")],
        client_env)
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(predictions) == 1 and list(predictions[0]["scores"]) == names
