"""cluster.ablation on a tiny set: every row trained, logged under one parent run, the table written,
and a rerun that skips the finished rows (reading the stage-1 weights of an earlier version's form)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.ablation import GLOBAL, ROWS, _pool, main, row_config
from rgnn.io.checkpoint import read_payload
from rgnn.train.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_rows_train_what_their_names_say_over_the_base_config():
    """The photo recipe trains its gate by eq. 7 alone in stage 4; the multi-label and multi-task rows' gates
    learn from the loss they are named after anyway (eq. 6 / eq. 9)."""
    base, _ = parse_args(["--photos"])
    assert base.schedule.gate_loss == "localization"
    task = row_config(base, *ROWS["region gate, multi-task loss"], seed=1)
    label = row_config(base, *ROWS["region gate, multi-label loss"], seed=1)
    assert (task.schedule.gate_loss, task.schedule.epochs, task.model.gate) == ("multitask", [0, 4, 2, 6], "region")
    assert (label.schedule.gate_loss, label.schedule.epochs, label.schedule.lambdas.start,
            label.schedule.lambdas.family) == ("multitask", [0, 4, 0, 6], 0.0, "constant")
    ungated = row_config(base, *ROWS["regional, multi-scale"], seed=1)
    assert (ungated.model.gate, ungated.schedule.epochs, ungated.schedule.seed) == ("none", [0, 10, 0, 0], 1)


def test_ablation_produces_every_row(shard_root, tmp_path):
    out = tmp_path / "table.md"
    args = ["--shards", str(shard_root), "--smoke-test", "--epochs", "1,1,1,1", "--max-regions", "8",
            "--image-size", "96", "--global-size", "64", "--batch-size", "12", "--out", str(out),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--seeds", "1"]
    # as the README runs it: a fresh interpreter, `python -m cluster.ablation`, two rows at a time in two processes
    run = subprocess.run([sys.executable, "-m", "cluster.ablation", *args, "--jobs", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    assert f"table: {out}" in run.stdout and text in run.stdout
    assert "region gate, pool fc6 (seed 0) [joint] epoch 1/1" in run.stdout  # each process's lines name their row
    state = json.loads((tmp_path / "table.md.rows.json").read_text())
    # one row again in this process, from the same stage-1 weights and seed: the same figure
    rerun = dict(state, rows={n: r for n, r in state["rows"].items() if n != "regional, multi-scale"})
    (tmp_path / "table.md.rows.json").write_text(json.dumps(rerun))
    main(args)
    again = json.loads((tmp_path / "table.md.rows.json").read_text())["rows"]
    assert again["regional, multi-scale"]["0"]["mAP"] == pytest.approx(state["rows"]["regional, multi-scale"]["0"]["mAP"],
                                                                     abs=1e-3)
    assert again["regional, multi-scale"]["0"]["run_id"] != state["rows"]["regional, multi-scale"]["0"]["run_id"]
    state["rows"]["regional, multi-scale"] = again["regional, multi-scale"]
    text = out.read_text()

    stage1 = tmp_path / "table.md.global-seed0.pt"  # a checkpoint payload: the global model of seed 0
    payload = read_payload(stage1)
    assert payload.stage == "global" and len(payload.class_names) == 10 and payload.model_config["gate"] == "none"
    # as the ablation saved it before the payload: the backbone's and fc8's tensors alone
    torch.save({k: v for k, v in payload.model.items() if k.startswith(("backbone.", "fc8."))}, stage1)
    results = main(args)  # every row is recorded: nothing retrained, the same figures as the table's
    assert json.loads((tmp_path / "table.md.rows.json").read_text())["rows"] == state["rows"]
    assert out.read_text() == text
    assert list(results) == [GLOBAL, *ROWS]
    for name, r in results.items():
        assert f"| {name} |" in text and f"{100 * r['mAP']:.1f}" in text
        assert 0.0 <= r["mAP"] <= 1.0 and len(r["ap"]) == 10

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = state["parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert {c.data.tags["ablation_row"] for c in children} == {GLOBAL, *ROWS}
    assert {c.info.run_name for c in children} == {f"{n} (seed 0)" for n in (GLOBAL, *ROWS)}
    table_runs = {r["runs"][0]["run_id"] for r in results.values()}  # the runs the table reads
    by_name = {c.data.tags["ablation_row"]: c for c in children if c.info.run_id in table_runs}
    for name, r in results.items():
        assert by_name[name].data.metrics["val/mAP"] == pytest.approx(r["mAP"])
    assert by_name["regional, single scale"].data.params["scales"] == "1"
    assert by_name["feature gate, multi-label loss"].data.params["lambda_start"] == "0.0"
    assert json.loads(by_name["region gate, pool fc6"].data.params["epochs"]) == [0, 1, 1, 1]
    assert by_name["oracle gates (eq. 8 target)"].data.params["oracle_gates"] == "true"
    # the gate AUC column: every gated row has one, the oracle's is 1 (its gates are the target)
    for name, r in results.items():
        assert (r["gate_auc"] is None) == (ROWS.get(name, ({"gate": "none"},))[0]["gate"] == "none"
                                           and name != "oracle gates (eq. 8 target)"), name
    assert results["oracle gates (eq. 8 target)"]["gate_auc"] == pytest.approx(1.0)
    assert "| oracle gates (eq. 8 target) | oracle (eq. 8) |" in text
    assert "table.md" in {a.path for a in client.list_artifacts(parent)}

    assert len(client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")) == len(results) + 1  # the row run twice
    # resumed against another tracking store, which does not hold the saved parent run: named at once
    elsewhere = [a if not a.startswith("sqlite") else f"sqlite:///{tmp_path}/other.db" for a in args]
    with pytest.raises(SystemExit, match=f"table.md.rows.json: run {parent} is not in the tracking store"):
        main(elsewhere)


def _fail_or_sleep(seconds: float) -> float:
    if not seconds:
        raise ValueError("row failed")
    time.sleep(seconds)
    return seconds


def test_a_failing_row_stops_the_rows_training_beside_it_and_those_not_started():
    start = time.monotonic()
    with pytest.raises(ValueError, match="row failed"), _pool(2) as run:
        for _ in run(_fail_or_sleep, [60.0, 0.0, 60.0, 60.0]):
            pass
    assert time.monotonic() - start < 30  # not the 60 s of the row beside it, nor 120 for the rest
