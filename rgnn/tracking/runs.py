"""MLflow at the edge: resolve and check the tracking store, one run per training (training_run: opened
and ended here), rank-0 logging, parent runs of a search or an ablation, and what the callers read back
(a run's status, results and metric history, a parent's child runs). The training engine never imports
this module: its callers hand `RunLogger.step` / `RunLogger.epoch` to rgnn.train.stages.Hooks."""
from __future__ import annotations

import base64
import getpass
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rgnn.io.redaction import redact, scrub


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory.

    A relative sqlite path is made absolute so Ray workers (whose working directory differs)
    write to the same store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:  # a plain folder: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the store, when a tracking URI cannot work: an HTTP server or a database server
    that does not answer within `timeout`, a SQLite file in a folder that does not exist.

    Raises:
        ConnectionError: the server does not answer; FileNotFoundError: the SQLite file's folder is missing.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg -> postgresql
    try:
        if scheme in ("http", "https"):
            # the user info goes into a header: urllib takes `user:pw@host` for a host with a bad port
            netloc = parts.netloc.rsplit("@", 1)[-1]
            request = urllib.request.Request(urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")))
            if parts.username is not None:
                token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            with urllib.request.urlopen(request, timeout=timeout) as r:
                r.read()
        elif scheme in DATABASE_PORTS:
            with socket.create_connection((parts.hostname or "localhost", parts.port or DATABASE_PORTS[scheme]),
                                          timeout=timeout):
                pass
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"MLflow tracking store {redact(uri)} cannot be reached ({scrub(str(e), uri)}); "
                              "start its server or pass another --tracking-uri") from None
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"MLflow tracking store {uri}: the folder {folder} does not exist")


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite store, else the server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def class_metric(name: str) -> str:
    """The MLflow metric key of a class's AP, `val/AP/<class>`: characters MLflow refuses in a key
    (anything but letters, digits, `_ - . /` and spaces) become `_`; the names themselves are in the
    per-class AP table artifact."""
    return "val/AP/" + re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


# the MLflow UI opens an experiment of this kind in its model-training view (not the GenAI one)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts beside a SQLite store) if missing; tagged with
    EXPERIMENT_KIND either way."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_root(uri),
                                                                     tags=EXPERIMENT_KIND)
    if exp and any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for k, v in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp_id, k, v)
    return exp_id


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              run_id: str | None = None) -> str:
    """Create (or reopen, with run_id) the run of one training; returns its id.

    Beside `tags`, a new run gets what the MLflow UI shows as its source, user and commit."""
    check_reachable(uri)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment, uri)
    if run_id is None:
        tags = {"mlflow.source.name": sys.argv[0] or "python", "mlflow.source.type": "JOB",
                "mlflow.user": getpass.getuser(), "mlflow.source.git.commit": git_commit(), **tags}
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
    else:
        try:
            client.update_run(run_id, status="RUNNING")
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(f"run {run_id} is not in the tracking store {redact(uri)}: resume with the tracking URI "
                             "it was started with") from None
    return run_id


@contextmanager
def training_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict,
                 run_id: str | None = None) -> Iterator[str]:
    """The run of one training (start_run: created, or reopened with run_id) for the block, which gets its id.

    The run ends FINISHED when the block does and FAILED on any exception, Ctrl+C included. Only the
    process that opened it ends it: workers log into it (RunLogger) and leave it RUNNING (RunLogger.model),
    so FINISHED means that the whole training ran (what tune/search.py replays a trial from).
    """
    run_id = start_run(uri, experiment, run_name, params, tags, run_id)
    client = MlflowClient(uri)
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def run_page(uri: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in its model-training view: on the tracking server for an http(s)
    URI, else where `mlflow ui` serves by default.

    MLflow 3.17's UI opens in its GenAI view (Traces, Token Usage) unless the browser's workflow toggle or
    the link's `workflowType` says otherwise; the experiment's kind tag does not choose the view."""
    exp = MlflowClient(uri).get_run(run_id).info.experiment_id
    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


def run_status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED, KILLED (or SCHEDULED)."""
    return MlflowClient(uri).get_run(run_id).info.status


def run_results(uri: str, run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    """A run's metrics (the latest value of each) and tags."""
    data = MlflowClient(uri).get_run(run_id).data
    return data.metrics, data.tags


def metric_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """step -> value of a run's metric `key`; a step logged twice (an epoch run again) has its last value."""
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


def child_runs(uri: str, parent: str) -> list[Run]:
    """The runs whose parent is run `parent` (the trials of a search, the rows of an ablation)."""
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")


def mark_stopped_early(uri: str, run_id: str) -> None:
    """A trial that the search's scheduler stopped: tagged stopped_early, ended KILLED."""
    client = MlflowClient(uri)
    client.set_tag(run_id, "stopped_early", "true")
    client.set_terminated(run_id, "KILLED")


def dataset_input(split_dir: str, manifest: dict, context: str) -> DatasetInput:
    """A shard split as an MLflow dataset input: the manifest's data set name, a digest of its shards'
    sha256, where it lives and its counts; `context` is "training" or "validation"."""
    digest = hashlib.sha256("".join(e["sha256"] for e in manifest["shards"]).encode()).hexdigest()[:16]
    profile = {"images": manifest["samples"], "classes": len(manifest["class_names"]),
               "shards": len(manifest["shards"]), "bytes": sum(e["bytes"] for e in manifest["shards"]),
               "proposals_per_image": manifest["proposals"].get("max_boxes")}
    source = str(split_dir)
    dataset = Dataset(name=manifest["dataset"], digest=digest, source_type="s3" if source.startswith("s3://") else "local",
                      source=json.dumps({"uri": source}), profile=json.dumps(profile))
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])


