"""Search lambda schedules and learning rates with Ray Tune: `python tune/search.py [flags]`.

Every trial is a training run of cluster/driver.py's `fit` (Ray Train DDP inside the trial)
and a nested MLflow run under one parent run per search, so the MLflow UI's compare view lines
trials up. ASHA stops weak trials early on `val/mAP`, reported after every epoch of the joint
stage. When the space touches only stage-4 settings (the default: lr, lambda schedule family
and parameters), stages 1-3 run once and every trial starts stage 4 from that checkpoint.
The best trial's full config goes to OUT/best_config.json, which `train_coco.py --config` takes.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from cluster.data import prepare_shards
from cluster.driver import fit, mlflow_run_id, resolve_storage
from sharding.ray_setup import init_ray
from rgnn.io import storage
from rgnn.io.redaction import redact
from rgnn.train.config import TrainConfig, build_parser, config_from_args, resolve
from rgnn.io.storage import write_json
from rgnn.tracking.runs import (child_runs, mark_stopped_early, metric_history, parent_run, resolve_tracking_uri,
                                run_status)
from tune.plots import plot_trials
from tune.space import apply, load_space, shares_stages, to_tune

METRIC = "val/mAP"
STATE_FILE = "search_state.json"
# What a trial's config must not carry into best_config.json: run bookkeeping, not settings.
RUNTIME_FIELDS = ("name", "resume", "start_stage", "init_checkpoint", "eval_every_epoch")


def build_search_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "tune/search.py"
    p.description = __doc__.split("\n\n")[0] + " Training flags set the base config of every trial."
    s = p.add_argument_group("search")
    s.add_argument("--space", help="JSON/YAML search space (replaces the default lr + lambda space)")
    s.add_argument("--search", choices=("random", "grid", "optuna"), default="random",
                   help="random sampling, a grid, or Optuna's TPE (pip install -e '.[optuna]')")
    s.add_argument("--trials", type=int, help="trials to sample, with grid: repeats of the grid (default 8; smoke test 4)")
    s.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    s.add_argument("--no-share-stages", action="store_true",
                   help="run stages 1-3 in every trial even when the space allows sharing them")
    s.add_argument("--out", default="tune_results", help="folder for best_config.json, the plot and Tune's state")
    s.set_defaults(workers=1)
    return p


def run_trial(params: dict, base: dict, shard_dirs: tuple[str, str], parent_run_id: str,
              init_checkpoint: str | None, storage_path: str) -> None:
    """One Tune trial: one training run reporting to Tune every epoch (storage_path: a folder or URI)."""
    trial_id = tune.get_context().get_trial_id()
    cfg = apply(TrainConfig.from_flat(base, name=f"trial-{trial_id}", storage=storage_path, eval_every_epoch=True),
                params)
    if replay_finished(storage.join(storage_path, cfg.cluster.name), base["tracking_uri"]):
        return
    if init_checkpoint:
        cfg.cluster.start_stage, cfg.cluster.init_checkpoint = "joint", init_checkpoint
    fit(resolve(cfg), shard_dirs=tuple(storage.location(d) for d in shard_dirs), callbacks=[TuneReportCallback()],
        parent=parent_run_id, label=f"trial {trial_id}")


def replay_finished(run_dir: str | Path, tracking_uri: str) -> bool:
    """Report again, without training, the epochs of a trial whose training already finished.

    A trial that finished just before a Ctrl+C can be missing from the state Tune saved, and
    `--resume` then starts it again; fit() marks its MLflow run FINISHED only when every epoch
    ran, so that run's val mAP history (one point per epoch, eval_every_epoch) is the trial's reports.
    """
    run_id = mlflow_run_id(run_dir)
    if run_id is None:
        return False
    if run_status(tracking_uri, run_id) != "FINISHED":
        return False
    history = metric_history(tracking_uri, run_id, METRIC)  # a restarted epoch logs twice
    for step in sorted(history):
        tune.report({METRIC: history[step], "replayed": True})
    return True


def _searcher(kind: str):
    if kind != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise SystemExit("--search optuna needs Optuna: pip install -e '.[optuna]'") from None
    return OptunaSearch()


def main(argv: list[str] | None = None) -> dict:
    args = vars(build_search_parser().parse_args(argv))
    search_keys = ("space", "search", "trials", "max_concurrent", "no_share_stages", "out")
    opts = {k: args.pop(k, None) for k in search_keys}  # the parser suppresses unset flags
    args.pop("summary", None)
    resume = args.pop("resume", False)  # here: restore the search, not one training run
    base = config_from_args(args)
    opts["trials"] = opts["trials"] or (4 if base.smoke_test else 8)
    base = resolve(base)
    base.tracking.tracking_uri = resolve_tracking_uri(base.tracking.tracking_uri)
    space = load_space(opts["space"], base)  # every value checked before any shard, run or trial
    share = shares_stages(space) and not opts["no_share_stages"]
    out = Path(opts["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage_path = resolve_storage(base.cluster.storage)
    state_file = out / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if resume and not state:
        raise SystemExit(f"--resume: no search to resume in {out}")

    init_ray()
    shard_dirs = tuple(str(d) for d in prepare_shards(base.data, base.input, base.schedule.seed))
    params = {**base.flat(), "search": opts["search"], "trials": str(opts["trials"]), "space": json.dumps(space),
              "share_stages": str(share)}
    with parent_run(base.tracking.tracking_uri, base.tracking.experiment, f"search {out.name}", params,
                    {"kind": "search", "dataset": base.dataset}, state, lambda: write_json(state_file, state),
                    state_file) as log:
        init_checkpoint = _shared_stages(base, shard_dirs, out, state, state_file, log.run_id) if share else None
        trainable = tune.with_parameters(run_trial, base=base.to_flat(), shard_dirs=shard_dirs, parent_run_id=log.run_id,
                                         init_checkpoint=init_checkpoint,
                                         storage_path=str(storage.join(storage_path, "trials")))
        # The trial's driver function only waits on its TorchTrainer, whose DDP workers reserve the
        # CPUs/GPUs; Tune refuses an empty request, so the driver takes a token share of a CPU.
        trainable = tune.with_resources(trainable, {"CPU": 0.01})
        # a trial reports once per epoch; ASHA's horizon lies past the last report so that a trial
        # that is not stopped early ends by itself (and closes its MLflow run as FINISHED)
        reports = base.schedule.epochs[3] if share else sum(base.schedule.epochs)
        tune_dir = out / "ray_tune"
        param_space = to_tune(space, opts["search"])
        expected = opts["trials"] * math.prod(len(v["grid_search"]) for v in param_space.values()
                                              if isinstance(v, dict) and "grid_search" in v)
        grid = _tuner(trainable, param_space, opts, reports, tune_dir, resume).fit()
        if len(grid) < expected or grid.num_terminated + grid.num_errors < len(grid):  # Ctrl+C: Tune saved its state
            raise SystemExit(f"search interrupted; continue it with the same command and --resume (state in {out})")
        return finish(grid, base, space, out, log)


def _shared_stages(base: TrainConfig, shard_dirs: tuple[str, str], out: Path, state: dict, state_file: Path,
                   parent: str) -> str:
    """The checkpoint of stages 1-3 trained once (or found in the search's state) for every trial's stage 4."""
    if "shared_checkpoint" not in state:
        shared = resolve(base.copy(epochs=base.schedule.epochs[:3] + [0], name=f"{out.name}-stages-1-3"))
        summary = fit(shared, shard_dirs=tuple(storage.location(d) for d in shard_dirs), parent=parent,
                      label="stages 1-3 (shared)")
        state["shared_checkpoint"] = summary["checkpoint"]
        write_json(state_file, state)
    return state["shared_checkpoint"]


def _tuner(trainable, param_space: dict, opts: dict, reports: int, tune_dir: Path, resume: bool) -> tune.Tuner:
    """The search's Tuner, restored from tune_dir with --resume where Tune saved one."""
    if resume and tune.Tuner.can_restore(str(tune_dir / "search")):
        return tune.Tuner.restore(str(tune_dir / "search"), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=opts["trials"], max_concurrent_trials=opts["max_concurrent"],
            search_alg=_searcher(opts["search"]),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=reports + 1, grace_period=1,
                                    reduction_factor=2)),
        run_config=tune.RunConfig(name="search", storage_path=str(tune_dir)))


