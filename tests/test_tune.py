"""tune/search.py end to end: the smoke test's MLflow parent and child runs, best_config.json that
training accepts, and an interrupted search resumed without rerunning its finished trials."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rgnn.train.config import parse_args

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def search_args(tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "tune/search.py", "--smoke-test", "--out", str(tmp_path / "out"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "runs"),
            "--cache-dir", str(cache), *extra]


def child_runs(client: MlflowClient, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_smoke_search_logs_trials_and_a_usable_best_config(tmp_path, cache):
    run = subprocess.run(search_args(tmp_path, cache), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = tmp_path / "out"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = json.loads((out / "search_state.json").read_text())["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert {"best_config.json", "trials.json", "map_vs_lr.png"} <= {a.path for a in client.list_artifacts(parent)}

    children = child_runs(client, parent)
    trials = [r for r in children if r.info.run_name.startswith("trial")]
    assert len(trials) >= 4 and len(children) == len(trials) + 1  # + the shared stages 1-3 run
    for r in trials:
        assert "val/mAP" in r.data.metrics and "train/lambda" in r.data.metrics
        assert r.data.params["start_stage"] == "joint"  # stages 1-3 come from the shared checkpoint
        assert r.info.status in ("FINISHED", "KILLED")  # KILLED: stopped early by ASHA
    assert len({r.data.params["lambda_schedule"] + r.data.params["stage_lr"] for r in trials}) == len(trials)

    best = json.loads((out / "best_config.json").read_text())
    rows = json.loads((out / "trials.json").read_text())
    top = max(rows, key=lambda r: r["val_map"])
    assert best["lambda_schedule"] == top["params"]["lambda_schedule"]
    assert best["stage_lr"]["joint"] == pytest.approx(top["params"]["lr_joint"])
    cfg, _ = parse_args(["--config", str(out / "best_config.json")])  # training accepts it
    assert (cfg.schedule.lambdas.family, cfg.schedule.stage_lr) == (best["lambda_schedule"], best["stage_lr"])


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, cache):
    args = search_args(tmp_path, cache, "--max-concurrent", "1", "--search", "grid", "--trials", "1",
                       "--space", str(_space(tmp_path)))
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    state = tmp_path / "out" / "search_state.json"
    try:
        deadline = time.time() + 600
        while True:  # interrupt once the first trial has finished
            assert proc.poll() is None and time.time() < deadline, "search ended before a trial finished"
            if state.is_file():
                done = [r for r in child_runs(client, json.loads(state.read_text())["parent_run_id"])
                        if r.info.run_name.startswith("trial") and r.info.status == "FINISHED"]
                if done:  # seen FINISHED: it must stay so, with this end time, through the interrupt and resume
                    seen = {r.info.run_id: r.info.end_time for r in done}
                    break
            time.sleep(1)
        proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "--resume" in output, output[-3000:]
    parent = json.loads(state.read_text())["parent_run_id"]
    finished = {r.info.run_id: r.info.end_time for r in child_runs(client, parent)
                if r.info.run_name.startswith("trial") and r.info.status == "FINISHED"}
    assert all(finished.get(k) == v for k, v in seen.items()), (seen, finished)
    assert not (tmp_path / "out" / "best_config.json").exists()

    run = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    trials = [r for r in child_runs(client, parent) if r.info.run_name.startswith("trial")]
    assert len(trials) == 4  # the 2x2 grid, each trial once
    after = {r.info.run_id: r.info.end_time for r in trials}
    assert all(after[k] == v for k, v in finished.items())  # finished trials were not rerun
    steps = [m.step for m in client.get_metric_history(next(iter(finished)), "val/mAP")]
    assert len(steps) == len(set(steps))
    assert (tmp_path / "out" / "best_config.json").is_file()


def test_a_finished_trial_started_again_replays_its_reports_without_training(tmp_path):
    """The race behind --resume: a trial whose training finished just before Ctrl+C, not yet in
    Tune's saved state, is started again; it must report its epochs again and touch nothing."""
    import ray
    from ray import tune

    from cluster.driver import RUN_ID_FILE
    from sharding.ray_setup import init_ray
    from rgnn.tracking.runs import start_run
    from tune.search import replay_finished

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_dirs, run_ids = {}, {}
    for name, status in (("done", "FINISHED"), ("stopped", "KILLED")):
        run_id = run_ids[name] = start_run(uri, "replay", name, {}, {})
        for step, value in ((10, 0.2), (20, 0.3), (20, 0.35), (30, 0.4)):  # step 20: an epoch run twice
            client.log_metric(run_id, "val/mAP", value, step=step)
        client.set_terminated(run_id, status)
        run_dirs[name] = tmp_path / name
        run_dirs[name].mkdir()
        (run_dirs[name] / RUN_ID_FILE).write_text(run_id)
    end_time = client.get_run(run_ids["done"]).info.end_time

    def trainable(config):
        assert not replay_finished(run_dirs["stopped"], uri)  # not finished: the trial trains again
        assert not replay_finished(tmp_path / "new", uri)  # never started
        assert replay_finished(run_dirs["done"], uri)

    init_ray(num_cpus=1, include_dashboard=False)
    try:
        grid = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"))).fit()
    finally:
        ray.shutdown()
    assert grid[0].error is None
    assert grid[0].metrics["training_iteration"] == 3 and grid[0].metrics["val/mAP"] == pytest.approx(0.4)
    assert client.get_run(run_ids["done"]).info.end_time == end_time


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("lr_joint: {grid: [0.0003, 0.001]}\nlambda_schedule: {grid: [linear, cosine]}\n")
    return path
