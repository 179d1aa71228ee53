"""Multi-label classification metrics: per-class AP, mAP, and CP/CR/CF1/OP/OR/OF1.

AP comes in two modes:
- "area": the area under the precision-recall curve as scikit-learn's `average_precision_score`
  computes it, sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (equal scores are one
  threshold); COCO and VOC 2012 practice.
- "voc07": the VOC 2007 11-point rule, the mean over t in {0, 0.1, ..., 1} of the best precision
  at recall >= t, on the same threshold-wise curve (so ties are handled the same way).

Metrics are computed on the whole split at once, never averaged over batches (STYLE.md, 6).
"""
from __future__ import annotations

import numpy as np

AP_MODES = ("area", "voc07")
# k / 10, correctly rounded: a recall of exactly 3/10 reaches the 0.3 point (linspace and
# arange(0, 1.1, 0.1) give 0.30000000000000004 and would miss it)
VOC07_POINTS = np.arange(11) / 10


def _check(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None):
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [N, C]")
    ignore = np.zeros(scores.shape, bool) if ignore is None else np.asarray(ignore, bool)
    if ignore.shape != scores.shape:
        raise ValueError(f"ignore {ignore.shape} must match scores {scores.shape}")
    return scores, targets > 0, ignore


def _pr_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest first (as sklearn's
    `precision_recall_curve`); `positive` must hold at least one True."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return precision, recall


def average_precision(scores, targets, mode: str = "area", ignore=None) -> np.ndarray:
    """Per-class average precision.

    Args:
        scores: ndarray[N, C], higher means more confident.
        targets: ndarray[N, C], > 0 for a positive.
        mode: "area" (sklearn's average_precision_score) or "voc07" (11-point).
        ignore: bool ndarray[N, C] or None; True entries (VOC difficult) are removed from that
            class's ranking.

    Returns:
        float ndarray[C]; NaN for a class without a positive.
    """
    if mode not in AP_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {AP_MODES}")
    scores, positive, ignore = _check(scores, targets, ignore)
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = ~ignore[:, c]
        y = positive[keep, c]
        if not y.any():
            continue
        precision, recall = _pr_curve(scores[keep, c], y)
        if mode == "area":
            ap[c] = np.sum(np.diff(recall, prepend=0.0) * precision)
        else:
            ap[c] = np.mean([precision[recall >= t].max(initial=0.0) for t in VOC07_POINTS])
    return ap


def mean_average_precision(scores, targets, mode: str = "area", ignore=None) -> float:
    """The mean of `average_precision` over the classes that have a positive (NaN if none has)."""
    ap = average_precision(scores, targets, mode, ignore)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def multilabel_prf(scores, targets, threshold: float = 0.5, top_k: int | None = None, ignore=None) -> dict[str, float]:
    """Per-class (C*) and overall (O*) precision, recall and F1 (ML-GCN, ASL, Query2Label).

    A label is predicted where its score is >= threshold; with `top_k`, only an image's k highest
    scores can be predicted, still subject to the threshold (ML-GCN's top-3 protocol).

    Args:
        scores: ndarray[N, C] (sigmoid probabilities for the default threshold).
        targets: ndarray[N, C], > 0 for a positive.
        ignore: bool ndarray[N, C] or None; True entries count as neither predicted nor true.

    Returns:
        {"CP", "CR", "CF1", "OP", "OR", "OF1"} floats. CP and CR average over the classes that have
        a positive; a class with no prediction has precision 0; an F1 with P + R = 0 is 0.
    """
    scores, positive, ignore = _check(scores, targets, ignore)
    N, C = scores.shape
    predicted = scores >= threshold
    if top_k is not None:
        if not 1 <= top_k <= C:
            raise ValueError(f"top_k={top_k!r}: expected an int in [1, {C}]")
        rank = np.argsort(-scores, axis=1, kind="mergesort")[:, :top_k]  # (N, k)
        in_top = np.zeros_like(predicted)
        np.put_along_axis(in_top, rank, True, axis=1)
        predicted &= in_top
    predicted &= ~ignore
    positive = positive & ~ignore
    correct = (predicted & positive).sum(0)  # (C,)
    n_pred, n_true = predicted.sum(0), positive.sum(0)  # (C,) each
    has = n_true > 0
    per_p = np.divide(correct, n_pred, out=np.zeros(C), where=n_pred > 0)
    per_r = np.divide(correct, n_true, out=np.zeros(C), where=has)
    cp = float(per_p[has].mean()) if has.any() else float("nan")
    cr = float(per_r[has].mean()) if has.any() else float("nan")
    op = float(correct.sum() / n_pred.sum()) if n_pred.sum() else 0.0
    orr = float(correct.sum() / n_true.sum()) if n_true.sum() else float("nan")
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orr, "OF1": _f1(op, orr)}


def _f1(p: float, r: float) -> float:
    if np.isnan(p) or np.isnan(r):
        return float("nan")
    return 2 * p * r / (p + r) if p + r > 0 else 0.0
