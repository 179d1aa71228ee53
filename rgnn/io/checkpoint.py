"""The checkpoint format shared by training, prediction and evaluation.

A checkpoint is a folder with `checkpoint.pt` (one CheckpointPayload: model state, model config,
class names, the stage it was last trained in, and for training: epoch, optimiser, EMA, lambda
schedule, mAPs so far) and `config.json` (the resolved training config as flat settings, readable
without torch). The folder is a local path or an object-store URI (rgnn.io.storage); files are written
whole or not at all (rgnn.io.storage.atomic_write). This module alone writes and reads the payload;
it also reads the forms written before the payload had one shape (CheckpointPayload.from_dict).

A checkpoint is untrusted input (it may come from shared storage, an object store or an MLflow server): it is
loaded with `weights_only=True`, so a pickle that would run code is refused, never executed, and a
payload of the wrong shape is refused with a ValueError naming the file.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from rgnn.io import storage
from rgnn.nn.model import RGNN, STAGES, ModelConfig
from rgnn.io.storage import atomic_write, write_json

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
CACHE = Path.home() / ".cache" / "rgnn"  # where checkpoints named by a URI are downloaded
MAX_CHECKPOINT_BYTES = 16 << 30  # a checkpoint.pt downloaded from an object store (VGG-16 + Adam state: ~1.7 GB)
MAX_CONFIG_BYTES = 16 << 20
FORMAT = 2  # the payload's `format`; the forms before it carry none
STAGE1_KEYS = ("backbone.", "fc8.")  # what stage 1 trains that the regional path reuses (cluster.ablation)


@dataclass
class CheckpointPayload:
    """What `checkpoint.pt` holds: a model, what it is, and where its training stood.

    Attributes:
        model: the RGNN's state_dict.
        model_config: `dataclasses.asdict` of its ModelConfig.
        class_names: the C classes, in the order of the logits.
        stage: the stage of section 4.2 it was last trained in (STAGES); prediction runs that stage's model.
        epoch: finished epochs of `stage` (0 in a finished training's final model).
        global_step, maps, optimizer, ema, last_map: the training's steps so far, val mAP per stage, the
            optimiser's and the EMA's state_dict (None outside a stage), the last val mAP (rgnn.train.stages.TrainState).
        lambda_schedule: `dataclasses.asdict` of the run's LambdaSchedule (rgnn.train.schedule), or None.
    """

    model: dict[str, torch.Tensor]
    model_config: dict
    class_names: list[str]
    stage: str
    epoch: int = 0
    global_step: int = 0
    maps: dict[str, float] = field(default_factory=dict)
    optimizer: dict | None = None
    ema: dict | None = None
    last_map: float = float("nan")
    lambda_schedule: dict | None = None

    @classmethod
    def of(cls, model: RGNN, class_names: list[str], stage: str, **training) -> CheckpointPayload:
        """The payload of a bare (not DDP-wrapped) `model`; `training`: the optional fields (epoch, optimizer, ...)."""
        return cls(model.state_dict(), asdict(model.cfg), list(class_names), stage, **training)

    def to_dict(self) -> dict:
        """What torch.save writes: plain containers and tensors (the fields, not copied, and `format`)."""
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, raw, where: str, fill: dict | None = None) -> CheckpointPayload:
        """The payload of a loaded checkpoint file `where` (named in errors), this form or an older one:

        - a final model as rgnn.tracking.artifacts saved it: model, model_config, class_names, stage;
        - a training checkpoint as cluster.loop saved it: model, model_config, class_names, lambda_schedule,
          and the stage inside `state` with the epoch, optimiser, EMA and mAPs;
        - stage-1 weights alone as cluster.ablation saved them (the backbone's and fc8's state_dict):
          stage "global", with `fill` giving the model_config and class_names the file lacks.

        Raises:
            ValueError: not a dict of one of these forms, a field of the wrong type, an unknown stage.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"{where} is not an RGNN checkpoint: expected a dict, got {type(raw).__name__}")
        raw = _upgrade(raw, where, fill)
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("model", "model_config", "class_names", "stage") if n not in raw]
        if missing:
            raise ValueError(f"{where} is not an RGNN checkpoint: it has no {', '.join(missing)} "
                             f"(expected a dict with model, model_config, class_names, stage)")
        unknown = sorted(map(str, set(raw) - names))
        if unknown:
            raise ValueError(f"{where} is not an RGNN checkpoint: unknown entries {unknown}")
        payload = cls(**raw)
        payload.check(where)
        if isinstance(payload.last_map, int):
            payload.last_map = float(payload.last_map)
        return payload

    def check(self, where: str) -> None:
        """Every field of its type and the stage one of STAGES, else a ValueError naming `where`."""
        def expect(ok: bool, name: str, what: str) -> None:
            if not ok:
                value = getattr(self, name)
                shown = type(value).__name__ if isinstance(value, (dict, list, tuple, torch.Tensor)) else repr(value)
                raise ValueError(f"{where} is not an RGNN checkpoint: {name} should be {what}, got {shown[:80]}")

        expect(_str_keys(self.model) and all(isinstance(v, torch.Tensor) for v in self.model.values()),
               "model", "a state_dict (names -> tensors)")
        expect(_str_keys(self.model_config), "model_config", "a dict of ModelConfig fields")
        expect(isinstance(self.class_names, list) and all(isinstance(c, str) for c in self.class_names),
               "class_names", "a list of strings")
        expect(isinstance(self.stage, str) and self.stage in STAGES, "stage", f"one of {STAGES}")
        num_classes = self.model_config.get("num_classes")
        if num_classes != len(self.class_names):
            raise ValueError(f"{where} is not an RGNN checkpoint: {len(self.class_names)} class_names for the "
                             f"model_config's num_classes {num_classes!r}")
        for name in ("epoch", "global_step"):
            value = getattr(self, name)
            expect(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "an int >= 0")
        expect(_str_keys(self.maps) and all(_real(v) for v in self.maps.values()), "maps", "stage -> mAP")
        for name in ("optimizer", "ema", "lambda_schedule"):
            value = getattr(self, name)
            expect(value is None or _str_keys(value), name, "None or a dict")
        expect(_real(self.last_map), "last_map", "a number")


