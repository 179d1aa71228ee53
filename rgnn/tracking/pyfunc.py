"""The trained RGNN as an MLflow Model (pyfunc), for the Model Registry and `mlflow models serve`.

Input: a DataFrame with a string column `image`, each cell an image file's bytes (JPEG, PNG, ...)
base64-encoded. Output: a DataFrame with one column per class name (sigmoid scores) and one row per
input image. EdgeBoxes runs inside (rgnn.infer.predict.Predictor), with the settings of the training.

The model is logged "from code" (MLflow's models-from-code): the model's definition is this file,
saved as text beside the weights, not a pickle; the weights are the training's checkpoint folder
(checkpoint.pt + config.json), which rgnn's own loader reads with `weights_only` (rgnn.io.checkpoint).
`rgnn.infer.predict --checkpoint models:/NAME/VERSION` uses that loader and runs nothing from the model
folder; `mlflow models serve` / `mlflow.pyfunc.load_model` run this file (MLflow's contract), so
serve only models from a registry you trust.
"""
from __future__ import annotations

import base64
import binascii
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from rgnn.data.images import decode_image
from rgnn.infer.predict import Predictor
from rgnn.tracking.models import MODEL_ARTIFACT

IMAGE_COLUMN = "image"
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pillow", "opencv-contrib-python-headless", "mlflow")


class RGNNModel(mlflow.pyfunc.PythonModel):
    """pyfunc: base64 image files -> class scores, one row per image."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.load(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = decode_column(model_input)
        scores = [p.scores for p in self.predictor(images)]  # float[C] per image
        return pd.DataFrame(scores, columns=self.predictor.class_names, dtype="float64")


def decode_column(frame: pd.DataFrame) -> list:
    """The `image` column's base64 image files, decoded to RGB arrays; a bad row is named."""
    if IMAGE_COLUMN not in frame.columns:
        raise ValueError(f"expected a column {IMAGE_COLUMN!r} of base64-encoded image files, got {list(frame.columns)}")
    images = []
    for i, cell in enumerate(frame[IMAGE_COLUMN]):
        try:
            images.append(decode_image(base64.b64decode(cell, validate=True), name=f"row {i}"))
        except (binascii.Error, TypeError) as e:
            raise ValueError(f"row {i} of {IMAGE_COLUMN!r}: not base64 ({e})") from None
    return images


def encode_image(image_file: bytes | str | Path) -> str:
    """An image file (its bytes or its path) as the model's input cell."""
    data = image_file if isinstance(image_file, bytes) else Path(image_file).read_bytes()
    return base64.b64encode(data).decode("ascii")


def signature(class_names: list[str]) -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                          outputs=Schema([ColSpec("double", name) for name in class_names]))


def requirements() -> list[str]:
    """The serving environment: this process's versions of what the model imports (rgnn itself is
    installed from its repository: `pip install -e .`)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_model(checkpoint_folder: str | Path, class_names: list[str], example_image: bytes | str | Path,
              name: str = "model") -> str:
    """Log the checkpoint folder as the active MLflow run's pyfunc model; returns its model URI.

    Args:
        example_image: an image file (bytes or path), the input example (MLflow runs the model on it once, here).
    """
    info = mlflow.pyfunc.log_model(
        name=name, python_model=__file__, artifacts={MODEL_ARTIFACT: str(checkpoint_folder)},
        signature=signature(class_names),
        input_example=pd.DataFrame({IMAGE_COLUMN: [encode_image(example_image)]}),
        pip_requirements=requirements())
    return info.model_uri


mlflow.models.set_model(RGNNModel())  # models-from-code: what MLflow loads from this file
