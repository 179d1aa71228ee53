"""Labels, class scores and the most-gated regions of images, from a trained RGNN.

    python -m rgnn.infer.predict --checkpoint PATH_OR_URI IMAGE_OR_DIR... [--out preds.json] [--threshold 0.5]
                           [--edge-model FILE] [--batch-size N] [--image-size S] [--max-regions T]

The checkpoint is a folder or `checkpoint.pt` written by cluster/ (or rgnn.train.stages), local or on an
object store (`s3://bucket/.../checkpoint.pt`, downloaded into ~/.cache/rgnn), or an MLflow model URI
such as `runs:/<run id>/model`. Each image gets its EdgeBoxes proposals (section 3, with
the training config's edge model unless --edge-model names one), is resized as in training (the
config saved beside the checkpoint: shorter side, longer-side cap, T), and goes through the model
of the last stage it was trained in (no gradient; on the GPU when there is one). Per image the JSON
holds the labels whose sigmoid score is at or above the threshold, every class's score, and the 5
regions of highest gate with their boxes in the image's own pixels. A file that cannot be decoded
is reported on stderr, listed under "skipped" with the reason, and the rest go on.

Python: `Predictor.load(checkpoint)` then `predictor(images)` (decoded RGB arrays) or
`predict_files(predictor, paths)` (the CLI's document).
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

from rgnn.io.checkpoint import CONFIG_FILE, load_checkpoint, resolve_checkpoint
from rgnn.data.images import decode_image
from rgnn.data.transforms import PAPER_INPUT, InputConfig, Preprocess, pad_images
from rgnn.train.engine import StageModel, memory_format
from rgnn.nn.model import RGNN
from rgnn.data.proposals import EdgeBoxes, ProposalParams
from rgnn.io.storage import write_json
from rgnn.cli import user_errors

TOP_REGIONS = 5


@dataclass
class Prediction:
    """One image's output: sigmoid scores float[C], every region (x1 y1 x2 y2 in the original
    image's pixels, the whole image last) float[R, 4], their gates float[R] / [R, D] or None."""

    scores: np.ndarray
    boxes: np.ndarray
    gates: np.ndarray | None


class Predictor:
    """A trained RGNN with the settings of its training, ready for raw images.

    Args:
        stage: the schedule stage the model was last trained in (section 4.2): "global" feeds
            size-normalised whole images, "regional" holds the gates open, "gates"/"joint" gate.
        inputs: the input of its training (shorter side, longer-side cap, T, stage 1's square).
        edge_model: the structured-edge model file of EdgeBoxes; None: gradient edges.
        device: default CUDA when available, else the CPU.
    """

    def __init__(self, model: RGNN, class_names: list[str], stage: str, inputs: InputConfig,
                 edge_model: str | None = None, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # NHWC whatever the training's layout: faster convolutions, the same scores to float rounding
        self.model = model.to(self.device, memory_format=memory_format("channels_last")).eval()
        self.class_names = list(class_names)
        self.stage = stage
        inputs.validate()
        self.inputs = inputs
        self.preprocess = Preprocess.for_stage(inputs, model.cfg, stage)
        self.net = StageModel(self.model, stage)
        self.proposals = EdgeBoxes(ProposalParams(max_boxes=inputs.stored_proposals), edge_model)

    @classmethod
    def load(cls, checkpoint: str | Path, edge_model: str | None = None, **overrides) -> "Predictor":
        """From a checkpoint (path, object-store or MLflow URI: rgnn.io.checkpoint.resolve_checkpoint), run in the
        stage its payload records; `overrides` (image_size, max_regions, ...) win over the config saved beside
        it; without a saved config, the paper's input (PAPER_INPUT)."""
        file = resolve_checkpoint(checkpoint)
        model, payload = load_checkpoint(file)
        config = file.parent / CONFIG_FILE
        settings = json.loads(config.read_text()) if config.is_file() else {}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        inputs = InputConfig(**{f: settings.get(f) if settings.get(f) is not None else getattr(PAPER_INPUT, f)
                                for f in ("image_size", "max_size", "global_size", "max_regions")})
        if edge_model is None and settings.get("edge_model"):  # the proposals of training
            edge_model = settings["edge_model"]
            if not Path(edge_model).is_file():
                raise FileNotFoundError(f"structured-edge model file not found: {edge_model} (the model's "
                                        "training used it; pass --edge-model with its path here)")
        return cls(model, payload.class_names, payload.stage, inputs, edge_model)

    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """EdgeBoxes proposals of one uint8 [H, W, 3] image: boxes float32[K, 4] in its pixels, scores
        float32[K], best first (K <= 2T, a margin over the T that `prepare` keeps); none for the
        global stage, which sees whole images only."""
        if self.stage == "global":
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        return self.proposals(image)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray],
                 proposals: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[Prediction]:
        """A batch of uint8 RGB images [H, W, 3] of any sizes -> one Prediction each.

        Args:
            proposals: per image what `propose` returns (or a longer list from the same EdgeBoxes
                settings: its best T are the same boxes); None: computed here.
        """
        if proposals is None:
            proposals = [self.propose(image) for image in images]
        if len(proposals) != len(images):
            raise ValueError(f"{len(images)} images but {len(proposals)} proposal lists")
        if not images:
            return []
        prepared = [self.preprocess(image, boxes, scores) for image, (boxes, scores) in zip(images, proposals)]
        batch, sizes = pad_images([p.image for p in prepared])  # (N, 3, H, W), (N, 2)
        out = self.net.run(batch.to(self.device), sizes.to(self.device), [p.boxes.to(self.device) for p in prepared])
        scores = torch.sigmoid(out.logits).float().cpu().numpy()  # (N, C)
        all_boxes, image_index = out.boxes.float().cpu().numpy(), out.image_index.cpu().numpy()  # (R, 4), (R,)
        all_gates = None if out.gates is None else out.gates.float().cpu().numpy()  # (R,) or (R, D)
        result = []
        for i, p in enumerate(prepared):
            sel = image_index == i
            sx, sy = p.scale
            boxes = all_boxes[sel] / np.array([sx, sy, sx, sy], np.float32)  # (R_i, 4) original pixels
            result.append(Prediction(scores[i], boxes, None if all_gates is None else all_gates[sel]))
        return result


