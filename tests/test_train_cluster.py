"""cluster/train_coco.py end to end against a real local head node (`ray start --head` on 127.0.0.1):
`ray job submit` and `--resume` of a stopped run. A killed worker, 2 nodes, an object store and an MLflow
server: tests/test_deployment.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import services
from rgnn.data.images import decode_image
from rgnn.infer.predict import Predictor
from rgnn.tracking.runs import git_commit

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["global", "regional", "gates", "joint"]


@pytest.fixture(scope="module")
def head():
    """A real head node with 2 CPUs, what a user starts with `ray start --head` (as in the README:
    token authentication on, server and clients sharing ~/.ray/auth_token)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dashboard, agent = services.free_port(), services.free_port(), services.free_port()
    temp = tempfile.mkdtemp(prefix="rgnn-ray-")  # every process of this head names it: stopped by it below
    try:  # a port of its own for the job agent too: another Ray of the machine holds the default (52365)
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                        "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp, "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:  # this head only: `ray stop` would stop every Ray of the machine
        services.stop_process_trees([temp, f"127.0.0.1:{port}"])
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic set and its shards for every run of this module."""
    return tmp_path_factory.mktemp("cache")


def train_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["cluster/train_coco.py", "--smoke-test", "--storage", str(out / "runs"), "--cache-dir", str(cache),
            "--summary", str(out / "summary.json"), *extra]


def test_job_submit_smoke_test_logs_everything(head, cache, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    commit = git_commit()  # as the README's command passes it: the uploaded copy has no .git
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(ROOT), "--",
           "python", *train_args(tmp_path, cache, "--git-commit", commit, "--tracking-uri", db)]
    run = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "succeeded" in run.stdout
    assert "final val mAP" in run.stdout

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["map"]) == STAGES
    assert all(0.0 <= v <= 1.0 for v in summary["map"].values())
    assert Path(summary["checkpoint"]).is_file()
    best = summary["best_checkpoint"]  # kept beside the latest: the stage whose val mAP was highest
    assert best["val_mAP"] == pytest.approx(max(summary["map"].values())) and Path(best["checkpoint"]).is_file()
    assert summary["map"][best["stage"]] == pytest.approx(best["val_mAP"])
    client = MlflowClient(db)
    mlrun = client.get_run(summary["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.run_name == "synthetic-region-small"
    for key in ("train/loss_cls", "train/loss_loc", "train/lambda", "train/lr", "val/mAP", "val/CF1", "val/OF1"):
        assert key in mlrun.data.metrics, key
    for stage in STAGES:
        assert mlrun.data.metrics[f"val/mAP/{stage}"] == pytest.approx(summary["map"][stage])
    lam = client.get_metric_history(summary["run_id"], "train/lambda")
    assert len({m.step for m in lam}) > 3 and max(m.value for m in lam) > 0  # per step, lambda > 0 in stage 4
    tags = mlrun.data.tags
    assert (tags["stage_reached"], tags["gate"], tags["backbone"], tags["dataset"]) == ("joint", "region", "small", "synthetic")
    assert tags["ray_nodes"] == "1" and tags["git_commit"] == tags["mlflow.source.git.commit"] == commit
    assert mlrun.data.params["epochs"] == "[1, 1, 1, 2]" and mlrun.data.params["workers"] == "2"
    names = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config.json", "per_class_ap.md", "per_class_ap.csv", "pr_curves.png", "gates"} <= names
    gates = client.list_artifacts(summary["run_id"], "gates")
    assert gates and all(a.path.endswith(".png") for a in gates)
    assert len(summary["per_class_ap"]) == 10

    assert tags["model_uri"] == summary["model_uri"] and summary["model_uri"].startswith("models:/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)  # the logged MLflow Model serves prediction again
    predictor = Predictor.load(f"runs:/{summary['run_id']}/model")
    image = next((cache / "synthetic-48-24-seed0" / "val2017").glob("*.jpg"))
    prediction = predictor([decode_image(image)])[0]
    assert predictor.stage == "joint" and prediction.scores.shape == (10,) and prediction.gates is not None


@pytest.mark.skipif(not Path("/usr/share/tuxpaint/stamps").is_dir(), reason="needs tuxpaint-stamps-default")
def test_job_submit_of_the_photo_job_trains_efficientnet_on_photographs(head, cache, tmp_path):
    """The README's photo job as submitted, at smoke size: the photographic set generated and sharded,
    EfficientNet-Lite0 with its ImageNet weights through the four stages, one line per epoch in the log."""
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(ROOT), "--",
           "python", *train_args(tmp_path, cache, "--photos", "--tracking-uri", db)]
    run = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["map"]) == STAGES and len(summary["per_class_ap"]) <= 12
    mlrun = MlflowClient(db).get_run(summary["run_id"])
    assert (mlrun.data.tags["backbone"], mlrun.data.tags["dataset"]) == ("efficientnet_lite0", "photos")
    assert (mlrun.data.params["weights"], mlrun.data.params["mean"]) == ("imagenet", "[0.5, 0.5, 0.5]")
    assert (cache / "photos-main-48-24-seed0" / "annotations" / "instances_val2017.json").is_file()
    epoch_lines = [line for line in run.stdout.splitlines() if "] epoch " in line]
    assert len(epoch_lines) == 5 and "Reporting training result" not in run.stdout  # one line per epoch


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*")) if run_dir.is_dir() else []


def test_stopped_run_continues_with_resume(head, cache, tmp_path):
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    args = [sys.executable, *train_args(tmp_path, cache, "--epochs", "1,2,1,2", "--name", "stopped",
                                        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(_checkpoints(tmp_path / "runs" / "stopped")) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.2)
    proc.kill()  # the driver dies: its Ray Train run with it
    proc.wait()
    run_id = (tmp_path / "runs" / "stopped" / "mlflow_run_id.txt").read_text()
    run = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "resuming from checkpoint" in run.stdout
    assert "[global] epoch" not in run.stdout  # stage 1 was done before the stop
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run_id"] == run_id and list(summary["map"]) == STAGES  # the same MLflow run, finished


@pytest.mark.parametrize("case", ["http", "postgresql", "mysql", "sqlite-folder", "weights-file", "ray-address",
                                  "RAY_ADDRESS"])
def test_a_cause_that_stops_the_job_is_named_at_once(case, tmp_path):
    """Before any shard, Ray or worker: one line naming the cause and the flag or file, within 30 s."""
    port = services.free_port()  # nothing listens there
    args, env, expect = [], {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, ""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    if case in ("http", "postgresql", "mysql"):
        tracking = {"http": f"http://127.0.0.1:{port}", "postgresql": f"postgresql://u:secret@127.0.0.1:{port}/m",
                    "mysql": f"mysql://u:secret@127.0.0.1:{port}/m"}[case]
        expect = f"127.0.0.1:{port}"
    elif case == "sqlite-folder":
        tracking, expect = f"sqlite:///{tmp_path}/nowhere/mlflow.db", str(tmp_path / "nowhere")
    elif case == "weights-file":
        args, expect = ["--backbone", "efficientnet_lite0", "--weights", str(tmp_path / "no.pth")], "--weights"
    elif case == "ray-address":
        args, expect = ["--address", f"127.0.0.1:{port}"], "--address"
    else:
        env["RAY_ADDRESS"], expect = f"127.0.0.1:{port}", "RAY_ADDRESS"
    start = time.time()
    run = subprocess.run([sys.executable, "cluster/train_coco.py", "--smoke-test", "--tracking-uri", tracking,
                          "--cache-dir", str(tmp_path / "cache"), "--storage", str(tmp_path / "runs"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], run.stderr[-3000:]
    assert "secret" not in run.stderr and "Traceback" not in run.stderr
    assert time.time() - start < 30
    assert not (tmp_path / "cache" / "shards").exists()  # no work was done


def test_best_checkpoint_is_the_highest_val_map_of_its_own_weights_among_the_kept():
    """An epoch without an evaluation carries the last val/mAP over; its checkpoint's score is NaN, so
    the best is never a checkpoint whose weights were not the ones evaluated."""
    from types import SimpleNamespace

    from cluster.driver import best_checkpoint
    from rgnn.train.stages import CHECKPOINT_SCORE

    local = SimpleNamespace(type_name="local")  # Ray's pyarrow file system of the checkpoint
    rows = [("global", 1, 0.5, 0.5), ("regional", 1, 0.5, float("nan")), ("regional", 2, 0.8, 0.8),
            ("joint", 1, 0.8, float("nan")), ("joint", 2, 0.7, 0.7)]
    kept = [(SimpleNamespace(path=f"/runs/c{i}", filesystem=local),
             {"stage": s, "epoch": e, "val/mAP": last, CHECKPOINT_SCORE: own}) for i, (s, e, last, own) in enumerate(rows)]
    assert best_checkpoint(kept) == {"checkpoint": "/runs/c2/checkpoint.pt", "stage": "regional", "epoch": 2,
                                     "val_mAP": 0.8}
    assert best_checkpoint([kept[1], kept[3]]) is None and best_checkpoint([]) is None
    on_s3 = (SimpleNamespace(path="bucket/runs/c9", filesystem=SimpleNamespace(type_name="s3")), {
        "stage": "joint", "epoch": 3, "val/mAP": 0.9, CHECKPOINT_SCORE: 0.9})
    assert best_checkpoint([*kept, on_s3])["checkpoint"] == "s3://bucket/runs/c9/checkpoint.pt"


def test_scaling_gives_one_worker_per_gpu_unless_told():
    from cluster.driver import scaling
    from rgnn.train.config import ClusterConfig

    assert scaling(ClusterConfig(), 0) == (2, 0.0)  # CPUs: 2 DDP workers
    assert scaling(ClusterConfig(), 8) == (8, 1.0)  # a multi-GPU node: one worker per GPU
    assert scaling(ClusterConfig(), 1) == (1, 1.0)  # one GPU: one worker on it, not 2 on the CPUs
    assert scaling(ClusterConfig(workers=4), 2) == (4, 0.0)  # more workers than GPUs: CPUs
    assert scaling(ClusterConfig(workers=2), 8) == (2, 1.0)
    assert scaling(ClusterConfig(workers=2, gpus_per_worker=0.5), 0) == (2, 0.5)  # told: as told
