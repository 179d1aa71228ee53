"""The checkpoint format shared by training, prediction and evaluation.

A checkpoint is a folder with `checkpoint.pt` (model state, class names, model config, and for
training: optimiser, stage, epoch, lambda state, mAPs so far) and `config.json` (the resolved
training config as flat settings, readable without torch). The folder is a local path or an
object-store URI (rgnn.io.storage); files are written whole or not at all (rgnn.io.storage.atomic_write).

A checkpoint is untrusted input (it may come from shared storage, an object store or an MLflow server): it is
loaded with `weights_only=True`, so a pickle that would run code is refused, never executed.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from rgnn.io import storage
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.io.storage import atomic_write, write_json

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
MODEL_ARTIFACT = "checkpoint"  # in an MLflow Model (rgnn.tracking.pyfunc): the pyfunc artifact holding the folder
CACHE = Path.home() / ".cache" / "rgnn"  # where checkpoints named by a URI are downloaded
MAX_CHECKPOINT_BYTES = 16 << 30  # a checkpoint.pt downloaded from an object store (VGG-16 + Adam state: ~1.7 GB)
MAX_CONFIG_BYTES = 16 << 20


def save_checkpoint(folder: str | Path, model: RGNN, class_names: list[str], config: dict | None = None,
                    **train_state) -> Path | str:
    """Write `folder/checkpoint.pt` (+ `config.json`); returns the folder (a local path or a URI).

    Args:
        model: the bare RGNN (not DDP-wrapped).
        config: the resolved training config (saved beside the weights).
        train_state: optimizer state, stage, epoch, lambda, maps, ... kept as they are.
    """
    payload = {"model": model.state_dict(), "model_config": asdict(model.cfg),
               "class_names": list(class_names), **train_state}
    atomic_write(storage.join(folder, CHECKPOINT_FILE), lambda f: torch.save(payload, f))
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
        import mlflow  # only needed for MLflow URIs

        # one folder per store and URI (models:/NAME/1 of two servers differ)
        dst = CACHE / "mlflow" / hashlib.sha1(f"{mlflow.get_tracking_uri()} {text}".encode()).hexdigest()[:16]
        dst.mkdir(parents=True, exist_ok=True)
        text = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst))
    elif storage.is_uri(text):
        return _fetch_checkpoint(text)
    p = Path(text)
    if (p / "MLmodel").is_file():
        p = _model_checkpoint(p)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def _model_checkpoint(folder: Path) -> Path:
    """The checkpoint folder inside an MLflow Model folder, as its MLmodel file names it (read as plain
    YAML, at most MAX_CONFIG_BYTES; a path leading outside the folder is refused)."""
    mlmodel = folder / "MLmodel"
    if mlmodel.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{mlmodel}: over {MAX_CONFIG_BYTES} bytes, not an MLmodel file")
    try:
        meta = yaml.safe_load(mlmodel.read_text())
        rel = meta["flavors"]["python_function"]["artifacts"][MODEL_ARTIFACT]["path"]
        target = (folder / rel).resolve()
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{mlmodel}: not an RGNN MLflow Model (no python_function artifact "
                         f"{MODEL_ARTIFACT!r}): {e!r}") from None
    if not target.is_relative_to(folder.resolve()):
        raise ValueError(f"{mlmodel}: its {MODEL_ARTIFACT!r} artifact {rel!r} points outside the model folder")
    return target


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
    """The payload of a checkpoint (folder, .pt, object-store or MLflow URI) on the CPU, without building a model."""
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
