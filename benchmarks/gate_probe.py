"""What a gate can read from a region's features: the val ROC-AUC of gates fitted directly on the
photo set's regions, the ceiling for any gate trained on the same input.

    python benchmarks/gate_probe.py [--seed 0] [--variant main] [--train 600 --val 200] [--regions 64]
                                    [--hidden 256] [--epochs 8] [--out FILE]

The photo set (rgnn.data.photos, the seed's) is generated, every image goes through the photo
recipe's input (rgnn.data.transforms.Preprocess: shorter side 288, the top T EdgeBoxes proposals plus
the whole image) and through the frozen ImageNet EfficientNet-Lite0 trunk; every region is pooled as
the model pools it (fc6's input: RoIAlign 3 x 3 at stride 16, averaged, 1280 values). On the train
regions, against eq. 8's target (IoU > 0.5 with an object), two gates are fitted to the standardised
feature: linear (the paper's gate, one FC layer and a sigmoid: a logistic regression, by L-BFGS,
for each L2 penalty) and with one hidden layer (dropout, FC, ReLU; Adam, the last epoch's). Printed:
the val ROC-AUC against every other region, against far ones (IoU <= 0.1) and near misses
(0.1 < IoU <= 0.5). The val objects are photographs the train split never shows.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from report import RESULTS, write_result
from rgnn.data import photos
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.data.proposals import EdgeBoxes
from rgnn.data.transforms import InputConfig, Preprocess
from rgnn.metrics import roc_auc
from rgnn.nn.backbones import build_backbone, normalisation
from rgnn.train.config import INPUTS

PENALTIES = (1e-3, 1e-2, 1e-1)  # L2 penalties of the linear gate


def region_features(root: Path, split: str, preprocess: Preprocess, backbone: nn.Module
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled Tensor[R, 1280], max IoU with a ground-truth box Tensor[R]) of every region of a split."""
    propose = EdgeBoxes()
    pooled, ious = [], []
    for record in read_coco(root, split).records:
        image = decode_image(record.path)
        p = preprocess(image, *propose(image), record.gt_boxes)
        h, w = p.size
        boxes = torch.cat([p.boxes, torch.tensor([[0.0, 0.0, w, h]])])  # (R, 4): as the model, the whole image last
        with torch.no_grad():
            rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)  # (R, 5)
            pooled.append(backbone.region_inputs(backbone(p.image[None]), rois))  # (R, 1280)
        ious.append(box_iou(boxes, p.gt_boxes).max(1).values if len(p.gt_boxes) else torch.zeros(len(boxes)))
    return torch.cat(pooled), torch.cat(ious)


def aucs(scores: np.ndarray, iou: np.ndarray) -> dict[str, float]:
    """ROC-AUC of `scores` for IoU > 0.5 against all other regions, the far (IoU <= 0.1) and the near ones."""
    positive = iou > 0.5
    far, near = iou <= 0.1, (iou > 0.1) & ~positive
    return {"all": roc_auc(scores, positive), "far": roc_auc(scores[positive | far], positive[positive | far]),
            "near": roc_auc(scores[positive | near], positive[positive | near])}


def linear_gate(x: torch.Tensor, y: torch.Tensor, penalty: float) -> nn.Module:
    """A logistic regression with an L2 penalty on its weight, to convergence by L-BFGS."""
    gate = nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(gate.parameters(), max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(gate(x).squeeze(1), y) + penalty * gate.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return gate


def hidden_gate(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, dropout: float) -> nn.Module:
    """Dropout, FC to `hidden`, ReLU, FC to 1: Adam at 1e-3, batches of 512, `epochs` passes."""
    gate = nn.Sequential(nn.Dropout(dropout), nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    optimizer = torch.optim.Adam(gate.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(512):
            loss = F.binary_cross_entropy_with_logits(gate(x[idx]).squeeze(1), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gate.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the photo set's seed (and the fits')")
    p.add_argument("--variant", default="main", choices=tuple(photos.GROUPINGS), help="the photo set's variant")
    p.add_argument("--train", type=int, default=600, help="training images")
    p.add_argument("--val", type=int, default=200, help="val images")
    p.add_argument("--regions", type=int, default=INPUTS["efficientnet_lite0"]["max_regions"], help="T per image")
    p.add_argument("--hidden", type=int, default=256, help="the hidden gate's width")
    p.add_argument("--epochs", type=int, default=8, help="the hidden gate's passes over the train regions")
    p.add_argument("--dropout", type=float, default=INPUTS["efficientnet_lite0"]["dropout"],
                   help="the hidden gate's input dropout (the photo recipe's)")
    p.add_argument("--out", default=str(RESULTS / "gate_probe.json"), help="JSON results")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    recipe = INPUTS["efficientnet_lite0"]
    inputs = InputConfig(recipe["image_size"], recipe["max_size"], recipe["global_size"], args.regions)
    preprocess = Preprocess(inputs, *normalisation("efficientnet_lite0"))
    backbone = build_backbone("efficientnet_lite0", "imagenet").eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = photos.generate(Path(tmp), args.train, args.val, args.seed, args.variant)
        (xt, it), (xv, iv) = (region_features(root, s, preprocess, backbone) for s in ("train2017", "val2017"))
    mean, std = xt.mean(0), xt.std(0) + 1e-4
    xt, xv = (xt - mean) / std, (xv - mean) / std
    yt, iv = (it > 0.5).float(), iv.numpy()
    print(f"photo set {args.variant}, seed {args.seed}: {len(xt)} train / {len(xv)} val regions, "
          f"{yt.mean():.3f} / {(iv > 0.5).mean():.3f} with IoU > 0.5 ({time.perf_counter() - start:.0f} s)")
    print(f"{'gate':28s} {'val AUC':>8s} {'vs far':>8s} {'vs near':>8s}")
    rows = []
    gates = {f"linear, L2 {c:g}": lambda c=c: linear_gate(xt, yt, c) for c in PENALTIES}
    gates[f"hidden layer of {args.hidden}"] = lambda: hidden_gate(xt, yt, args.hidden, args.epochs, args.dropout)
    for name, fit in gates.items():
        gate = fit()
        with torch.no_grad():
            scores = gate(xv).squeeze(1).numpy()
        row = {"gate": name, **aucs(scores, iv)}
        rows.append(row)
        print(f"{name:28s} {row['all']:8.3f} {row['far']:8.3f} {row['near']:8.3f}", flush=True)
    result = {"variant": args.variant, "seed": args.seed, "train": args.train, "val": args.val,
              "regions": args.regions, "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
