"""The per-class AP table of trained models, in the shape of the paper's Table 3.

    python -m rgnn.infer.evaluate --checkpoint A [--checkpoint B ...] (--coco-root DIR | --voc-root DIR | --shards DIR)
                            [--split NAME] [--edge-model FILE] [--markdown FILE] [--csv FILE]

A row per checkpoint, a column per class, then mAP; below it CF1 and OF1 at threshold 0.5. The AP
rule: VOC 2007's 11-point rule on VOC 2007 (the paper's Table 3), the area under the
precision-recall curve otherwise (COCO and VOC 2012 practice). VOC `difficult`-only classes of an
image are ignored. With a data set root each image is decoded and its EdgeBoxes proposals computed
once, here (no Ray), and every checkpoint scores it; with --shards the stored proposals are used, as
training's evaluation does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rgnn.io import storage
from rgnn.io.checkpoint import check_classes
from rgnn.data import shards
from rgnn.data.coco import read_coco
from rgnn.data.images import decode_image
from rgnn.data.records import LabeledSet
from rgnn.data.voc import read_voc
from rgnn.train.engine import collect_scores
from rgnn.metrics import average_precision, mean_ap, multilabel_prf
from rgnn.infer.predict import Predictor
from rgnn.data.proposals import EdgeBoxes
from rgnn.tables import ap_table, to_csv, to_markdown
from rgnn.cli import user_errors

RULES = {"voc07": "VOC 2007 11-point AP", "area": "AP = area under the precision-recall curve"}


def ap_mode(dataset: str) -> str:
    """The AP rule of a data set named as the readers name it ("voc2007/test", "coco/val2017", ...)."""
    return "voc07" if dataset.lower().startswith("voc2007/") else "area"


def scores_on_records(predictors: list[Predictor], labeled: LabeledSet, batch_size: int = 8,
                      progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Every predictor's scores on a data set's records, from one decode and one proposal search per image.

    Returns:
        (per predictor scores float[N, C], targets float[N, C], ignore bool[N, C]). An image that
        cannot be decoded is an error naming it: evaluation must see the whole split.
    """
    C = len(labeled.class_names)
    # EdgeBoxes' best k boxes do not depend on its box limit: one search per edge model serves every T
    searches: dict[str | None, EdgeBoxes] = {}
    for p in predictors:
        e, other = p.proposals, searches.get(p.proposals.edge_model)
        if p.stage != "global" and (other is None or e.params.max_boxes > other.params.max_boxes):
            searches[e.edge_model] = e
    scores: list[list[np.ndarray]] = [[] for _ in predictors]
    recs = labeled.records
    for i in tqdm(range(0, len(recs), batch_size), desc="evaluate", unit="batch", disable=not progress):
        images = [decode_image(r.path) for r in recs[i:i + batch_size]]
        proposals = {key: [e(im) for im in images] for key, e in searches.items()}
        for k, p in enumerate(predictors):  # a stage-1 model drops any proposals (whole images only)
            scores[k] += [pred.scores for pred in p(images, proposals.get(p.proposals.edge_model))]
    empty = np.zeros((0, C), np.float32)
    targets = np.stack([r.target(C) for r in recs]) if recs else empty
    ignore = np.stack([r.difficult_only(C) for r in recs]) if recs else empty.astype(bool)
    return [np.stack(s) if s else empty for s in scores], targets, ignore


def scores_on_shards(predictor: Predictor, split_dir: Path, batch_size: int = 8):
    """(scores float[N, C], targets float[N, C], ignore bool[N, C]) from shards (their stored
    proposals), as training's evaluation reads them."""
    loader = shards.shard_loader(split_dir, predictor.preprocess, batch_size=batch_size, for_eval=True)
    got = collect_scores(predictor.net, loader, predictor.device)
    return got["scores"], got["targets"], got["ignore"]


def evaluate_table(results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], class_names: list[str],
                   mode: str) -> tuple[list[list[str]], dict[str, dict]]:
    """name -> (scores, targets, ignore) -> (the AP table, name -> {"ap", "mAP", "CF1", "OF1", ...})."""
    metrics = {}
    for name, (scores, targets, ignore) in results.items():
        ap = average_precision(scores, targets, mode=mode, ignore=ignore)
        metrics[name] = {"ap": ap, "mAP": mean_ap(ap), **multilabel_prf(scores, targets, ignore=ignore)}
    return ap_table({n: m["ap"] for n, m in metrics.items()}, class_names), metrics


def f1_lines(metrics: dict[str, dict]) -> list[str]:
    return [f"{name}: mAP {100 * m['mAP']:.1f}  CF1 {100 * m['CF1']:.1f}  OF1 {100 * m['OF1']:.1f} (threshold 0.5)"
            for name, m in metrics.items()]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="python -m rgnn.infer.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint folder or .pt (a path or s3:// URI), or an MLflow URI; repeat for more rows")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco-root", help="COCO root (annotations/instances_<split>.json, <split>/)")
    data.add_argument("--voc-root", help="VOCdevkit, or its VOC2007 / VOC2012 folder")
    data.add_argument("--shards", help="shard folder (or s3://bucket/prefix) made by sharding/build_shards.py")
    p.add_argument("--split", "--voc-split", help="split (default val2017; VOC: test)")
    p.add_argument("--edge-model", help="OpenCV structured-edge model.yml.gz for EdgeBoxes (default: training's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--markdown", help="write the table as markdown here")
    p.add_argument("--csv", help="write the table as CSV here")
    args = p.parse_args(argv)
    split = args.split or ("test" if args.voc_root else "val2017")
    with user_errors():
        if len(set(args.checkpoint)) != len(args.checkpoint):
            raise ValueError(f"a checkpoint is named twice: {args.checkpoint}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: expected >= 1")
        predictors = [Predictor.load(c, args.edge_model) for c in args.checkpoint]
        if args.shards:
            split_dir = storage.join(args.shards, split)
            shards.verify_shards(split_dir)
            manifest = shards.read_manifest(split_dir)
            class_names, dataset, labeled = list(manifest["class_names"]), manifest.get("dataset", ""), None
        else:
            labeled = read_voc(args.voc_root, split) if args.voc_root else read_coco(args.coco_root, split)
            class_names, dataset = labeled.class_names, labeled.name
        for ckpt, predictor in zip(args.checkpoint, predictors):
            check_classes(predictor.class_names, class_names, str(ckpt))
        if labeled is None:
            results = {c: scores_on_shards(predictor, split_dir, args.batch_size)
                       for c, predictor in zip(args.checkpoint, predictors)}
        else:
            scores, targets, ignore = scores_on_records(predictors, labeled, args.batch_size)
            results = {c: (s, targets, ignore) for c, s in zip(args.checkpoint, scores)}
    mode = ap_mode(dataset)
    table, metrics = evaluate_table(results, class_names, mode)
    head = f"per-class AP (%) on {dataset or split}, {RULES[mode]}"
    print(f"\n{head}\n\n" + to_markdown(table) + "\n" + "\n".join(f1_lines(metrics)))
    if args.markdown:
        Path(args.markdown).write_text(f"{head}\n\n" + to_markdown(table) + "\n"
                                       + "".join(f"- {line}\n" for line in f1_lines(metrics)))
    if args.csv:
        Path(args.csv).write_text(to_csv(table))
    return metrics


if __name__ == "__main__":
    main()
