"""Pictures: the paper's Figure 3 (gated regions and the gate heat-map) and precision-recall curves.

    python -m rgnn.infer.visualize --checkpoint PATH_OR_URI IMAGE --out fig.png [--class NAME] [--edge-model FILE]

draws Figure 3 for one image at its own size, through rgnn.infer.predict's `Predictor` (the proposals and
input size of the model's training).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from rgnn.metrics import pr_curve
from rgnn.cli import user_errors

RED, GREEN = (255, 0, 0), (0, 255, 0)


def gate_heatmap(height: int, width: int, boxes: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """Mean gate value of the regions covering each pixel.

    Args:
        boxes: float ndarray[R, 4] x1 y1 x2 y2 in pixels of this image.
        gates: float ndarray[R] (for feature-level gates, pick a class or take the max first).

    Returns:
        float32 ndarray[height, width], 0 where no region covers the pixel.
    """
    total = np.zeros((height + 1, width + 1), np.float64)
    count = np.zeros_like(total)
    b = np.round(boxes).astype(int)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    for (x1, y1, x2, y2), g in zip(b, gates):  # 2-D difference arrays: O(R + HW)
        for arr, v in ((total, g), (count, 1.0)):
            arr[y1, x1] += v
            arr[y1, x2] -= v
            arr[y2, x1] -= v
            arr[y2, x2] += v
    total = total.cumsum(0).cumsum(1)[:height, :width]
    count = count.cumsum(0).cumsum(1)[:height, :width]
    return np.where(count > 0.5, total / np.maximum(count, 1), 0).astype(np.float32)


def draw_gates(image: np.ndarray, boxes: np.ndarray, gates: np.ndarray, k: int = 5) -> np.ndarray:
    """Figure 3 of the paper: the top-k gated regions in red, the bottom-k in green, over the
    heat-map of gate values blended with the image.

    Args:
        image: uint8 ndarray[H, W, 3] RGB.
        boxes: ndarray[R, 4] in the image's pixels; gates: ndarray[R] or [R, D] (max over D).

    Returns:
        uint8 ndarray[H, W, 3] RGB of the image's size.
    """
    gates = np.asarray(gates, np.float32)
    if gates.ndim == 2:
        gates = gates.max(axis=1)
    h, w = image.shape[:2]
    heat = gate_heatmap(h, w, boxes, gates)
    span = heat.max() - heat.min()
    heat = ((heat - heat.min()) / (span if span > 0 else 1) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(heat, cv2.COLORMAP_JET)[..., ::-1]
    out = cv2.addWeighted(image, 0.55, colour, 0.45, 0)
    order = np.argsort(-gates, kind="stable")
    thick = max(1, round(min(h, w) / 150))
    for idx, colour_ in ((order[k:][::-1][:k], GREEN), (order[:k], RED)):  # red drawn last, on top
        for x1, y1, x2, y2 in np.round(boxes[idx]).astype(int):
            cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour_, thick)
    return np.ascontiguousarray(out)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 image as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f"cannot write {path}")
    return path


def pr_curves(scores: np.ndarray, targets: np.ndarray, class_names: list[str], path: str | Path,
              ap: np.ndarray | None = None) -> Path:
    """One precision-recall curve per class (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    for c, name in enumerate(class_names):
        pos = targets[:, c] > 0
        if not pos.any():
            continue
        precision, recall = pr_curve(scores[:, c], pos)
        label = name if ap is None else f"{name} ({ap[c]:.2f})"
        ax.plot(np.r_[0, recall], np.r_[1, precision], lw=1, label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall per class")
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def class_gates(gates: np.ndarray, class_names: list[str], name: str | None) -> np.ndarray:
    """Gate values ndarray[R] to draw: region-level as they are; feature-level the chosen class's
    dimension (when the gated layer has one per class: fc8 or its softmax) or the max over dimensions."""
    if gates.ndim == 1:
        if name is not None:
            raise ValueError("--class applies to feature-level gates; this model's gates are per region")
        return gates
    if name is None:
        return gates.max(axis=1)
    if name not in class_names:
        raise ValueError(f"--class {name!r}: not one of the model's classes {class_names}")
    if gates.shape[1] != len(class_names):
        raise ValueError(f"--class needs gates per class; this model gates {gates.shape[1]} features (fc6/fc7)")
    return gates[:, class_names.index(name)]


def main(argv: list[str] | None = None) -> Path:
    import argparse

    from rgnn.data.images import decode_image
    from rgnn.infer.predict import Predictor

    p = argparse.ArgumentParser(prog="python -m rgnn.infer.visualize",
                                description="The paper's Figure 3 for one image: the top-5 gated regions in "
                                            "red, the bottom-5 in green, over the heat-map of gate values.")
    p.add_argument("image", help="the image (JPEG, PNG, ...)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder or .pt (a path or s3:// URI), or an MLflow URI (runs:/<id>/model)")
    p.add_argument("--out", required=True, help="PNG to write (the image's own size)")
    p.add_argument("--class", dest="cls", help="feature-level gates: draw this class's gate (default: the max)")
    p.add_argument("--edge-model", help="OpenCV structured-edge model.yml.gz for EdgeBoxes (default: training's)")
    args = p.parse_args(argv)
    with user_errors():
        predictor = Predictor.load(args.checkpoint, args.edge_model)
        if predictor.stage in ("global", "regional") or predictor.model.gate is None:
            raise ValueError(f"{args.checkpoint}: a model without trained gates (stage {predictor.stage}, "
                             f"gate {predictor.model.cfg.gate}) has no gate picture")
        image = decode_image(args.image)
        pred = predictor([image])[0]
        gates = class_gates(pred.gates, predictor.class_names, args.cls)
    out = save_png(draw_gates(image, pred.boxes, gates), args.out)
    top = ", ".join(f"{n} {s:.2f}" for n, s in sorted(zip(predictor.class_names, pred.scores), key=lambda t: -t[1])[:3])
    print(f"wrote {out} ({image.shape[1]}x{image.shape[0]}); top scores: {top}")
    return out


if __name__ == "__main__":
    main()
