"""The checkpoint format shared by training, prediction and evaluation.

A checkpoint is a folder with `checkpoint.pt` (model state, class names, model config, and for
training: optimiser, stage, epoch, lambda state, mAPs so far) and `config.json` (the resolved
training config, readable without torch). Files are written under a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from rgnn.model import RGNN, ModelConfig

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str | Path, data) -> Path:
    """JSON written under a temporary name and renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2)))
    return path


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
    _atomic_write(folder / CHECKPOINT_FILE, lambda p: torch.save(payload, p))
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


def checkpoint_classes(path: str | Path) -> list[str]:
    """The class names of a checkpoint, without loading its weights into memory."""
    file = resolve_checkpoint(path)
    payload = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    if "class_names" not in payload:
        raise ValueError(f"{file} is not an RGNN checkpoint: no class_names")
    return list(payload["class_names"])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[RGNN, dict]:
    """Rebuild the RGNN of a checkpoint; returns (model in eval mode, the whole payload)."""
    file = resolve_checkpoint(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=False)
        cfg = ModelConfig(**{**payload["model_config"], "weights": None})
    except (KeyError, TypeError, RuntimeError, EOFError) as e:
        raise ValueError(f"{file} is not an RGNN checkpoint: {e!r}") from None
    model = RGNN(cfg)
    model.load_state_dict(payload["model"])
    return model.eval(), payload
