"""The trained model as an MLflow Model: logged with signature and input example, loaded by MLflow's
pyfunc with the Predictor's scores, registered and predicted from models:/NAME/VERSION by rgnn's own
(weights-only) loader, and served by `mlflow models serve` over HTTP on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import services
from rgnn.tracking import pyfunc
from rgnn.io.checkpoint import resolve_checkpoint
from rgnn.data import shards
from rgnn.data.images import decode_image
from rgnn.infer.predict import Predictor, main as predict_main
from rgnn.tracking.runs import RunLogger, register_model, start_run

NAME = "rgnn-test"


@pytest.fixture(scope="module")
def logged(trained, tmp_path_factory):
    """The trained checkpoint logged as a run's MLflow Model and registered as NAME (version 1)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    run_id = start_run(uri, "test", "pyfunc", {}, {})
    names = shards.class_names(trained / "shards" / "val2017")
    model_uri = RunLogger(uri, run_id).model(trained / "ckpt", names, shards.first_image(trained / "shards" / "val2017"))
    version = register_model(uri, model_uri, NAME)
    return {"uri": uri, "run_id": run_id, "model_uri": model_uri, "version": version, "names": names}


@pytest.fixture()
def tracking(logged, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])  # what rgnn.infer.predict and MLflow's loaders use
    return logged


def val_images(synthetic_root, n: int) -> list[Path]:
    return sorted((synthetic_root / "val2017").glob("*.jpg"))[:n]


def test_logged_model_has_signature_example_and_predicts_like_the_predictor(tracking, trained, synthetic_root):
    info = mlflow.models.get_model_info(tracking["model_uri"])
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == tracking["names"]
    run = MlflowClient(tracking["uri"]).get_run(tracking["run_id"])
    assert run.data.tags["model_uri"] == tracking["model_uri"]
    assert run.info.status == "RUNNING"  # logging the model leaves the run to the training that owns it
    files = val_images(synthetic_root, 3)
    frame = pd.DataFrame({"image": [pyfunc.encode_image(f) for f in files]})
    out = mlflow.pyfunc.load_model(tracking["model_uri"]).predict(frame)
    assert list(out.columns) == tracking["names"] and len(out) == 3
    expected = np.stack([p.scores for p in Predictor.load(trained / "ckpt")([decode_image(f) for f in files])])
    np.testing.assert_allclose(out.to_numpy(), expected, atol=1e-5)


def test_bad_input_rows_are_named(tracking, synthetic_root):
    model = mlflow.pyfunc.load_model(tracking["model_uri"])
    good = pyfunc.encode_image(val_images(synthetic_root, 1)[0])
    with pytest.raises(Exception, match="row 1 of 'image': not base64"):
        model.predict(pd.DataFrame({"image": [good, "%%%"]}))
    with pytest.raises(ValueError, match="cannot decode image row 0"):
        pyfunc.decode_column(pd.DataFrame({"image": [pyfunc.encode_image(b"not an image")]}))


def test_predict_from_the_registry_uses_the_weights_only_loader(tracking, trained, synthetic_root, tmp_path):
    assert tracking["version"] == f"models:/{NAME}/1"
    image = str(val_images(synthetic_root, 1)[0])
    by_model = predict_main(["--checkpoint", tracking["version"], image, "--out", str(tmp_path / "a.json")])
    by_path = predict_main(["--checkpoint", str(trained / "ckpt"), image, "--out", str(tmp_path / "b.json")])
    assert by_model["predictions"] == by_path["predictions"]
    assert resolve_checkpoint(f"runs:/{tracking['run_id']}/model").name == "checkpoint.pt"


def test_an_mlmodel_pointing_outside_its_folder_is_refused(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function:\n    artifacts:\n      checkpoint:\n"
                                      "        path: ../../etc\n")
    with pytest.raises(ValueError, match="points outside the model folder"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(ValueError, match="not an RGNN MLflow Model"):
        resolve_checkpoint(tmp_path)


def test_mlflow_models_serve_answers_invocations(tracking, synthetic_root, tmp_path):
    port = services.free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", tracking["version"],
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env={**os.environ, "MLFLOW_TRACKING_URI": tracking["uri"]}, stdout=log, stderr=log)
    try:
        services.wait_http(f"http://127.0.0.1:{port}/ping", server, "mlflow models serve", tmp_path / "serve.log")
        files = val_images(synthetic_root, 2)
        cells = [pyfunc.encode_image(f) for f in files]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        local = mlflow.pyfunc.load_model(tracking["version"]).predict(pd.DataFrame({"image": cells}))
        assert [list(row) for row in answer] == [tracking["names"]] * 2
        np.testing.assert_allclose([[row[n] for n in tracking["names"]] for row in answer], local.to_numpy(), atol=1e-5)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_logging_the_model_leaves_the_process_tracking_uri_alone(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")  # later code's own store
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/other.db"
