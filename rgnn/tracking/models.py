"""An RGNN MLflow Model (rgnn.tracking.pyfunc) read back as a checkpoint: downloaded from an MLflow URI,
and the checkpoint folder inside it found through its MLmodel file. rgnn.io.checkpoint.resolve_checkpoint
imports this module only when given an MLflow URI or an MLflow Model folder."""
from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import yaml

from rgnn.io.checkpoint import MAX_CONFIG_BYTES

MODEL_ARTIFACT = "checkpoint"  # the pyfunc artifact of an RGNN MLflow Model: the checkpoint folder


def download(uri: str, cache: Path) -> Path:
    """The artifacts of MLflow URI `uri` (`models:/<name>/<version>`, `runs:/<id>/model`, ...) as a local path,
    downloaded into one folder under `cache` per tracking store and URI (models:/NAME/1 of two servers differ)."""
    dst = cache / hashlib.sha1(f"{mlflow.get_tracking_uri()} {uri}".encode()).hexdigest()[:16]
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def model_checkpoint(folder: Path) -> Path:
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
