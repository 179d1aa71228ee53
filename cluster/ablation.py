"""The paper's ablation: the rows of Table 1 and the pool-layer comparison of section 4.3, with seeds.

    python -m cluster.ablation [training flags: --shards / --coco-root / --voc-root / none] [--seeds N] [--jobs J]
                               [--out table.md]

Every row is trained and evaluated with plain PyTorch (rgnn.train.stages.run_stages, on a GPU when
there is one; Ray only builds missing shards), in this process or, with --jobs J, J rows at a time in
as many processes, and logged as an MLflow child run of one parent run. Every row runs once per seed;
the table gives the mean and the standard deviation over seeds. Stage 1 (global fine-tuning) does not depend on any row's setting, so it is trained
once per seed: its result is the global baseline row and its weights start every other row of
that seed. With E1..E4 the stage epochs:

- ungated rows: stage 2 for E2 + E4 epochs, the same number of classification epochs the gated
  rows get;
- "multi-label loss" rows: stage 2 for E2, then stage 4 for E4 with lambda = 0 (eq. 6 alone; the
  gates learn only through the classification loss, no stage 3);
- "multi-task loss" rows: stages 2, 3, 4 as in training (eq. 9, lambda decaying);
- in both, the classification loss trains the gate in stage 4 (`--gate-loss multitask`) whatever the
  base config says, so that each row is what its name says;
- pool-layer rows: fc6, fc7, fc8 or the softmax of fc8 pooled, ungated and region-gated with the
  multi-task loss (the softmax ones are the "multi-scale" and "region gate, multi-task loss" rows);
- the oracle row: ungated training and evaluation with every region's gate fixed to eq. 8's 0/1
  target (the ground truth at test time: a diagnostic bound on selection, not a model).
Gated rows report the gate ROC-AUC against eq. 8's target (mean over seeds).

Each finished (row, seed) is saved to `<out>.rows.json` at once; a rerun with the same --out skips it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cluster.data import prepare_shards
from rgnn.train.config import TrainConfig, build_parser, config_from_args, resolve
from rgnn.data import shards
from rgnn.nn.model import RGNN
from rgnn.io.checkpoint import STAGE1_KEYS, CheckpointPayload, check_classes, read_payload, write_payload
from rgnn.io.storage import write_json, write_text
from rgnn.tables import ap_table, to_markdown
from rgnn.tracking.runs import RunLogger, parent_run, resolve_tracking_uri, training_run
from rgnn.train.stages import Hooks, epoch_line, model_config, run_stages
from rgnn.cli import user_errors

# name -> (config changes, how it trains: "regional" | "multilabel" | "multitask")
ROWS = {
    "regional, single scale": (dict(gate="none", scales=1), "regional"),
    "regional, multi-scale": (dict(gate="none", scales=5), "regional"),
    "region gate, multi-label loss": (dict(gate="region"), "multilabel"),
    "region gate, multi-task loss": (dict(gate="region"), "multitask"),
    "feature gate, multi-label loss": (dict(gate="feature"), "multilabel"),
    "feature gate, multi-task loss": (dict(gate="feature"), "multitask"),
    **{f"ungated, pool {layer}": (dict(gate="none", pool_layer=layer), "regional") for layer in ("fc6", "fc7", "fc8")},
    # a diagnostic, not the paper's: region gates fixed to eq. 8's target from the ground truth (in
    # evaluation too): what perfect selection would give with this recognition
    "oracle gates (eq. 8 target)": (dict(gate="none", oracle_gates=True), "regional"),
    **{f"region gate, pool {layer}": (dict(gate="region", pool_layer=layer), "multitask")
       for layer in ("fc6", "fc7", "fc8")},
}
GLOBAL = "global baseline"
LOSS = {"regional": "eq. 6", "multilabel": "eq. 6", "multitask": "eq. 9"}


def row_config(base: TrainConfig, changes: dict, kind: str, seed: int) -> TrainConfig:
    """The TrainConfig of one row and seed (stages 2-4; stage 1 comes from the shared global model)."""
    e1, e2, e3, e4 = base.schedule.epochs
    epochs = {"regional": [0, e2 + e4, 0, 0], "multilabel": [0, e2, 0, e4], "multitask": [0, e2, e3, e4]}[kind]
    cfg = base.copy(**{"scales": 5, "pool_layer": "softmax", **changes}, start_stage="regional", epochs=epochs,
                    seed=seed)
    if kind == "multilabel":
        cfg.schedule.lambdas.family, cfg.schedule.lambdas.start = "constant", 0.0
    if kind != "regional":
        cfg.schedule.gate_loss = "multitask"  # the loss the row is named after trains the gate
    return cfg


def run_ablation(base: TrainConfig, train_dir: Path, val_dir: Path, out: Path, rows: list[str] | None = None,
                 seeds: int = 3, jobs: int = 1) -> dict[str, dict]:
    """Train and evaluate the global baseline and `rows` (default all), `seeds` times each, `jobs` at a time.

    Returns:
        name -> {"mAP" (mean over seeds), "std", "maps" (per seed), "ap" (per class, mean), "runs"};
        the tables go to `out` (markdown).
    """
    rows = list(ROWS) if rows is None else rows
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown ablation rows {sorted(unknown)}: expected some of {list(ROWS)}")
    if seeds < 1 or jobs < 1:
        raise ValueError(f"--seeds {seeds}, --jobs {jobs}: expected >= 1 each")
    names = shards.class_names(train_dir)
    if names != shards.class_names(val_dir):
        raise ValueError(f"{train_dir} and {val_dir} have different class lists")
    uri = resolve_tracking_uri(base.tracking.tracking_uri)
    done_file = out.with_name(out.name + ".rows.json")
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    results = done.setdefault("rows", {})
    first = base.schedule.seed
    with parent_run(uri, base.tracking.experiment, f"ablation {out.stem}", base.flat(),
                    {"kind": "ablation", "dataset": base.dataset}, done, lambda: write_json(done_file, done),
                    done_file) as log, _pool(jobs) as run:
        seed_range = range(first, first + seeds)
        weights = {s: out.with_name(f"{out.name}.global-seed{s}.pt") for s in seed_range}
        # stage 1 once per seed first: its weights start every other row of the seed
        phases = ([(GLOBAL, s) for s in seed_range if str(s) not in results.get(GLOBAL, {}) or not weights[s].is_file()],
                  [(n, s) for s in seed_range for n in rows if str(s) not in results.get(n, {})])
        for phase in phases:
            tasks = [Task(n, s, base, names, train_dir, val_dir, uri, log.run_id, weights[s]) for n, s in phase]
            for t, result in run(train_task, tasks):
                results.setdefault(t.name, {})[str(t.seed)] = result
                write_json(done_file, done)  # at once: a rerun skips it
        order = [GLOBAL] + [r for r in ROWS if r in rows]
        summary = {n: _summarise(results[n], range(first, first + seeds)) for n in order}
        write_text(out, ablation_markdown(summary, names))
        log.artifact(out)
        for i, n in enumerate(order):
            log.metric("ablation/mAP", summary[n]["mAP"], i)
    return summary


@dataclass(frozen=True)
class Task:
    """One (row, seed) of the ablation: what a process needs to train and evaluate it."""

    name: str
    seed: int
    base: TrainConfig
    names: list[str]
    train_dir: Path
    val_dir: Path
    uri: str
    parent: str  # the MLflow parent run
    global_weights: Path  # the seed's stage-1 model: written by the global row, read by the others


def train_task(t: Task) -> dict:
    """Train and evaluate one row of one seed (the global row writes its weights to `t.global_weights`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    global_cfg = t.base.copy(epochs=[t.base.schedule.epochs[0], 0, 0, 0], gate="none", seed=t.seed)
    global_model = model_config(global_cfg, len(t.names))
    if t.name == GLOBAL:
        torch.manual_seed(t.seed)
        model = RGNN(global_model).to(device)
        result = _train_row(t, global_cfg, model, device)
        write_payload(t.global_weights, CheckpointPayload.of(model, t.names, "global"))
        return result
    # a file of an earlier version may hold the stage-1 weights alone: `fill` says what they are
    stage1 = read_payload(t.global_weights, fill={"model_config": dataclasses.asdict(global_model),
                                                  "class_names": t.names})
    check_classes(stage1.class_names, t.names, str(t.global_weights))
    cfg = row_config(t.base, *ROWS[t.name], t.seed)
    torch.manual_seed(t.seed)
    model = RGNN(model_config(cfg, len(t.names)))
    # backbone and fc8; the head and gates are new
    model.load_state_dict({k: v for k, v in stage1.model.items() if k.startswith(STAGE1_KEYS)}, strict=False)
    return _train_row(t, cfg, model.to(device), device)


@contextmanager
def _pool(jobs: int) -> Iterator[Callable]:
    """run(f, tasks) -> (task, f(task)) as each finishes: in this process for 1 job, else in `jobs` processes
    sharing the cores (one thread each where there are as many cores as jobs). On a failure or Ctrl+C the
    rows still training stop with it, and those not started never start."""
    if jobs == 1:
        yield lambda f, tasks: ((t, f(t)) for t in tasks)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    pool = multiprocessing.get_context("spawn").Pool(jobs, torch.set_num_threads, (threads,))
    try:
        yield lambda f, tasks: pool.imap_unordered(_paired, [(f, t) for t in tasks])
    finally:
        pool.terminate()
        pool.join()


def _paired(call: tuple[Callable, Task]) -> tuple[Task, dict]:
    f, task = call
    return task, f(task)


def _summarise(by_seed: dict[str, dict], seeds) -> dict:
    runs = [by_seed[str(s)] for s in seeds]
    maps = [r["mAP"] for r in runs]
    aucs = [r.get("gate_auc") for r in runs]
    return {"mAP": float(np.mean(maps)), "std": float(np.std(maps, ddof=1)) if len(maps) > 1 else float("nan"),
            "maps": maps, "ap": np.mean([r["ap"] for r in runs], axis=0).tolist(), "runs": runs,
            "gate_auc": float(np.mean(aucs)) if all(a is not None for a in aucs) else None}


def _train_row(t: Task, cfg: TrainConfig, model: RGNN, device: torch.device) -> dict:
    tags = {"mlflow.parentRunId": t.parent, "gate": cfg.model.gate, "backbone": cfg.model.backbone,
            "dataset": cfg.dataset, "ablation_row": t.name, "seed": t.seed}
    with training_run(t.uri, cfg.tracking.experiment, f"{t.name} (seed {t.seed})", cfg.flat(), tags) as run_id:
        log = RunLogger(t.uri, run_id)
        print(f"== {t.name} (seed {t.seed})", flush=True)

        def on_warning(message: str) -> None:
            print(message, flush=True)
            log.tag("warning", "loss_not_falling")

        def on_epoch(state, metrics: dict, result: dict | None) -> None:
            log.epoch(state, metrics, result)
            print(f"{t.name} (seed {t.seed}) " + epoch_line(metrics, result), flush=True)

        hooks = Hooks(on_step=log.step, on_epoch=on_epoch, on_warning=on_warning)
        _, result = run_stages(cfg, model, t.names, t.train_dir, t.val_dir, device, hooks=hooks)
        log.class_aps(t.names, result["ap"])
        log.flush()
    return {"mAP": result["mAP"], "ap": [float(a) for a in result["ap"]], "run_id": run_id,
            "gate_auc": result.get("gate_auc")}


def ablation_markdown(results: dict[str, dict], class_names: list[str]) -> str:
    """The summary table (row, gate, scales, pool layer, loss, mAP mean +- std over seeds) and the
    per-class AP table (means)."""
    seeds = len(next(iter(results.values()))["maps"])
    lines = [f"| row | gate | scales | pooled layer | loss | mAP (%), mean +- std over {seeds} seed(s) | per seed | gate AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == GLOBAL:
            desc = ("-", "-", "fc8 (whole image)", "eq. 6")
        else:
            changes, kind = ROWS[name]
            gate = "oracle (eq. 8)" if changes.get("oracle_gates") else changes["gate"]
            desc = (gate, str(changes.get("scales", 5)), changes.get("pool_layer", "softmax"), LOSS[kind])
        spread = "" if np.isnan(r["std"]) else f" +- {100 * r['std']:.1f}"
        per_seed = ", ".join(f"{100 * m:.1f}" for m in r["maps"])
        auc = "-" if r["gate_auc"] is None else f"{r['gate_auc']:.3f}"
        lines.append(f"| {name} | " + " | ".join(desc) + f" | {100 * r['mAP']:.1f}{spread} | {per_seed} | {auc} |")
    table = ap_table({n: np.array(r["ap"]) for n, r in results.items()}, class_names)
    return ("\n".join(lines) + "\n\nAP per class (%, mean over seeds), area under the PR curve:\n\n" + to_markdown(table))


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    p.prog = "python -m cluster.ablation"
    p.description = __doc__.split("\n\n")[0] + " Training flags set the base config of every row."
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--out", default="ablation.md", help="markdown table to write (rows kept in <out>.rows.json)")
    p.add_argument("--rows", help=f"';'-separated subset of: {'; '.join(ROWS)} (default all)")
    p.add_argument("--seeds", type=int, default=3, help="runs of every row, seeds --seed, --seed + 1, ...")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows trained at once, each in its own process with its share of the CPU threads")
    args = vars(p.parse_args(argv))
    out, rows, seeds = Path(args.pop("out", "ablation.md")).resolve(), args.pop("rows", None), args.pop("seeds", 3)
    jobs = args.pop("jobs", 1)
    args.pop("summary", None)
    with user_errors():
        base = resolve(config_from_args(args))
        # verifies --shards, or builds shards through sharding/ on Ray; training here needs no Ray
        train_dir, val_dir = prepare_shards(base.data, base.input, base.schedule.seed, keep_ray=False)
        results = run_ablation(base, train_dir, val_dir, out, rows.split(";") if rows else None, seeds, jobs)
    print("\n" + out.read_text())
    print(f"table: {out}")
    return results


if __name__ == "__main__":
    main()
