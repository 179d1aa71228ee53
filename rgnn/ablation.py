"""The paper's ablation: the rows of Table 1 and the pool-layer comparison of section 4.3.

    python -m rgnn.ablation [training flags: --shards / --coco-root / --voc-root / none] [--out table.md]

Every row is trained and evaluated in this process with plain PyTorch (rgnn.training.run_stages,
on a GPU when there is one) and logged as an MLflow run under one parent run. Stage 1 (global
fine-tuning) does not depend on any row's setting, so it is trained once: its result is the
global baseline row and its weights start every other row. With E1..E4 the stage epochs:

- ungated rows (single-/multi-scale regional): stage 2 for E2 + E4 epochs, the same number of
  classification epochs the gated rows get;
- "multi-label loss" rows: stage 2 for E2, then stage 4 for E4 with lambda = 0 (eq. 6 alone; the
  gates learn only through the classification loss, no stage 3);
- "multi-task loss" rows: stages 2, 3, 4 as in training (eq. 9, lambda decaying);
- pool-layer rows: the region gate with the multi-task loss, gating and pooling fc6, fc7, fc8 or
  the softmax of fc8 (the last is the "region gate, multi-task loss" row itself, not retrained).

Each finished row is saved to `<out>.rows.json` at once; a rerun with the same --out skips it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rgnn.checkpoint import write_json
from rgnn.config import TrainConfig, build_parser, load_file, resolve
from rgnn.data import shards
from rgnn.model import RGNN
from rgnn.tables import ap_table, to_markdown
from rgnn.tracking import RunLogger, git_commit, resolve_tracking_uri, start_run
from rgnn.training import model_config, run_stages

# name -> (TrainConfig changes, how it trains: "regional" | "multilabel" | "multitask")
ROWS = {
    "regional, single scale": (dict(gate="none", scales=1), "regional"),
    "regional, multi-scale": (dict(gate="none", scales=5), "regional"),
    "region gate, multi-label loss": (dict(gate="region"), "multilabel"),
    "region gate, multi-task loss": (dict(gate="region"), "multitask"),
    "feature gate, multi-label loss": (dict(gate="feature"), "multilabel"),
    "feature gate, multi-task loss": (dict(gate="feature"), "multitask"),
    "region gate, pool fc6": (dict(gate="region", pool_layer="fc6"), "multitask"),
    "region gate, pool fc7": (dict(gate="region", pool_layer="fc7"), "multitask"),
    "region gate, pool fc8": (dict(gate="region", pool_layer="fc8"), "multitask"),
}
GLOBAL = "global baseline"
SOFTMAX_ROW = "region gate, multi-task loss"  # = pool softmax, the paper's default


def row_config(base: TrainConfig, changes: dict, kind: str) -> TrainConfig:
    """The TrainConfig of one row (stages 2-4; stage 1 comes from the shared global model)."""
    e1, e2, e3, e4 = base.epochs
    cfg = dataclasses.replace(base, **{"scales": 5, "pool_layer": "softmax", **changes}, start_stage="regional")
    if kind == "regional":
        cfg.epochs = [0, e2 + e4, 0, 0]
    elif kind == "multilabel":
        cfg.epochs, cfg.lambda_schedule, cfg.lambda_start = [0, e2, 0, e4], "constant", 0.0
    else:
        cfg.epochs = [0, e2, e3, e4]
    return cfg


def run_ablation(base: TrainConfig, train_dir: Path, val_dir: Path, out: Path,
                 rows: list[str] | None = None) -> dict[str, dict]:
    """Train and evaluate the global baseline and `rows` (default all); returns name -> result
    {"mAP", "ap" (per class), "run_id"} and writes the tables to `out` (markdown)."""
    rows = list(ROWS) if rows is None else rows
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown ablation rows {sorted(unknown)}: expected some of {list(ROWS)}")
    names = shards.class_names(train_dir)
    if names != shards.class_names(val_dir):
        raise ValueError(f"{train_dir} and {val_dir} have different class lists")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    uri = resolve_tracking_uri(base.tracking_uri)
    done_file = out.with_name(out.name + ".rows.json")
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if "parent_run_id" not in done:
        done["parent_run_id"] = start_run(uri, base.experiment, f"ablation {out.stem}", base.flat(),
                                          {"kind": "ablation", "git_commit": git_commit(), "dataset": base.dataset})
        write_json(done_file, done)
    parent = done["parent_run_id"]
    results = done.setdefault("rows", {})

    global_weights = out.with_name(out.name + ".global.pt")
    if GLOBAL not in results or not global_weights.is_file():
        cfg = dataclasses.replace(base, epochs=[base.epochs[0], 0, 0, 0], gate="none")
        model = RGNN(model_config(cfg, len(names))).to(device)
        results[GLOBAL] = _train_row(GLOBAL, cfg, model, names, train_dir, val_dir, device, uri, parent)
        torch.save({k: v for k, v in model.state_dict().items() if k.startswith(("backbone.", "fc8."))}, global_weights)
        write_json(done_file, done)
    start = torch.load(global_weights, map_location="cpu")
    for name in rows:
        if name in results:
            continue
        cfg = row_config(base, *ROWS[name])
        model = RGNN(model_config(cfg, len(names)))
        model.load_state_dict(start, strict=False)  # backbone and fc8; the head and gates are new
        results[name] = _train_row(name, cfg, model.to(device), names, train_dir, val_dir, device, uri, parent)
        write_json(done_file, done)

    order = [GLOBAL] + [r for r in ROWS if r in results]
    out.write_text(ablation_markdown({n: results[n] for n in order}, names))
    log = RunLogger(uri, parent)
    log.artifact(out)
    for i, n in enumerate(order):
        log.metric("ablation/mAP", results[n]["mAP"], i)
    log.flush()
    log.client.set_terminated(parent, "FINISHED")
    return {n: results[n] for n in order}


def _train_row(name: str, cfg: TrainConfig, model: RGNN, names: list[str], train_dir: Path, val_dir: Path,
               device: torch.device, uri: str, parent: str) -> dict:
    run_id = start_run(uri, cfg.experiment, name, cfg.flat(),
                       {"mlflow.parentRunId": parent, "gate": cfg.gate, "backbone": cfg.backbone,
                        "dataset": cfg.dataset, "ablation_row": name})
    log = RunLogger(uri, run_id)
    print(f"== {name}", flush=True)
    _, result = run_stages(cfg, model, names, train_dir, val_dir, device, log=log)
    for n, a in zip(names, result["ap"]):
        if not np.isnan(a):
            log.metric(f"val/AP/{n}", a, 0)
    log.flush()
    log.client.set_terminated(run_id, "FINISHED")
    return {"mAP": result["mAP"], "ap": [float(a) for a in result["ap"]], "run_id": run_id}


def ablation_markdown(results: dict[str, dict], class_names: list[str]) -> str:
    """The summary table (row, gate, scales, pool layer, loss, mAP) and the per-class AP table."""
    lines = ["| row | gate | scales | pooled layer | loss | mAP (%) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == GLOBAL:
            desc = ("-", "-", "fc8 (whole image)", "eq. 6")
        else:
            changes, kind = ROWS[name]
            loss = {"regional": "eq. 6", "multilabel": "eq. 6", "multitask": "eq. 9"}[kind]
            desc = (changes["gate"], str(changes.get("scales", 5)), changes.get("pool_layer", "softmax"), loss)
        lines.append(f"| {name} | " + " | ".join(desc) + f" | {100 * r['mAP']:.1f} |")
    table = ap_table({n: np.array(r["ap"]) for n, r in results.items()}, class_names)
    return ("\n".join(lines) + "\n\nAP per class (%), area under the PR curve:\n\n" + to_markdown(table))


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    p.prog = "python -m rgnn.ablation"
    p.description = __doc__.split("\n\n")[0] + " Training flags set the base config of every row."
    p.add_argument("--out", default="ablation.md", help="markdown table to write (rows kept in <out>.rows.json)")
    p.add_argument("--rows", help=f"';'-separated subset of: {'; '.join(ROWS)} (default all)")
    args = vars(p.parse_args(argv))
    out, rows = Path(args.pop("out", "ablation.md")).resolve(), args.pop("rows", None)
    args.pop("summary", None)
    try:
        values = load_file(args.pop("config")) if "config" in args else {}
        base = resolve(TrainConfig(**{**values, **args}))
        from cluster.data import prepare_shards  # verifies --shards, or builds shards through sharding/ (Ray)

        train_dir, val_dir = prepare_shards(base, keep_ray=False)  # training here needs no Ray
        results = run_ablation(base, train_dir, val_dir, out, rows.split(";") if rows else None)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        sys.exit(f"error: {e}")
    print("\n" + out.read_text())
    print(f"table: {out}")
    return results


if __name__ == "__main__":
    main()
