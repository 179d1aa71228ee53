"""The per-class AP table of trained models, in the shape of the paper's Table 3.

    python -m rgnn.evaluate --checkpoint A [--checkpoint B ...] (--coco-root DIR | --voc-root DIR | --shards DIR)
                            [--split NAME] [--markdown FILE] [--csv FILE]

A row per checkpoint, a column per class, then mAP; below it CF1 and OF1 at threshold 0.5. The AP
rule: VOC 2007's 11-point rule on VOC 2007, the area under the precision-recall curve otherwise
(COCO and VOC 2012 practice). VOC `difficult`-only classes of an image are ignored. With a data set
root the proposals are computed here, image by image; with --shards they come from the shards.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rgnn.data import shards
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.data.records import LabeledSet
from rgnn.data.voc import read_voc
from rgnn.engine import StageModel, predict
from rgnn.metrics import average_precision, multilabel_prf
from rgnn.predict import Predictor
from rgnn.tables import ap_table, to_csv, to_markdown
from rgnn.training import check_classes


def scores_on_records(predictor: Predictor, labeled: LabeledSet, batch_size: int = 8,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores float[N, C], targets float[N, C], ignore bool[N, C]) over a data set's records;
    an image that cannot be decoded is an error naming it (evaluation must see the whole split)."""
    C = len(labeled.class_names)
    scores = []
    recs = labeled.records
    for i in tqdm(range(0, len(recs), batch_size), desc="evaluate", unit="batch", disable=not progress):
        part = recs[i:i + batch_size]
        scores += [p.scores for p in predictor([decode_image(r.path) for r in part])]
    targets = np.stack([r.target(C) for r in recs]) if recs else np.zeros((0, C), np.float32)
    ignore = np.stack([r.difficult_only(C) for r in recs]) if recs else np.zeros((0, C), bool)
    return np.stack(scores) if scores else np.zeros((0, C), np.float32), targets, ignore


def scores_on_shards(predictor: Predictor, split_dir: Path, batch_size: int = 8):
    """The same from shards (their stored proposals), as training's evaluation reads them."""
    s = predictor.settings
    loader = shards.shard_loader(split_dir, batch_size=batch_size, image_size=s["image_size"], max_size=s["max_size"],
                                 max_regions=s["max_regions"],
                                 global_size=s["global_size"] if predictor.stage == "global" else None, for_eval=True)
    scores, targets, ignore, _ = predict(StageModel(predictor.model, predictor.stage), loader, predictor.device)
    return scores, targets, ignore


def evaluate_table(results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], class_names: list[str],
                   mode: str) -> tuple[list[list[str]], dict[str, dict]]:
    """name -> (scores, targets, ignore) -> (the AP table, name -> {"ap", "mAP", "CF1", "OF1", ...})."""
    metrics = {}
    for name, (scores, targets, ignore) in results.items():
        ap = average_precision(scores, targets, mode=mode, ignore=ignore)
        metrics[name] = {"ap": ap, "mAP": float(np.nanmean(ap)), **multilabel_prf(scores, targets, ignore=ignore)}
    return ap_table({n: m["ap"] for n, m in metrics.items()}, class_names), metrics


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="python -m rgnn.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint folder or .pt, or an MLflow URI; repeat for more rows")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco-root", help="COCO root (annotations/instances_<split>.json, <split>/)")
    data.add_argument("--voc-root", help="VOCdevkit/VOC2007 or VOC2012")
    data.add_argument("--shards", help="shard folder made by sharding/build_shards.py")
    p.add_argument("--split", help="split (default val2017; VOC: test)")
    p.add_argument("--edge-model", help="OpenCV structured-edge model.yml.gz for EdgeBoxes (as in training)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--markdown", help="write the table as markdown here")
    p.add_argument("--csv", help="write the table as CSV here")
    args = p.parse_args(argv)
    split = args.split or ("test" if args.voc_root else "val2017")
    try:
        if args.shards:
            split_dir = Path(args.shards) / split
            shards.verify_shards(split_dir)
            class_names, labeled = shards.class_names(split_dir), None
        else:
            labeled = read_voc(args.voc_root, split) if args.voc_root else read_coco(args.coco_root, split)
            class_names = labeled.class_names
        mode = "voc07" if args.voc_root and "2007" in Path(args.voc_root).resolve().name else "area"
        results = {}
        for ckpt in args.checkpoint:
            predictor = Predictor.load(ckpt, args.edge_model)
            check_classes(predictor.class_names, class_names, str(ckpt))
            results[str(ckpt)] = (scores_on_shards(predictor, split_dir, args.batch_size) if labeled is None
                                  else scores_on_records(predictor, labeled, args.batch_size))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    table, metrics = evaluate_table(results, class_names, mode)
    rule = "VOC 2007 11-point AP" if mode == "voc07" else "AP = area under the precision-recall curve"
    print(f"\nper-class AP (%) on {split}, {rule}\n\n" + to_markdown(table))
    for name, m in metrics.items():
        print(f"{name}: mAP {100 * m['mAP']:.1f}  CF1 {100 * m['CF1']:.1f}  OF1 {100 * m['OF1']:.1f} (threshold 0.5)")
    if args.markdown:
        Path(args.markdown).write_text(f"{rule}\n\n" + to_markdown(table))
    if args.csv:
        Path(args.csv).write_text(to_csv(table))
    return metrics


if __name__ == "__main__":
    main()
