"""Losses of section 3.3 against naive formulas, and eq. 8's IoU targets on hand-made boxes."""
import math

import pytest
import torch

from rgnn.nn.losses import (balanced_multilabel_loss, localization_loss, localization_targets, multitask_loss,
                         region_targets)
from rgnn.nn.model import RGNNOutput


def naive_balanced(logits, targets):
    total = 0.0
    for row_l, row_y in zip(logits.tolist(), targets.tolist()):
        p = [1 / (1 + math.exp(-v)) for v in row_l]
        pos = [math.log(pj) for pj, y in zip(p, row_y) if y == 1]
        neg = [math.log(1 - pj) for pj, y in zip(p, row_y) if y == 0]
        total += (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)
    return -total / len(logits)


def test_balanced_loss_matches_eq6():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(5, 6, generator=g) < 0.3).double()
    targets[1] = 0  # no positives: only the negative term
    targets[2] = 1  # no negatives: only the positive term
    targets[3] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    got = balanced_multilabel_loss(logits, targets)
    assert got.shape == () and got.item() == pytest.approx(naive_balanced(logits, targets), rel=1e-12)


def test_balanced_loss_weights_positives_and_negatives_equally():
    # one positive among many negatives: each side is averaged on its own (the "balanced" of eq. 6)
    logits = torch.tensor([[2.0, -1.0, -1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0))))
    assert balanced_multilabel_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_loss_is_stable_for_large_logits():
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = balanced_multilabel_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(100.0, rel=1e-4)  # row 2 is wrong by 100 on each side, averaged over 2 rows
    with pytest.raises(ValueError, match="targets"):
        balanced_multilabel_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_localization_targets_on_hand_made_boxes():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    regions = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with gt 0
        [0.0, 0.0, 10.0, 5.0],     # IoU exactly 0.5: not > theta
        [0.0, 0.0, 10.0, 6.0],     # IoU 0.6
        [20.0, 20.0, 40.0, 30.0],  # IoU 0.5 with gt 1
        [20.0, 20.0, 40.0, 31.0],  # IoU 0.55 with gt 1
        [50.0, 50.0, 60.0, 60.0],  # no overlap
    ])
    assert localization_targets(regions, gt).tolist() == [1, 0, 1, 0, 1, 0]
    assert localization_targets(regions, gt, theta=0.7).tolist() == [1, 0, 0, 0, 0, 0]
    # class-aware (feature-level gates): gt 0 is class 2, gt 1 is class 0
    aware = localization_targets(regions, gt, torch.tensor([2, 0]), num_classes=3)
    assert aware.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    # two gt boxes of the same class both hit by one region
    same = localization_targets(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 9.0],
                                [0.0, 1.0, 10.0, 10.0]]), torch.tensor([1, 1]), num_classes=2)
    assert same.tolist() == [[0, 1]]


def test_localization_targets_without_ground_truth_and_bad_arguments():
    regions = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert localization_targets(regions, torch.zeros(0, 4)).tolist() == [0]
    assert localization_targets(regions, torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        localization_targets(regions, regions, torch.tensor([0]))
    with pytest.raises(ValueError, match="gt_labels"):
        localization_targets(regions, regions, torch.tensor([5]), num_classes=3)
    with pytest.raises(ValueError, match="boxes"):
        localization_targets(torch.zeros(2, 3), regions)


def naive_localization(gates, targets, image_index, num_images):
    total = 0.0
    for n in range(num_images):
        rows = [i for i in range(len(gates)) if image_index[i] == n]
        if rows:
            total += sum(float(((gates[i] - targets[i]) ** 2).sum()) for i in rows) / len(rows)
    return total / num_images


@pytest.mark.parametrize("shape", [(9,), (9, 4)])
def test_localization_loss_matches_eq7(shape):
    g = torch.Generator().manual_seed(1)
    gates = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(shape, generator=g) < 0.5).double()
    image_index = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    loss = localization_loss(gates, targets, image_index, 4)  # image 3 has no region: contributes 0
    assert loss.item() == pytest.approx(naive_localization(gates.detach(), targets, image_index, 4), rel=1e-9)
    loss.backward()
    # d/dg of (1/N)(1/T_i)(g - r)^2
    T = torch.tensor([4, 4, 4, 4, 2, 2, 3, 3, 3], dtype=torch.float64)
    T = T if len(shape) == 1 else T[:, None]
    assert torch.allclose(gates.grad, 2 * (gates.detach() - targets) / (4 * T))
    with pytest.raises(ValueError, match="targets"):
        localization_loss(gates, targets[:3], image_index, 4)


def test_multitask_loss_is_eq9():
    a, b = torch.tensor(0.7), torch.tensor(0.2)
    assert multitask_loss(a, b, 0.25).item() == pytest.approx(0.75)
    assert multitask_loss(a, b, 0).item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="lam"):
        multitask_loss(a, b, -1.0)


def fake_output(gates):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 40.0, 40.0],
                          [0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 32.0, 32.0]])
    image_index = torch.tensor([0, 0, 0, 1, 1])
    return RGNNOutput(torch.zeros(2, 3), gates, boxes, image_index, torch.ones(5))


def test_region_targets_for_a_batch():
    gt_boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 20.0, 19.0]])]
    gt_labels = [torch.tensor([2]), torch.tensor([1])]
    region = region_targets(fake_output(torch.rand(5)), gt_boxes, gt_labels, 3)
    assert region.tolist() == [1, 0, 0, 1, 0]
    aware = region_targets(fake_output(torch.rand(5, 3)), gt_boxes, gt_labels, 3, class_aware=True)
    assert aware.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]
    # eq. 8's bold 1 / 0: by default a feature gate learns the region's target on every dimension,
    # whether D is the class count (fc8, softmax) or a feature width (fc6/fc7)
    for D in (3, 7):
        plain = region_targets(fake_output(torch.rand(5, D)), gt_boxes, gt_labels, 3)
        assert plain.shape == (5, D) and plain.tolist() == [[v] * D for v in [1, 0, 0, 1, 0]]
    # the class-aware target is chosen by configuration, never by a shape coincidence
    with pytest.raises(ValueError, match="one dimension per class"):
        region_targets(fake_output(torch.rand(5, 7)), gt_boxes, gt_labels, 3, class_aware=True)
    with pytest.raises(ValueError, match="one dimension per class"):
        region_targets(fake_output(torch.rand(5)), gt_boxes, gt_labels, 3, class_aware=True)
    with pytest.raises(ValueError, match="gates"):
        region_targets(fake_output(None), gt_boxes, gt_labels, 3)
    with pytest.raises(ValueError, match="label lists"):
        region_targets(fake_output(torch.rand(5)), gt_boxes, gt_labels[:1], 3)
