"""The search space: TrainConfig settings -> distributions, as data (JSON/YAML) turned into Ray Tune's.

A space file maps a setting by its flat name (as in config files), or `lr_<stage>` for one stage's learning rate) to one of
    {"loguniform": [low, high]}, {"uniform": [low, high]}, {"choice": [a, b, ...]},
    {"grid": [a, b, ...]}, or a plain value (held fixed).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from ray import tune

from rgnn.train.config import FLAT_NAMES, TRAINABLE_SETTINGS, TrainConfig, resolve, setting_type
from rgnn.train.schedule import LAMBDA_FAMILIES, STAGES

# Section 4.2 fixes lambda going "slowly" from 1 to 0 and one learning rate; these are the open choices.
DEFAULT_SPACE = {
    "lr_joint": {"loguniform": [1e-5, 3e-3]},
    "lambda_schedule": {"choice": list(LAMBDA_FAMILIES)},
    "lambda_start": {"uniform": [0.5, 2.0]},
    "lambda_rate": {"uniform": [2.0, 8.0]},
}
# Keys that change only stage 4: a search over these alone can share stages 1-3 between trials.
JOINT_ONLY = {"lr_joint", "lambda_schedule", "lambda_start", "lambda_end", "lambda_rate", "lambda_steps"}
GRID_POINTS = 3


def load_space(path: str | Path | None, base: TrainConfig | None = None) -> dict:
    """The default space, or a space file checked completely (see `check_space`)."""
    if path is None:
        return dict(DEFAULT_SPACE)
    try:
        space = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"search space file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid JSON/YAML: {e}") from None
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{path}: expected a non-empty mapping of setting -> distribution")
    check_space(space, str(path), base)
    return space


def check_space(space: dict, where: str = "search space", base: TrainConfig | None = None) -> None:
    """Every key a setting, every distribution well formed, and (with `base`) every value one the
    training accepts: each choice and each range's ends set on `base` and checked by rgnn.train.config."""
    searchable = set(TRAINABLE_SETTINGS) | {f"lr_{s}" for s in STAGES}
    for key, spec in space.items():
        if key not in searchable:
            if key in FLAT_NAMES:  # a trial's name, storage or tracking would make trials share (and replay) runs
                raise ValueError(f"{where}: {key!r} is not a trainable setting: a search varies only what a trial "
                                 f"trains (model, input, augmentation and schedule settings, lr_<stage>)")
            raise ValueError(f"{where}: unknown setting {key!r}")
        if not isinstance(spec, dict):
            values = [spec]
        elif len(spec) != 1 or next(iter(spec)) not in ("loguniform", "uniform", "choice", "grid"):
            raise ValueError(f"{where}: {key}: expected one of loguniform/uniform/choice/grid, got {spec}")
        else:
            (kind, values), = spec.items()
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}: {key}: {kind} takes a non-empty list, got {values!r}")
            if kind in ("uniform", "loguniform"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                        or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
                    raise ValueError(f"{where}: {key}: {kind} takes [low, high] numbers with low < high"
                                     f"{' and low > 0' if kind == 'loguniform' else ''}, got {values!r}")
                if not key.startswith("lr_") and "float" not in setting_type(key):
                    raise ValueError(f"{where}: {key} is an integer setting ({setting_type(key)}): {kind} samples "
                                     f"floats; give its values with choice or grid")
        if not key.startswith("lr_") and setting_type(key) in ("int", "int | None"):
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
            if bad:  # resolve() would take 2.5 and every trial would fail in its workers
                raise ValueError(f"{where}: {key} is an integer setting, got {bad[0]!r}")
        if base is not None:
            for value in values:
                try:
                    resolve(apply(base.copy(), {key: value}))
                except (ValueError, TypeError, AttributeError) as e:
                    raise ValueError(f"{where}: {key} = {value!r} is not a valid setting: {e}") from None


def to_tune(space: dict, search: str) -> dict:
    """Our space -> Ray Tune's param_space. With search="grid" every entry becomes a grid
    (continuous ranges: GRID_POINTS points, geometric for loguniform)."""
    out = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        (kind, arg), = spec.items()
        if search == "grid":
            if kind in ("uniform", "loguniform"):
                lo, hi = arg
                ts = [i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
                arg = [lo * (hi / lo) ** t if kind == "loguniform" else lo + (hi - lo) * t for t in ts]
            out[key] = tune.grid_search(list(arg))
        else:
            out[key] = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                        "choice": tune.choice, "grid": tune.grid_search}[kind](list(arg))
    return out


def apply(cfg: TrainConfig, params: dict) -> TrainConfig:
    """Set a trial's sampled values on a TrainConfig (`lr_<stage>` goes into stage_lr)."""
    for key, value in params.items():
        if key.startswith("lr_"):
            cfg.schedule.stage_lr = {**cfg.schedule.stage_lr, key[3:]: float(value)}
        else:
            cfg.set(key, value)
    return cfg


def shares_stages(space: dict) -> bool:
    return set(space) <= JOINT_ONLY
