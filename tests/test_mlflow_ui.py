"""What the MLflow UI shows of a training run, checked in a real browser (headless Chromium against
`mlflow ui` on loopback, as the README opens the store): the run page's logged model, data sets, metrics,
description, source and user; its commit; the model-training view its link opens; its system metrics;
the registered model version's page with the signature."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

import services
from cluster.driver import describe
from rgnn.train.config import TrainConfig
from rgnn.data import shards
from rgnn.tracking.runs import RunLogger, dataset_input, register_model, run_page, start_run, system_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MODEL = "rgnn-ui"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # as the driver records --git-commit


def page_text(url: str, budget_ms: int = 20000) -> str:
    """The visible text of a page once its scripts ran (`budget_ms` of virtual time)."""
    if CHROMIUM is None:
        pytest.fail("headless Chromium not found: install it (Debian: apt-get install chromium; .ci/system-packages does)")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.fixture(scope="module")
def ui(trained, tmp_path_factory):
    """A run logged as the driver logs one (data sets, description, metrics, system metrics, the MLflow
    Model, registered), and an mlflow server showing it."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root}/mlflow.db"
    train, val = trained / "shards" / "train2017", trained / "shards" / "val2017"
    manifests = [shards.read_manifest(train), shards.read_manifest(val)]
    cfg = TrainConfig.from_flat(json.loads((trained / "ckpt" / "config.json").read_text()))
    run_id = start_run(uri, "ui", "synthetic-region-small", cfg.flat(),
                       {"gate": "region", "mlflow.source.git.commit": COMMIT})
    log = RunLogger(uri, run_id)
    log.datasets([dataset_input(str(train), manifests[0], "training"), dataset_input(str(val), manifests[1], "validation")])
    log.tag("mlflow.note.content", describe(cfg, *manifests))
    with system_metrics(uri, run_id, "node0", interval=0.5):
        for step in range(5):
            log.metrics({"train/loss_cls": 1.0 / (step + 1), "val/mAP": 0.1 * step}, step)
            time.sleep(0.5)
        log.flush()
    names = shards.class_names(val)
    model_uri = log.model(trained / "ckpt", names, shards.first_image(val))
    version = register_model(uri, model_uri, MODEL)
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
    with services.mlflow_server(uri, None) as url:  # `mlflow ui --backend-store-uri`, as the README opens it
        yield {"url": url, "uri": uri, "run_id": run_id, "model_uri": model_uri, "version": version,
               "experiment": MlflowClient(uri).get_run(run_id).info.experiment_id, "manifests": manifests,
               "names": names}


def test_run_page_shows_model_datasets_metrics_description_source(ui):
    text = page_text(f"{ui['url']}/#/experiments/{ui['experiment']}/runs/{ui['run_id']}")
    assert "Logged models (1)" in text and " model Ready" in text
    for manifest in ui["manifests"]:
        assert manifest["dataset"] in text  # "Datasets" lists both splits
    assert "Datasets None" not in text
    assert re.search(r"Metrics \(\d+\)", text) and "val/mAP" in text and "No metrics recorded" not in text
    assert "RGNN with region-level gates" in text and "No description" not in text
    assert f"Registered models {MODEL} v1" in text
    run = MlflowClient(ui["uri"]).get_run(ui["run_id"])
    assert f"Created by {run.data.tags['mlflow.user']}" in text
    assert "Source —" not in text
    assert re.search(rf"Source \S+ {COMMIT[:7]} ", text), text[text.find("Source"):][:200]  # the script, its commit


def test_the_runs_link_opens_the_model_training_view(ui):
    link = run_page(ui["uri"], ui["run_id"])  # what the driver prints (its server: the tracking URI's, or mlflow ui's)
    assert link.startswith("http://127.0.0.1:5000/#/experiments/") and ui["run_id"] in link
    text = page_text(link.replace("http://127.0.0.1:5000", ui["url"]))
    assert "Model registry" in text and "Logged models (1)" in text
    for genai in ("Token Usage", "Evaluation runs", "Prompts & versions"):
        assert genai not in text
    page, query = link.replace("http://127.0.0.1:5000", ui["url"]).split("?")
    text = page_text(page.split("/runs/")[0] + "?" + query)  # the experiment's page, in the same view
    assert "synthetic-region-small" in text and "Token Usage" not in text and "Evaluation runs" not in text


def test_system_metrics_and_model_version_pages(ui):
    run = MlflowClient(ui["uri"]).get_run(ui["run_id"])
    assert any(k.startswith("system/node0/cpu_utilization_percentage") for k in run.data.metrics)
    text = page_text(f"{ui['url']}/#/experiments/{ui['experiment']}/runs/{ui['run_id']}/system-metrics")
    charts = re.search(r"system/node0 \((\d+)\)", text)  # the node's section of charts
    assert charts and int(charts.group(1)) >= 3, text[:2000]
    text = page_text(f"{ui['url']}/#/models/{MODEL}/versions/1")
    # the version's source run and model, and its signature: 1 input (image), one output per class
    assert "Source Run : synthetic-region-small Source Model : model" in text, text[:3000]
    assert f"Inputs (1) Outputs ({len(ui['names'])})" in text
