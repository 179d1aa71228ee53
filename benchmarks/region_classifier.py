"""The region classifier of a trained RGNN: how often fc8 names an object's class on its true box.

    python benchmarks/region_classifier.py --checkpoint CKPT --coco-root DIR [--split val2017] [--out FILE]

Every image of the split goes through the checkpoint's own input (rgnn.infer.predict.Predictor: the
settings saved beside it), its ground-truth boxes take the proposals' place, and the model's trunk,
RoI pooling, fc6, fc7 and fc8 run on them as on any region (gates aside: fc8 comes before them).
Printed: the share of boxes whose arg-max of fc8 is the box's class, overall and per class. This is
what VGG-16's pretrained fc6/fc7 give the paper per region; the image-level mAP does not show it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from report import RESULTS, write_result
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.infer.predict import Predictor
from rgnn.nn.model import whole_image_regions


def box_predictions(predictor: Predictor, image: np.ndarray, gt_boxes: np.ndarray) -> torch.Tensor:
    """uint8 ndarray[H, W, 3], float ndarray[G, 4] in its pixels -> long Tensor[G]: fc8's arg-max per box."""
    model, no_boxes = predictor.model, np.zeros((0, 4), np.float32)
    p = predictor.preprocess(image, no_boxes, np.zeros(0, np.float32), gt_boxes)
    sizes = torch.tensor([p.size])  # (1, 2)
    with torch.no_grad():
        f = model.forward_features(p.image[None].to(predictor.device), sizes, [p.gt_boxes], open_gates=True)
        logits = model.fc8(f.h7[~whole_image_regions(f.image_index)])  # (G, C): the whole image left out
    return logits.argmax(1).cpu()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained model (path, folder or URI, as predict takes)")
    p.add_argument("--coco-root", required=True, help="a COCO-format set (the photo set: python -m rgnn.data.photos)")
    p.add_argument("--split", default="val2017")
    p.add_argument("--out", default=str(RESULTS / "region_classifier.json"))
    args = p.parse_args(argv)
    predictor = Predictor.load(args.checkpoint)
    labeled = read_coco(Path(args.coco_root), args.split)
    if labeled.class_names != predictor.class_names:
        raise ValueError(f"{args.coco_root}: classes {labeled.class_names} are not the model's {predictor.class_names}")
    C = len(labeled.class_names)
    right, boxes = np.zeros(C, int), np.zeros(C, int)
    for record in labeled.records:
        if len(record.gt_boxes):
            hit = box_predictions(predictor, decode_image(record.path), record.gt_boxes).numpy() == record.gt_classes
            np.add.at(boxes, record.gt_classes, 1)
            np.add.at(right, record.gt_classes, hit)
    per_class = {n: (int(r), int(b)) for n, r, b in zip(labeled.class_names, right, boxes)}
    print(f"right class on {right.sum()} of {boxes.sum()} true {args.split} boxes: {right.sum() / max(boxes.sum(), 1):.3f}")
    for name, (r, b) in per_class.items():
        print(f"  {name:16s} {r:5d} / {b:5d}")
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "right": int(right.sum()),
              "boxes": int(boxes.sum()), "per_class": per_class}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
