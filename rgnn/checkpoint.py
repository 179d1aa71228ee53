"""The checkpoint format shared by training, prediction and evaluation.

A checkpoint is a folder with `checkpoint.pt` (model state, class names, model config, and for
training: optimiser, stage, epoch, lambda state, mAPs so far) and `config.json` (the resolved
training config as flat settings, readable without torch). Files are written under a temporary
name, fsynced and renamed.

A checkpoint is untrusted input (it may come from shared storage or an MLflow server): it is
loaded with `weights_only=True`, so a pickle that would run code is refused, never executed.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from rgnn.model import RGNN, ModelConfig

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` to a temp file beside `path` (a unique name), flush, fsync, rename over `path`, fsync the
    folder: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Text written as `atomic_write` writes: a reader never sees half a file."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, data) -> Path:
    """JSON written as `write_text` writes."""
    return write_text(path, json.dumps(data, indent=2))


def save_checkpoint(folder: str | Path, model: RGNN, class_names: list[str], config: dict | None = None,
                    **train_state) -> Path:
    """Write `folder/checkpoint.pt` (+ `config.json`); returns the folder.

    Args:
        model: the bare RGNN (not DDP-wrapped).
        config: the resolved training config (saved beside the weights).
        train_state: optimizer state, stage, epoch, lambda, maps, ... kept as they are.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "model_config": asdict(model.cfg),
               "class_names": list(class_names), **train_state}
    atomic_write(folder / CHECKPOINT_FILE, lambda f: torch.save(payload, f))
    write_json(folder / CONFIG_FILE, config or {})
    return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, its checkpoint.pt, or an MLflow URI (`runs:/<id>/model`) -> the .pt file.

    An MLflow URI is downloaded (from MLFLOW_TRACKING_URI's store) into one folder per URI under
    ~/.cache/rgnn/mlflow, so repeated use neither re-downloads into new temp folders nor leaks them.
    """
    text = str(path)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow  # only needed for MLflow URIs

        dst = Path.home() / ".cache" / "rgnn" / "mlflow" / hashlib.sha1(text.encode()).hexdigest()[:16]
        dst.mkdir(parents=True, exist_ok=True)
        text = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst))
    p = Path(text)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def _read_payload(file: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The payload of a checkpoint file, loaded as data only (weights_only: no code runs)."""
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what weights_only refuses: a class or call it does not allow
        what = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "")
        raise ValueError(f"{file} is not a safe RGNN checkpoint: it holds objects other than tensors and "
                         f"plain containers, and nothing in it was run. {what}".rstrip()) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file} is not an RGNN checkpoint: {e!r}") from None
    if not isinstance(payload, dict) or not {"model", "model_config", "class_names"} <= set(payload):
        raise ValueError(f"{file} is not an RGNN checkpoint: expected a dict with model, model_config, class_names")
    return payload


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a checkpoint (folder, .pt or MLflow URI) on the CPU, without building a model."""
    return _read_payload(resolve_checkpoint(path))


def checkpoint_classes(path: str | Path) -> list[str]:
    """The class names of a checkpoint, without loading its weights into memory."""
    file = resolve_checkpoint(path)
    return list(_read_payload(file, mmap=True)["class_names"])


def check_classes(ckpt_classes: list[str], data_classes: list[str], where: str) -> None:
    """A class list that differs between checkpoint and data is an error, not a silent mismatch."""
    if list(ckpt_classes) != list(data_classes):
        raise ValueError(f"{where}: its {len(ckpt_classes)} classes {list(ckpt_classes)[:4]}... differ from "
                         f"the data's {len(data_classes)} classes {list(data_classes)[:4]}...")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[RGNN, dict]:
    """Rebuild the RGNN of a checkpoint; returns (model in eval mode, the whole payload)."""
    file = resolve_checkpoint(path)
    payload = _read_payload(file, map_location)
    try:
        model = RGNN(ModelConfig(**{**payload["model_config"], "weights": None}))
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file} is not an RGNN checkpoint of this code: {e!r}") from None
    return model.eval(), payload