def _skip(skipped: list[dict], file: Path, reason: str) -> None:
    """Report an input that is not predicted: on stderr (above a progress bar) and in the JSON."""
    tqdm.write(f"skipped {file}: {reason}", file=sys.stderr)
    skipped.append({"file": str(file), "reason": reason})


def image_files(inputs: list[str], skipped: list[dict]) -> list[Path]:
    """Files named or found (sorted, non-recursive) in folders; every input or folder entry that is not
    predicted is added to `skipped` with its reason (missing, hidden, a folder, a broken or looping
    link, not a regular file)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            for p in sorted(item.iterdir()):
                reason = _not_a_file(p) or ("hidden file" if p.name.startswith(".") else None)
                if reason:
                    _skip(skipped, p, reason)
                else:
                    files.append(p)
        elif reason := _not_a_file(item):
            _skip(skipped, item, reason)
        else:
            files.append(item)
    return files


def _not_a_file(p: Path) -> str | None:
    """Why `p` is not a regular file to read, or None when it is one."""
    if p.is_symlink() and not p.exists():
        return "broken symbolic link (or a link loop)"
    if not p.exists():
        return "no such file or folder"
    if p.is_dir():
        return "a folder (folders are not searched recursively)"
    if not p.is_file():
        return "not a regular file (FIFO, socket or device)"
    return None


def _decoded(files: list[Path], skipped: list[dict]) -> Iterator[tuple[Path, np.ndarray]]:
    for f in files:
        try:
            yield f, decode_image(f)
        except (ValueError, OSError) as e:
            _skip(skipped, f, str(e))


def _top_regions(boxes: np.ndarray, gates: np.ndarray, top: int) -> list[dict]:
    """The `top` regions of highest gate, best first: boxes float[R, 4], gates float[R].

    Ranked by the gate as reported (4 decimals), ties in proposal order: float noise below the
    reported precision (another batch, another kernel) does not reorder the document."""
    reported = np.round(gates.astype(np.float64), 4)
    return [{"box": [round(float(v), 1) for v in boxes[r]], "gate": float(reported[r])}
            for r in np.argsort(-reported, kind="stable")[:top]]


def describe(p: Prediction, class_names: list[str], threshold: float, top: int = TOP_REGIONS) -> dict:
    """A Prediction as JSON: labels at or above the threshold, every class's score, the top gated
    regions (feature-level gates: by the max over the gated dimensions) and, for feature-level gates
    with one dimension per class (fc8, softmax), each predicted label's own top regions."""
    labels = [n for n, s in zip(class_names, p.scores) if s >= threshold]
    doc = {"labels": labels, "scores": {n: round(float(s), 4) for n, s in zip(class_names, p.scores)},
           "top_regions": []}
    if p.gates is not None:
        doc["top_regions"] = _top_regions(p.boxes, p.gates.max(axis=1) if p.gates.ndim == 2 else p.gates, top)
        if p.gates.ndim == 2 and p.gates.shape[1] == len(class_names):
            doc["top_regions_by_label"] = {n: _top_regions(p.boxes, p.gates[:, class_names.index(n)], top)
                                           for n in labels}
    return doc


