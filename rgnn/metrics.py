"""Multi-label classification metrics: per-class AP, mAP, and CP/CR/CF1/OP/OR/OF1.

AP comes in two modes:
- "area": the area under the precision-recall curve as scikit-learn's `average_precision_score`
  computes it, sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (equal scores are one
  threshold); COCO and VOC 2012 practice.
- "voc07": the VOC 2007 11-point rule, the mean over t in {0, 0.1, ..., 1} of the best precision
  at recall >= t, on the same threshold-wise curve (so ties are handled the same way).

Metrics are computed on the whole split at once, never averaged over batches.
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


def pr_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest first (as sklearn's
    `precision_recall_curve`: equal scores are one threshold).

    Args:
        scores: ndarray[N]; positive: bool ndarray[N] with at least one True.

    Returns:
        (precision ndarray[K], recall ndarray[K]) for the K distinct scores.
    """
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
        precision, recall = pr_curve(scores[keep, c], y)
        if mode == "area":
            ap[c] = np.sum(np.diff(recall, prepend=0.0) * precision)
        else:
            ap[c] = np.mean([precision[recall >= t].max(initial=0.0) for t in VOC07_POINTS])
    return ap


def mean_ap(ap: np.ndarray) -> float:
    """mAP: the mean of per-class AP over the classes that have a positive (NaN, silently, if none has)."""
    ap = np.asarray(ap, np.float64)
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


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's `roc_auc_score`): the probability that a random
    positive scores above a random negative, ties counting one half. NaN without both kinds.

    Args:
        scores: ndarray[N]; positive: bool ndarray[N].
    """
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # first index of each run of equal scores
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[a:b] = (a + b + 1) / 2  # the mean 1-based rank of a tie
    rank_sum = np.empty(len(s))
    rank_sum[order] = ranks
    return float((rank_sum[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


GATE_METRICS = ("gate_auc", "gate_ap", "gate_mean_object", "gate_mean_other")


def gate_quality(gates: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """How well gate values pick eq. 8's object regions (region IoU > 0.5 with a ground-truth box).

    Args:
        gates: ndarray[R], one value per region (feature-level gates: their mean over dimensions).
        targets: ndarray[R] of 0/1, eq. 8's region target.

    Returns:
        {"gate_auc": ROC-AUC, "gate_ap": average precision (the area rule), "gate_mean_object",
        "gate_mean_other": the mean gate on object and on other regions}; NaN where undefined.
    """
    gates, positive = np.asarray(gates, np.float64).ravel(), np.asarray(targets).ravel() > 0
    if gates.shape != positive.shape:
        raise ValueError(f"gates {gates.shape} and targets {positive.shape} must both be [R]")
    ap = average_precision(gates[:, None], positive[:, None])[0] if len(gates) else float("nan")
    mean = lambda m: float(gates[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {"gate_auc": roc_auc(gates, positive), "gate_ap": float(ap),
            "gate_mean_object": mean(positive), "gate_mean_other": mean(~positive)}