def _close_trial_runs(uri: str, grid, parent: str) -> None:
    """A trial that ASHA stops is killed inside its training, leaving its MLflow run RUNNING or
    FAILED (fit() marks a run FINISHED only when every epoch ran): mark those KILLED."""
    runs = {r.info.run_name: r for r in child_runs(uri, parent)}
    for result in grid:
        run = runs.get(f"trial {result.metrics.get('trial_id')}") if result.metrics else None
        if run is None or result.error is not None or run.info.status == "FINISHED":
            continue
        mark_stopped_early(uri, run.info.run_id)


def finish(grid, base: TrainConfig, space: dict, out: Path, log) -> dict:
    """best_config.json, the mAP vs lr / lambda schedule plot, both on the parent run (`log`)."""
    rows = []
    for r in grid:
        if r.metrics and METRIC in r.metrics:
            params = {k: r.config[k] for k in space if k in r.config}
            rows.append({"params": params, "val_map": float(r.metrics[METRIC])})
    if not rows:
        raise SystemExit(f"no trial reported {METRIC}; see the errors above and in {out / 'ray_tune'}")
    best = max(rows, key=lambda r: r["val_map"])
    best_cfg = apply(base.copy(), best["params"]).to_flat(redacted=True)
    for k in RUNTIME_FIELDS:
        best_cfg.pop(k)
    write_json(out / "best_config.json", best_cfg)
    write_json(out / "trials.json", rows)
    plot_trials(rows, out / "map_vs_lr.png")
    _close_trial_runs(log.uri, grid, log.run_id)
    for name in ("best_config.json", "trials.json", "map_vs_lr.png"):
        log.artifact(out / name)
    log.metric("best/val_mAP", best["val_map"], 0)
    print(f"\n{len(rows)} trials; best val mAP {best['val_map']:.4f} with {best['params']}")
    print(f"best config: {out / 'best_config.json'}  (python cluster/train_coco.py --config {out / 'best_config.json'})")
    uri = redact(base.tracking.tracking_uri)
    print(f"MLflow parent run {log.run_id} at {uri}: mlflow ui --backend-store-uri {uri}")
    return {"parent_run_id": log.run_id, "best": best, "trials": rows}


if __name__ == "__main__":
    main()