MAX_RESUME_BYTES = 1 << 30  # a predictions file to resume from is read only up to this size


def predict_files(predictor: Predictor, inputs: list[str], threshold: float = 0.5, batch_size: int = 8,
                  progress: bool = True, out: str | Path | None = None) -> dict:
    """Predict every image of `inputs` (files and folders), `batch_size` images per forward pass.

    A batch that fails in the network is predicted again image by image, so one bad image is listed
    under "skipped" with its reason and costs nobody else's prediction. With `out`, the document is
    written there (whole, atomically) after every batch, and a run that stopped resumes: the images
    an `out` of the same checkpoint stage, classes and threshold already holds are not predicted again.

    Returns:
        the CLI's JSON document: {"classes", "threshold", "stage", "predictions": [{"file", "labels",
        "scores", "top_regions", ...} per image], "skipped": [{"file", "reason"}]}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    doc = {"classes": predictor.class_names, "threshold": threshold, "stage": predictor.stage,
           "predictions": _resumed(out, predictor, threshold), "skipped": []}
    done = {p["file"] for p in doc["predictions"]}
    files = [f for f in image_files(inputs, doc["skipped"]) if str(f) not in done]
    pending: list[tuple[Path, np.ndarray]] = []
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress or len(files) < 2)

    def one(f: Path, image: np.ndarray) -> Prediction | None:
        try:
            return predictor([image])[0]
        except (RuntimeError, ValueError) as e:
            print(f"skipped {f}: {e}", file=sys.stderr)
            doc["skipped"].append({"file": str(f), "reason": f"prediction failed: {e}"})
            return None

    def flush() -> None:
        try:
            preds = predictor([im for _, im in pending])
        except (RuntimeError, ValueError):  # find the image at fault
            preds = [one(f, im) for f, im in pending]
        for (f, _), p in zip(pending, preds):
            if p is not None:
                doc["predictions"].append({"file": str(f), **describe(p, predictor.class_names, threshold)})
        pending.clear()
        if out is not None:
            write_json(out, doc)

    for item in _decoded(files, doc["skipped"]):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
        bar.update(1)
    if pending or out is not None:
        flush()
    bar.close()
    return doc


def _resumed(out: str | Path | None, predictor: Predictor, threshold: float) -> list[dict]:
    """The predictions an earlier run of the same model and threshold left in `out` (none if it differs)."""
    path = Path(out) if out is not None else None
    if path is None or not path.is_file():
        return []
    if path.stat().st_size > MAX_RESUME_BYTES:
        raise ValueError(f"{path}: over {MAX_RESUME_BYTES} bytes; not a predictions file to resume")
    try:
        old = json.loads(path.read_text())
        same = (old["classes"], old["threshold"], old["stage"]) == (predictor.class_names, threshold, predictor.stage)
        kept = [p for p in old["predictions"] if isinstance(p, dict) and isinstance(p.get("file"), str)]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{path}: not a predictions file of rgnn.infer.predict (remove it or choose another --out)") from None
    return kept if same else []


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rgnn.infer.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder or .pt (a path or s3:// URI), or an MLflow URI (runs:/<id>/model)")
    p.add_argument("--out", default="preds.json", help="JSON output")
    p.add_argument("--threshold", type=float, default=0.5, help="score at or above which a label is predicted")
    p.add_argument("--edge-model", help="OpenCV structured-edge model.yml.gz for EdgeBoxes (default: training's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--image-size", type=int, help="shorter side (default: the training config's)")
    p.add_argument("--max-regions", type=int, help="T proposals per image (default: the training config's)")
    args = p.parse_args(argv)
    with user_errors():
        predictor = Predictor.load(args.checkpoint, args.edge_model, image_size=args.image_size,
                                   max_regions=args.max_regions)
        result = predict_files(predictor, args.inputs, args.threshold, args.batch_size, out=args.out)
    print(f"{len(result['predictions'])} images predicted, {len(result['skipped'])} skipped -> {args.out}")
    return result


if __name__ == "__main__":
    main()
