"""AP against scikit-learn and a naive 11-point rule (ties included), the ignore mask, CP/CR/CF1/OP/OR/OF1."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from rgnn.metrics import average_precision, gate_quality, mean_ap, multilabel_prf, roc_auc


def random_set(seed, n=60, c=5, decimals=1):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.3).astype(np.float32)
    scores = np.round(0.6 * targets + rng.random((n, c)), decimals)  # rounding makes many ties
    targets[0] = 1  # every class has a positive
    return scores, targets


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 1), (2, 3), (3, 0)])
def test_area_ap_matches_sklearn_with_ties(seed, decimals):
    scores, targets = random_set(seed, decimals=decimals)
    got = average_precision(scores, targets)
    want = [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def naive_voc07(scores, positive):
    """The 11-point rule over thresholds: every distinct score is one operating point."""
    points = []
    for thr in np.unique(scores):
        sel = scores >= thr
        tp = np.sum(sel & positive)
        points.append((tp / positive.sum(), tp / sel.sum()))
    total = 0.0
    for t in np.arange(11) / 10:
        ok = [p for r, p in points if r >= t]
        total += max(ok) if ok else 0.0
    return total / 11


@pytest.mark.parametrize("seed,decimals", [(0, 1), (4, 2), (5, 6)])
def test_voc07_ap_matches_naive_11_point_rule(seed, decimals):
    scores, targets = random_set(seed, decimals=decimals)
    got = average_precision(scores, targets, mode="voc07")
    want = [naive_voc07(scores[:, c], targets[:, c] > 0) for c in range(scores.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_ap_by_hand():
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    targets = np.array([[1], [0], [1], [0]])
    assert average_precision(scores, targets)[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(scores, targets, mode="voc07")[0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # a tie between a positive and a negative is one threshold: precision 1/2 at recall 1/2
    tied = np.array([[0.9], [0.9], [0.7], [0.6]])
    assert average_precision(tied, targets)[0] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_class_without_positives_is_nan_and_skipped_by_the_mean():
    scores, targets = random_set(6)
    targets[:, 2] = 0
    ap = average_precision(scores, targets)
    assert np.isnan(ap[2]) and not np.isnan(np.delete(ap, 2)).any()
    assert mean_ap(ap) == pytest.approx(np.delete(ap, 2).mean())
    assert np.isnan(mean_ap(average_precision(scores, np.zeros_like(targets))))


def test_ignore_mask_removes_entries_from_that_class_only():
    scores, targets = random_set(7)
    ignore = np.zeros(scores.shape, bool)
    ignore[5:15, 1] = True
    ignore[:, 3] = targets[:, 3] > 0  # every positive of class 3 ignored: NaN
    got = average_precision(scores, targets, ignore=ignore)
    keep = ~ignore[:, 1]
    assert got[1] == pytest.approx(average_precision_score(targets[keep, 1], scores[keep, 1]))
    assert np.isnan(got[3])
    for c in (0, 2, 4):
        assert got[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]))
    assert got[1] != pytest.approx(average_precision(scores, targets)[1])  # the mask did something
    voc = average_precision(scores, targets, mode="voc07", ignore=ignore)
    assert voc[1] == pytest.approx(naive_voc07(scores[keep, 1], targets[keep, 1] > 0))


def test_bad_arguments_raise():
    scores, targets = random_set(8)
    with pytest.raises(ValueError, match="mode"):
        average_precision(scores, targets, mode="coco")
    with pytest.raises(ValueError, match="targets"):
        average_precision(scores, targets[:, :2])
    with pytest.raises(ValueError, match="ignore"):
        average_precision(scores, targets, ignore=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="top_k"):
        multilabel_prf(scores, targets, top_k=0)


def naive_prf(scores, targets, threshold, top_k=None):
    N, C = scores.shape
    pred = np.zeros((N, C), bool)
    for i in range(N):
        allowed = range(C) if top_k is None else sorted(range(C), key=lambda c: (-scores[i, c], c))[:top_k]
        for c in allowed:
            pred[i, c] = scores[i, c] >= threshold
    pos = targets > 0
    cp, cr = [], []
    for c in range(C):
        if pos[:, c].sum() == 0:
            continue
        tp = np.sum(pred[:, c] & pos[:, c])
        cp.append(tp / pred[:, c].sum() if pred[:, c].sum() else 0.0)
        cr.append(tp / pos[:, c].sum())
    CP, CR = np.mean(cp), np.mean(cr)
    OP = np.sum(pred & pos) / pred.sum()
    OR = np.sum(pred & pos) / pos.sum()
    return {"CP": CP, "CR": CR, "CF1": 2 * CP * CR / (CP + CR), "OP": OP, "OR": OR, "OF1": 2 * OP * OR / (OP + OR)}


@pytest.mark.parametrize("threshold,top_k", [(0.5, None), (0.8, None), (0.5, 3), (0.0, 1)])
def test_multilabel_prf_matches_naive_counts(threshold, top_k):
    scores, targets = random_set(9, decimals=6)
    targets[:, 4] = 0  # a class without positives is left out of CP/CR
    got = multilabel_prf(scores / scores.max(), targets, threshold, top_k)
    want = naive_prf(scores / scores.max(), targets, threshold, top_k)
    assert set(got) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_multilabel_prf_by_hand():
    scores = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 1]])
    m = multilabel_prf(scores, targets)  # predicted: (0,0) (0,1) (1,1); correct: (0,0) (1,1)
    assert m["OP"] == pytest.approx(2 / 3) and m["OR"] == pytest.approx(2 / 3)
    assert m["CP"] == pytest.approx((1 + 0.5 + 0) / 3) and m["CR"] == pytest.approx((1 + 1 + 0) / 3)
    top1 = multilabel_prf(scores, targets, top_k=1)  # predicted: (0,0) (1,1)
    assert top1["OP"] == pytest.approx(1.0) and top1["OR"] == pytest.approx(2 / 3)


def test_roc_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    for _ in range(5):
        scores = np.round(rng.uniform(size=200), 1)  # many ties
        positive = rng.uniform(size=200) < 0.3
        assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    assert np.isnan(roc_auc(np.ones(3), np.zeros(3, bool)))


def test_gate_quality_against_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    targets = (rng.uniform(size=300) < 0.25).astype(np.float32)
    gates = np.clip(0.3 * targets + rng.uniform(0, 0.8, 300), 0, 1)
    q = gate_quality(gates, targets)
    assert q["gate_auc"] == pytest.approx(roc_auc_score(targets, gates))
    assert q["gate_ap"] == pytest.approx(average_precision_score(targets, gates))
    assert q["gate_mean_object"] == pytest.approx(gates[targets > 0].mean())
    assert q["gate_mean_other"] == pytest.approx(gates[targets == 0].mean())
    assert gate_quality(1 - targets, targets)["gate_auc"] == 0.0  # gates on clutter only: the worst
