"""Labels, class scores and the most-gated regions of images, from a trained RGNN.

    python -m rgnn.predict --checkpoint PATH_OR_URI IMAGE_OR_DIR... [--out preds.json] [--threshold 0.5]

The checkpoint is a folder or `checkpoint.pt` written by cluster/ (or rgnn.training), or an MLflow
model URI such as `runs:/<run id>/model`. Each image gets its EdgeBoxes proposals (section 3), is
resized as in training (the config saved beside the checkpoint), and goes through the model of the
last stage it was trained in. A file that cannot be decoded is reported and skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from rgnn.checkpoint import CONFIG_FILE, load_checkpoint, resolve_checkpoint, write_json
from rgnn.data import shards
from rgnn.data.images import decode_image
from rgnn.model import RGNN
from rgnn.proposals import EdgeBoxes, ProposalParams

TOP_REGIONS = 5
# without a saved config: the paper's input (Fast R-CNN's shorter side 600, longer side <= 1000, T = 500)
FALLBACK = {"image_size": 600, "max_size": 1000, "max_regions": 500, "global_size": 224}


@dataclass
class Prediction:
    """One image's output: sigmoid scores float[C], every region (x1 y1 x2 y2 in the original
    image's pixels, the whole image last) float[R, 4], their gates float[R] / [R, D] or None."""

    scores: np.ndarray
    boxes: np.ndarray
    gates: np.ndarray | None


class Predictor:
    """A trained RGNN with the settings of its training, ready for raw images."""

    def __init__(self, model: RGNN, class_names: list[str], stage: str, settings: dict,
                 edge_model: str | None = None, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.stage = stage
        self.settings = {k: settings.get(k) or v for k, v in FALLBACK.items()}
        self.proposals = EdgeBoxes(ProposalParams(max_boxes=max(2 * self.settings["max_regions"], 1)), edge_model)

    @classmethod
    def load(cls, checkpoint: str | Path, edge_model: str | None = None, **overrides) -> "Predictor":
        """From a checkpoint (path or MLflow URI); `overrides` (image_size, max_regions, ...) win
        over the config saved beside it."""
        file = resolve_checkpoint(checkpoint)
        model, payload = load_checkpoint(file)
        config = file.parent / CONFIG_FILE
        settings = json.loads(config.read_text()) if config.is_file() else {}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        stage = payload.get("stage") or (payload.get("state") or {}).get("stage") or "joint"
        return cls(model, payload["class_names"], stage, settings, edge_model)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[Prediction]:
        """A batch of uint8 RGB images [H, W, 3] of any sizes -> one Prediction each."""
        s = self.settings
        prepared = []
        for image in images:
            boxes, scores = self.proposals(image)
            prepared.append(shards.prepare(image, boxes, scores, s["image_size"], s["max_size"], s["max_regions"],
                                           s["global_size"] if self.stage == "global" else None))
        batch, sizes = shards.pad_images([p[0] for p in prepared])
        batch = batch.to(self.device)
        if self.stage == "global":
            logits = self.model.forward_global(batch)  # (N, C)
            return [Prediction(torch.sigmoid(lg).float().cpu().numpy(), np.zeros((0, 4), np.float32), None)
                    for lg in logits]
        out = self.model(batch, sizes.to(self.device), [p[2].to(self.device) for p in prepared],
                         open_gates=self.stage == "regional")
        scores = torch.sigmoid(out.logits).float().cpu().numpy()  # (N, C)
        result = []
        for i, (_, _, _, (sx, sy)) in enumerate(prepared):
            sel = (out.image_index == i).cpu()
            boxes = out.boxes.cpu()[sel].numpy() / np.array([sx, sy, sx, sy], np.float32)  # original pixels
            gates = None if out.gates is None else out.gates.float().cpu()[sel].numpy()
            result.append(Prediction(scores[i], boxes, gates))
        return result


def image_files(inputs: list[str]) -> tuple[list[Path], list[dict]]:
    """Files named or found (sorted, non-recursive, hidden files left out) in folders; missing paths reported."""
    files, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.is_file() and not p.name.startswith("."))
        elif item.is_file():
            files.append(item)
        else:
            skipped.append({"file": str(item), "reason": "no such file or folder"})
    return files, skipped


def _decoded(files: list[Path], skipped: list[dict]) -> Iterator[tuple[Path, np.ndarray]]:
    for f in files:
        try:
            yield f, decode_image(f)
        except (ValueError, OSError) as e:
            print(f"skipped {f}: {e}", file=sys.stderr)
            skipped.append({"file": str(f), "reason": str(e)})


def describe(p: Prediction, class_names: list[str], threshold: float, top: int = TOP_REGIONS) -> dict:
    """A Prediction as JSON: labels above the threshold, every class's score, the top gated regions
    (feature-level gates: the max over the gated dimensions)."""
    regions = []
    if p.gates is not None:
        g = p.gates.max(axis=1) if p.gates.ndim == 2 else p.gates  # (R,)
        for r in np.argsort(-g, kind="stable")[:top]:
            regions.append({"box": [round(float(v), 1) for v in p.boxes[r]], "gate": round(float(g[r]), 4)})
    return {"labels": [n for n, s in zip(class_names, p.scores) if s >= threshold],
            "scores": {n: round(float(s), 4) for n, s in zip(class_names, p.scores)},
            "top_regions": regions}


def predict_files(predictor: Predictor, inputs: list[str], threshold: float = 0.5, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """Predict every image of `inputs` (files and folders); returns the JSON document of the CLI."""
    files, skipped = image_files(inputs)
    out: list[dict] = []
    pending: list[tuple[Path, np.ndarray]] = []
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress or len(files) < 2)

    def flush() -> None:
        for (f, _), p in zip(pending, predictor([im for _, im in pending])):
            out.append({"file": str(f), **describe(p, predictor.class_names, threshold)})
        pending.clear()

    for item in _decoded(files, skipped):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
        bar.update(1)
    if pending:
        flush()
    bar.close()
    return {"classes": predictor.class_names, "threshold": threshold, "stage": predictor.stage,
            "predictions": out, "skipped": skipped}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rgnn.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or .pt, or an MLflow URI (runs:/<id>/model)")
    p.add_argument("--out", default="preds.json", help="JSON output")
    p.add_argument("--threshold", type=float, default=0.5, help="score at or above which a label is predicted")
    p.add_argument("--edge-model", help="OpenCV structured-edge model.yml.gz for EdgeBoxes (as in training)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--image-size", type=int, help="shorter side (default: the training config's)")
    p.add_argument("--max-regions", type=int, help="T proposals per image (default: the training config's)")
    args = p.parse_args(argv)
    try:
        predictor = Predictor.load(args.checkpoint, args.edge_model, image_size=args.image_size,
                                   max_regions=args.max_regions)
        result = predict_files(predictor, args.inputs, args.threshold, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    write_json(args.out, result)
    print(f"{len(result['predictions'])} images predicted, {len(result['skipped'])} skipped -> {args.out}")
    return result


if __name__ == "__main__":
    main()