@contextmanager
def system_metrics(uri: str, run_id: str, node: str, interval: float = 10.0) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU where present) of this machine, every `interval` seconds, as the
    run's system/<node>/... metrics while the block runs (MLflow's SystemMetricsMonitor)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=node, tracking_uri=uri,
                                   resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) pointed at `uri` for the block only: the process's
    own setting ($MLFLOW_TRACKING_URI or mlflow.set_tracking_uri) is left as it was."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # MLflow's own scoped setter

    with _use_tracking_uri(uri):
        yield


def register_model(uri: str, model_uri: str, name: str) -> str:
    """Register a logged MLflow Model (what RunLogger.model returns, kept in the run's `model_uri` tag) in the
    Model Registry under `name`; returns the version's URI, models:/<name>/<version>."""
    with fluent_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name)
    return f"models:/{name}/{version.version}"


def recall_metrics(split: str, recall: dict) -> dict[str, float]:
    """A shard manifest's `proposal_recall` as MLflow metrics: data/<split>/top<k>/recall_<iou>, and per
    area bin data/<split>/top<k>/recall_<iou>/scale<1..5> (section 3.2's bins, smallest first; bins
    without objects left out)."""
    out = {}
    for k, r in recall.items():
        rows = [("", r)] + [(f"/scale{i + 1}", b) for i, b in enumerate(r["bins"].values())]
        for suffix, row in rows:
            for key, value in row.items():
                if key.startswith("recall@") and value is not None:
                    out[f"data/{split}/top{k}/recall_{key[7:]}{suffix}"] = value
    return out


@contextmanager
def parent_run(uri: str, experiment: str, name: str, params: dict, tags: dict, state: dict,
               save: Callable[[], None], state_file: str | Path) -> Iterator["RunLogger"]:
    """The parent run of a search or an ablation, whose children are its trials or rows.

    Its id lives in `state["parent_run_id"]` (created here and `save()`d at once to `state_file`, so a
    resumed job reopens the same run; one missing from the store is an error naming the file). The run
    ends FINISHED when the block does, KILLED on Ctrl+C or exit (a resume reopens it), FAILED on an
    error: never left RUNNING.
    """
    if "parent_run_id" not in state:
        state["parent_run_id"] = start_run(uri, experiment, name, params, {**tags, "git_commit": git_commit()})
        save()
    else:
        try:
            start_run(uri, experiment, name, params, tags, state["parent_run_id"])
        except ValueError as e:
            raise ValueError(f"{state_file}: {e}") from None
    log = RunLogger(uri, state["parent_run_id"])
    try:
        yield log
    except BaseException as e:
        log.flush()
        log.client.set_terminated(log.run_id, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    log.flush()
    log.client.set_terminated(log.run_id, "FINISHED")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """Rank 0's handle on the training's MLflow run: buffered metrics, artifacts, tags."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self._buffer: list[Metric] = []

    def metric(self, key: str, value: float, step: int) -> None:
        self._buffer.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._buffer) >= 500:
            self.flush()

    def metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.metric(k, v, step)

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def step(self, global_step: int, values: dict[str, float]) -> None:
        """Hooks.on_step: the step's losses, lambda and rate."""
        self.metrics(values, global_step)

    def epoch(self, state, metrics: dict, result: dict | None) -> None:
        """Hooks.on_epoch: val/mAP, val/CF1, val/OF1 when evaluated; val/mAP/<stage> (and VOC 2007's
        11-point mAP) and the stage_reached tag when a stage ends."""
        if result is not None:
            self.metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, state.global_step)
        if metrics["epoch"] == metrics["epochs"]:
            stage = metrics["stage"]
            self.metric(f"val/mAP/{stage}", result["mAP"], state.global_step)
            if "mAP_voc07" in result:
                self.metric(f"val/mAP_voc07/{stage}", result["mAP_voc07"], state.global_step)
            self.tag("stage_reached", stage)
        self.flush()

    def class_aps(self, class_names: list[str], ap) -> None:
        """Each class's AP (not NaN: a class without val images has none) as `class_metric(name)`, step 0."""
        self.metrics({class_metric(n): float(a) for n, a in zip(class_names, ap) if not math.isnan(a)}, 0)

    def datasets(self, inputs: list[DatasetInput]) -> None:
        self.client.log_inputs(self.run_id, datasets=inputs)

    def tag(self, key: str, value) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def model(self, checkpoint_folder: str | Path, class_names: list[str], example_image: bytes) -> str:
        """Log a checkpoint folder as the run's MLflow Model `model` (rgnn.tracking.pyfunc, with `example_image`
        as its input example); returns the model URI, also kept in the run's `model_uri` tag."""
        from rgnn.tracking import pyfunc  # torch and the model: only in the process that logs one

        with fluent_tracking_uri(self.uri):
            mlflow.start_run(run_id=self.run_id)  # log_model logs into the active run
            try:
                uri = pyfunc.log_model(checkpoint_folder, class_names, example_image)
            finally:
                # Leaving the fluent run must not end the training's run: `with mlflow.start_run()` would
                # mark it FINISHED here, in the worker, while the driver is still training (and a search
                # interrupted then sees a finished trial that its driver later marks FAILED).
                mlflow.end_run(status=RunStatus.to_string(RunStatus.RUNNING))
        self.tag("model_uri", uri)
        return uri

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