def _str_keys(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _upgrade(raw: dict, where: str, fill: dict | None) -> dict:
    """`raw` as this FORMAT's fields (see CheckpointPayload.from_dict), not yet checked."""
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise ValueError(f"{where} is not an RGNN checkpoint this code reads: format {raw['format']!r} "
                             f"(it reads format {FORMAT} and the older forms without one)")
        return {k: v for k, v in raw.items() if k != "format"}
    if "model" not in raw and raw and all(isinstance(k, str) and k.startswith(STAGE1_KEYS) and
                                          isinstance(v, torch.Tensor) for k, v in raw.items()):
        if fill is None:
            raise ValueError(f"{where} holds stage-1 weights alone (cluster.ablation's old form), without the "
                             "model config and class names of a checkpoint")
        return {"model": raw, **fill, "stage": "global"}
    if "state" in raw:
        state = raw["state"]
        if not _str_keys(state) or "stage" in raw or set(state) & set(raw):
            raise ValueError(f"{where} is not an RGNN checkpoint: its `state` should be a dict of the "
                             "training state beside (not repeating) the model's entries")
        return {**{k: v for k, v in raw.items() if k != "state"}, **state}
    return dict(raw)


def write_payload(file: str | Path, payload: CheckpointPayload) -> None:
    """Write `payload` (checked first) to the checkpoint file `file`, a local path or a URI, whole or not at all."""
    payload.check(str(file))
    atomic_write(file, lambda f: torch.save(payload.to_dict(), f))


def save_checkpoint(folder: str | Path, model: RGNN, class_names: list[str], config: dict | None = None, *,
                    stage: str, **training) -> Path | str:
    """Write `folder/checkpoint.pt` (+ `config.json`); returns the folder (a local path or a URI).

    Args:
        model: the bare RGNN (not DDP-wrapped).
        config: the resolved training config (saved beside the weights).
        stage: the stage it was last trained in.
        training: the optional fields of CheckpointPayload (epoch, optimizer, ema, lambda_schedule, ...).
    """
    write_payload(storage.join(folder, CHECKPOINT_FILE), CheckpointPayload.of(model, class_names, stage, **training))
    write_json(storage.join(folder, CONFIG_FILE), config or {})
    return storage.location(folder)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, its checkpoint.pt, an object-store URI of either (`s3://bucket/run/checkpoint_000003`),
    or an MLflow URI (`models:/<name>/<version>`, `runs:/<id>/model`: an MLflow Model of rgnn.tracking.pyfunc,
    or a checkpoint folder logged as artifacts) -> the local .pt file.

    A URI is downloaded into one folder per URI under ~/.cache/rgnn (`mlflow/`, `remote/`), so repeated
    use neither re-downloads into new temp folders nor leaks them. From an object store the .pt and the
    config.json beside it are fetched, at most MAX_CHECKPOINT_BYTES, and fetched again only when changed.

    Raises:
        FileNotFoundError: no checkpoint there (the message names it); PermissionError / ConnectionError:
            the store refuses or does not answer; ValueError: an object over MAX_CHECKPOINT_BYTES.
    """
    text = str(path)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        from rgnn.tracking import models  # MLflow, only for an MLflow URI or Model

        p = models.download(text, CACHE / "mlflow")
    elif storage.is_uri(text):
        return _fetch_checkpoint(text)
    else:
        p = Path(text)
    if (p / "MLmodel").is_file():
        from rgnn.tracking import models

        p = models.model_checkpoint(p)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def _fetch_checkpoint(uri: str) -> Path:
    """The object-store checkpoint `uri` (its .pt or its folder) in the local cache (see resolve_checkpoint)."""
    file = uri if storage.isfile(uri) else storage.join(uri, CHECKPOINT_FILE)
    dst = CACHE / "remote" / hashlib.sha1(str(file).encode()).hexdigest()[:16]
    try:
        local = storage.fetch(file, dst / CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {e}") from None
    config = storage.join(storage.parent(file), CONFIG_FILE)
    if storage.isfile(config):  # the training's input settings, read by rgnn.infer.predict
        storage.fetch(config, dst / CONFIG_FILE, MAX_CONFIG_BYTES)
    else:
        (dst / CONFIG_FILE).unlink(missing_ok=True)
    return local


def read_payload(file: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                 fill: dict | None = None) -> CheckpointPayload:
    """The payload of the local checkpoint file `file`, loaded as data only (weights_only: no code runs).

    Args:
        fill: for the old bare stage-1 form, the model_config and class_names it lacks (CheckpointPayload.from_dict).

    Raises:
        ValueError: not a safe or not a readable checkpoint, or a payload of the wrong shape (the message names `file`).
    """
    try:
        raw = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what weights_only refuses: a class or call it does not allow
        what = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "")
        raise ValueError(f"{file} is not a safe RGNN checkpoint: it holds objects other than tensors and "
                         f"plain containers, and nothing in it was run. {what}".rstrip()) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file} is not an RGNN checkpoint: {e!r}") from None
    return CheckpointPayload.from_dict(raw, str(file), fill)


def read_checkpoint(path: str | Path) -> CheckpointPayload:
    """The payload of a checkpoint (folder, .pt, object-store or MLflow URI) on the CPU, without building a model."""
    return read_payload(resolve_checkpoint(path))


def checkpoint_classes(path: str | Path) -> list[str]:
    """The class names of a checkpoint, without loading its weights into memory."""
    return read_payload(resolve_checkpoint(path), mmap=True).class_names


def check_classes(ckpt_classes: list[str], data_classes: list[str], where: str) -> None:
    """A class list that differs between checkpoint and data is an error, not a silent mismatch."""
    if list(ckpt_classes) != list(data_classes):
        raise ValueError(f"{where}: its {len(ckpt_classes)} classes {list(ckpt_classes)[:4]}... differ from "
                         f"the data's {len(data_classes)} classes {list(data_classes)[:4]}...")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[RGNN, CheckpointPayload]:
    """Rebuild the RGNN of a checkpoint; returns (model in eval mode, its payload).

    The model_config is built first on the meta device (no memory), and every tensor it implies must be
    in the weights with its shape: a config asking for more (hidden=10_000_000) than the file holds is
    refused before anything is allocated. Weights with a NaN or inf are refused too (they would score NaN).

    Raises:
        ValueError: the config, the weights' names or shapes, or non-finite weights (the message names
            the file and the tensor).
    """
    file = resolve_checkpoint(path)
    payload = read_payload(file, map_location)
    try:
        cfg = ModelConfig(**{**payload.model_config, "weights": None})
        with torch.device("meta"):
            expected = RGNN(cfg).state_dict()
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file} is not an RGNN checkpoint of this code: {e!r}") from None
    _check_weights(payload.model, expected, file)
    try:
        model = RGNN(cfg)
        model.load_state_dict(payload.model)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file} is not an RGNN checkpoint of this code: {e!r}") from None
    return model.eval(), payload


def _check_weights(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """`weights` has the names and shapes of `expected` (a meta-device state_dict) and finite floats, else
    a ValueError naming `file` and the first tensor at fault."""
    missing, unknown = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unknown:
        raise ValueError(f"{file} is not an RGNN checkpoint of its model_config: weights missing {missing[:5]}, "
                         f"unknown {unknown[:5]}")
    for key, want in expected.items():
        got = weights[key]
        if got.shape != want.shape:
            raise ValueError(f"{file} is not an RGNN checkpoint of its model_config: {key} has shape "
                             f"{tuple(got.shape)}, the config implies {tuple(want.shape)}")
        if (got.is_floating_point() or got.is_complex()) and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ValueError(f"{file}: weight {key} holds {bad} NaN or inf values of {got.numel()}, "
                             "and a model with them scores NaN")
