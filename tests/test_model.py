"""The RGNN model: shapes for every switch, gradients per stage, gates and pooling (gradcheck, a
naive loop, the bin edges), backbones and their weights, stable checkpoint keys."""
import itertools

import pytest
import torch
from torch import nn
import torchvision

from rgnn.nn.backbones import build_backbone
from rgnn.nn.gates import FeatureGate, RegionGate, apply_gate, feature_gate, region_gate
from rgnn.nn.losses import balanced_multilabel_loss, localization_loss, multitask_loss, object_regions, region_targets
from rgnn.nn.model import GATES, POOL_LAYERS, RGNN, ModelConfig, whole_image_regions
from rgnn.nn.pooling import CrossRegionMaxPool, cross_region_max_pool
from rgnn.nn.pooling import area_bins
from rgnn.data.transforms import Batch
from rgnn.train.engine import StageModel, stage_losses
from rgnn.train.schedule import STAGES, set_trainable

torch.set_num_threads(1)

C = 4
SMALL_FC = 128  # the small backbone's fc6/fc7 width


def make_batch():
    """Two images of different sizes padded to 96x128; the second has no proposals."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=g)
    images[1, :, 64:, :] = 0
    images[1, :, :, 80:] = 0
    sizes = torch.tensor([[96, 128], [64, 80]])
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 24.0], [10.0, 20.0, 90.0, 80.0], [40.0, 8.0, 127.0, 95.0]]),
             torch.zeros(0, 4)]
    gt_boxes = [torch.tensor([[10.0, 20.0, 90.0, 80.0]]), torch.tensor([[0.0, 0.0, 80.0, 64.0]])]
    gt_labels = [torch.tensor([1]), torch.tensor([3])]
    return images, sizes, boxes, gt_boxes, gt_labels


@pytest.mark.parametrize("gate,pool_layer,scales", list(itertools.product(GATES, POOL_LAYERS, (1, 5))))
def test_output_shapes_small(gate, pool_layer, scales):
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C, gate=gate, pool_layer=pool_layer, scales=scales)).eval()
    images, sizes, boxes, _, _ = make_batch()
    D = {"fc6": SMALL_FC, "fc7": SMALL_FC}.get(pool_layer, C)
    assert model.pooled_dim == D
    assert model.classifier[0].in_features == scales * D
    with torch.no_grad():
        out = model(images, sizes, boxes)
        opened = model(images, sizes, boxes, open_gates=True)
        glob = model.forward_global(images)
    R = 3 + 1 + 0 + 1
    assert out.logits.shape == (2, C) and torch.isfinite(out.logits).all()
    assert glob.shape == (2, C) and torch.isfinite(glob).all()
    assert out.boxes.shape == (R, 4)
    assert out.image_index.tolist() == [0, 0, 0, 0, 1]
    assert out.area_ratio.shape == (R,)
    # the whole image is appended to each image's regions
    assert out.boxes[3].tolist() == [0, 0, 128, 96] and out.boxes[4].tolist() == [0, 0, 80, 64]
    assert out.area_ratio[[3, 4]].tolist() == [1.0, 1.0]
    assert torch.allclose(out.area_ratio[1], torch.tensor(80 * 60 / (96 * 128)))
    if gate == "none":
        assert out.gates is None
    else:
        assert out.gates.shape == ((R,) if gate == "region" else (R, D))
        assert ((out.gates > 0) & (out.gates < 1)).all()
    assert opened.gates is None and opened.logits.shape == (2, C)


@pytest.mark.parametrize("backbone,fc6,fc7", [("vgg16", 4096, 4096), ("resnet50", 1024, 1024)])
def test_output_shapes_large_backbones(backbone, fc6, fc7):
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=3, backbone=backbone, gate="feature", pool_layer="softmax")).eval()
    assert (model.backbone.fc6_dim, model.backbone.fc7_dim) == (fc6, fc7)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images, torch.tensor([[64, 64]]), [torch.tensor([[0.0, 0.0, 20.0, 30.0], [8.0, 8.0, 60.0, 40.0]])])
        glob = model.forward_global(images)
    assert out.logits.shape == (1, 3) and out.gates.shape == (3, 3) and glob.shape == (1, 3)
    assert torch.isfinite(out.logits).all() and torch.isfinite(glob).all()
    assert model.backbone(images).shape[-2:] == (4, 4)  # stride 16


def test_the_two_halves_make_the_forward_and_the_gate_reads_fc7():
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C)).eval()
    images, sizes = torch.randn(2, 3, 64, 80), torch.tensor([[64, 80], [48, 80]])
    boxes = [torch.tensor([[0.0, 0, 30, 30], [10, 10, 60, 40]]), torch.zeros(0, 4)]
    with torch.no_grad():
        model.gate.transform.weight.normal_()
        out = model(images, sizes, boxes)
        f = model.forward_features(images, sizes, boxes)
        head = model.forward_head(f)
        assert f.h6.shape[0] == f.h7.shape[0] == 4 and f.num_images == 2
        assert torch.equal(head.logits, out.logits) and torch.equal(model.gate(f.h7), out.gates)
        assert model.forward_features(images, sizes, boxes, open_gates=True).h7 is not None  # softmax of fc8 reads fc7
        fc6 = RGNN(ModelConfig(num_classes=C, pool_layer="fc6"))
        assert fc6.forward_features(images, sizes, boxes, open_gates=True).h7 is None  # nothing reads fc7


@pytest.mark.parametrize("gate", ["region", "feature"])
def test_a_gate_with_a_hidden_layer_on_the_pooled_trunk_feature(gate):
    """gate_input "roi": the gate reads fc6's input, not fc7; gate_hidden: one hidden layer before T, which starts
    at zero (every gate 0.5); stage 3 trains the whole gate."""
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C, gate=gate, gate_input="roi", gate_hidden=16, pool_layer="fc6")).eval()
    b = model.backbone
    assert model.gate.hidden[1].in_features == b.roi_dim != b.fc7_dim and model.gate.transform.in_features == 16
    images, sizes = torch.randn(2, 3, 64, 80), torch.tensor([[64, 80], [48, 80]])
    boxes = [torch.tensor([[0.0, 0, 30, 30], [10, 10, 60, 40]]), torch.zeros(0, 4)]
    with torch.no_grad():
        f = model.forward_features(images, sizes, boxes)
        assert f.h7 is None and f.u.shape == (4, b.roi_dim)  # fc6 pooled, the gate reads the trunk: no fc7
        assert torch.equal(f.u, b.region_inputs(b(images), torch.tensor([[0, 0, 0, 30, 30], [0, 10, 10, 60, 40],
                                                                         [0, 0, 0, 80, 64], [1, 0, 0, 80, 48.0]])))
        assert torch.allclose(model.forward_head(f).gates, torch.tensor(0.5))
    model.train()
    params = set_trainable(model, "gates")
    assert {id(p) for p in params} == {id(p) for p in model.gate.parameters()} and len(params) == 4
    stage_loss(model, "gates", make_batch()).backward()
    for p in params:  # the zero T passes no gradient to the hidden layer at the first step, but T gets one
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert model.gate.transform.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gate_hidden"):
        RGNN(ModelConfig(num_classes=C, gate_hidden=-1))
    with pytest.raises(ValueError, match="gate_input"):
        RGNN(ModelConfig(num_classes=C, gate_input="fc6"))


def test_detached_gates_take_no_gradient_from_the_classifier():
    """gate_loss "localization": in stage 4 the logits do not move the gate, eq. 7 still does; the values are the same."""
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C, gate_hidden=8)).train()
    nn.init.normal_(model.gate.transform.weight)
    images, sizes, boxes, _, _ = make_batch()
    assert StageModel(model, "joint", gate_loss="localization").detach_gates
    assert not StageModel(model, "gates", gate_loss="localization").detach_gates  # stage 3: eq. 7 only anyway
    assert not StageModel(model, "joint").detach_gates  # the paper's eq. 9 trains the gate
    with pytest.raises(ValueError, match="gate_loss"):
        StageModel(model, "joint", gate_loss="classification")
    torch.manual_seed(1)
    out = model(images, sizes, boxes, detach_gates=True)
    out.logits.sum().backward(retain_graph=True)
    assert all(p.grad is None for p in model.gate.parameters())
    assert model.classifier[0].weight.grad.abs().sum() > 0 and model.backbone.fc7[0].weight.grad.abs().sum() > 0
    out.gates.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate.parameters())
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks: the same values with the gradient kept
    same = model(images, sizes, boxes)
    assert torch.equal(same.logits, out.logits) and torch.equal(same.gates, out.gates)
    same.logits.sum().backward()
    assert model.gate.transform.weight.grad.abs().sum() > 0


def test_gate_iou_sets_eq8s_threshold_for_the_gate_loss_and_the_oracle():
    """theta of eq. 8 (--gate-iou) reaches the gates' training target and the oracle's fixed gates."""
    torch.manual_seed(0)
    images, sizes, boxes, gt_boxes, gt_labels = make_batch()
    batch = Batch(images, sizes, boxes, torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]]), torch.zeros(2, C, dtype=torch.bool),
                  gt_boxes, gt_labels, ["a", "b"])
    # regions: image 0's three proposals (IoU 0, 1 and 0.32 with its box) and whole image (0.39); image 1's whole image (1)
    paper, loose = [0.0, 1, 0, 0, 1], [0.0, 1, 1, 1, 1]
    oracle = RGNN(ModelConfig(num_classes=C, gate="none")).eval()
    with torch.no_grad():
        assert StageModel(oracle, "regional", oracle=True)(batch).gates.tolist() == paper
        assert StageModel(oracle, "regional", oracle=True, theta=0.3)(batch).gates.tolist() == loose
        model = RGNN(ModelConfig(num_classes=C)).eval()
        nn.init.normal_(model.gate.transform.weight, std=0.1)  # gates away from 0.5, where every error is 0.25
        out = StageModel(model, "gates")(batch)
        for theta, r in ((0.5, paper), (0.3, loose)):
            want = localization_loss(out.gates, torch.tensor(r), out.image_index, 2)
            assert stage_losses(out, batch, "gates", 0.0, C, theta=theta)["loss_loc"].item() == pytest.approx(want.item())
        assert stage_losses(out, batch, "gates", 0.0, C)["loss_loc"] != stage_losses(out, batch, "gates", 0.0, C,
                                                                                        theta=0.3)["loss_loc"]


def test_images_without_proposals_and_one_roi_call():
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C)).eval()
    calls = []
    model.backbone.roi.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    images, sizes, _, _, _ = make_batch()
    with torch.no_grad():
        out = model(images, sizes, [torch.zeros(0, 4), torch.zeros(0)])
    assert calls == [2]  # one RoI call for the whole batch, one region (the whole image) per image
    assert out.logits.shape == (2, C) and torch.isfinite(out.logits).all()
    assert out.image_index.tolist() == [0, 1]


def test_bad_inputs_raise():
    model = RGNN(ModelConfig(num_classes=C))
    images, sizes, boxes, _, _ = make_batch()
    with pytest.raises(ValueError, match="box lists"):
        model(images, sizes, boxes[:1])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        model(images, sizes, [torch.zeros(3, 5), boxes[1]])
    with pytest.raises(ValueError, match="image_sizes"):
        model(images, sizes[:, :1], boxes)
    for field, value in [("gate", "lstm"), ("pool_layer", "fc9"), ("scales", 3), ("backbone", "vgg19"),
                         ("num_classes", 0)]:
        with pytest.raises(ValueError, match=field):
            RGNN(ModelConfig(**{"num_classes": C, field: value}))


def stage_loss(model, stage, batch):
    images, sizes, boxes, gt_boxes, gt_labels = batch
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    if stage == "global":
        return balanced_multilabel_loss(model.forward_global(images), targets)
    out = model(images, sizes, boxes, open_gates=stage == "regional")
    loss_cls = balanced_multilabel_loss(out.logits, targets)
    if stage == "regional" or out.gates is None:
        return loss_cls
    t = region_targets(out, gt_boxes, gt_labels, C)
    loss_loc = localization_loss(out.gates, t, out.image_index, len(boxes))
    return loss_loc if stage == "gates" else multitask_loss(loss_cls, loss_loc, 0.5)


def test_every_parameter_gets_a_gradient_in_the_joint_stage():
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C)).train()
    assert set_trainable(model, "joint") == list(model.parameters())
    stage_loss(model, "joint", make_batch()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_only_gate_parameters_train_in_stage_3():
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C)).train()
    params = set_trainable(model, "gates")
    assert params == list(model.gate.parameters()) and len(params) == 2
    stage_loss(model, "gates", make_batch()).backward()
    for name, p in model.named_parameters():
        if name.startswith("gate."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("gate,pool_layer", list(itertools.product(GATES, POOL_LAYERS)))
def test_trainable_parameters_get_gradients_in_every_stage(gate, pool_layer):
    batch = make_batch()
    for stage in STAGES:
        if stage == "gates" and gate == "none":
            continue
        torch.manual_seed(0)
        model = RGNN(ModelConfig(num_classes=C, gate=gate, pool_layer=pool_layer)).train()
        if model.gate is not None:  # past its first step: a gate that starts at zero passes no
            nn.init.normal_(model.gate.transform.weight, std=0.01)  # gradient to fc7 when fc6 is pooled
        trainable = {id(p) for p in set_trainable(model, stage)}
        stage_loss(model, stage, batch).backward()
        for name, p in model.named_parameters():
            if id(p) in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, (stage, name)
            else:
                assert p.grad is None, (stage, name)


def test_gate_modules_match_their_functions():
    torch.manual_seed(0)
    u, x = torch.randn(5, 6), torch.rand(5, 3)
    rg, fg = RegionGate(6), FeatureGate(6, 3)
    a = rg(u)
    assert a.shape == (5,) and torch.allclose(a, torch.sigmoid(u @ rg.transform.weight.T + rg.transform.bias)[:, 0])
    assert torch.equal(apply_gate(x, a), a[:, None] * x)
    b = fg(u)
    assert b.shape == (5, 3) and torch.equal(apply_gate(x, b), b * x)
    assert torch.equal(fg.transform.weight, torch.zeros(3, 6)) and torch.equal(fg.transform.bias, torch.zeros(3))


@pytest.mark.parametrize("norm", [1.0, 100.0, 1000.0])
def test_gates_start_at_one_half_and_can_learn(norm):
    """fc7 of the small CNN has a norm near 100 (VGG's more): with Xavier-initialised T most gates
    started saturated and eq. 7 had no gradient. Zero-initialised T: every gate is 0.5."""
    torch.manual_seed(0)
    u = torch.relu(torch.randn(64, 128))
    u = u * norm / u.norm(dim=1, keepdim=True)  # (R, U) with ||u_i|| = norm
    for gate in (RegionGate(128), FeatureGate(128, 10)):
        g = gate(u)
        assert torch.equal(g, torch.full_like(g, 0.5))
        targets = (torch.arange(64) % 4 == 0).float()  # a quarter of the regions are objects
        targets = targets if g.dim() == 1 else targets[:, None].expand_as(g)
        ((g - targets) ** 2).sum().backward()  # eq. 7
        assert gate.transform.weight.grad.abs().sum() > 0 and gate.transform.bias.grad.abs().sum() > 0


def _fit_gate(gate: nn.Module, u: torch.Tensor, r: torch.Tensor, steps: int) -> torch.Tensor:
    """Stage 3 in miniature: Adam on eq. 7 alone; returns the gates in evaluation mode."""
    opt = torch.optim.Adam(gate.parameters(), lr=8e-4)
    for _ in range(steps):
        loss = ((gate(u) - r) ** 2).mean()  # eq. 7, one image
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gate.eval()(u).detach()


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(an object's gate > another region's)."""
    return (scores[positive][:, None] > scores[~positive][None, :]).float().mean().item()


def test_standardised_gate_input_learns_where_raw_fc7_inverts_the_gates():
    """Non-negative fc7 where the few object regions have the larger features, along the mean (as
    EfficientNet-Lite0's on the photo set): on the raw input eq. 7 closes every gate, objects' first,
    and the gates end inverted; standardised, they select the objects."""
    torch.manual_seed(0)
    R, U = 640, 64
    r = torch.zeros(R)
    r[::12] = 1.0  # 8% objects
    u = torch.relu(torch.randn(R, U) + 1.0) * (1.0 + 0.8 * r[:, None])  # (R, U): objects' u about 1.8x larger
    u = u + 0.6 * torch.randn(R, U).abs()  # noise, also non-negative
    raw = _fit_gate(RegionGate(U), u, r, steps=150)
    standardised = _fit_gate(RegionGate(U, standardise=True), u, r, steps=150)
    assert _auc(raw, r > 0) < 0.5 < 0.95 < _auc(standardised, r > 0)
    assert RegionGate(U, standardise=True).state_dict().keys() >= {"norm.running_mean", "norm.running_var"}
    assert set(RegionGate(U).state_dict()) == {"transform.weight", "transform.bias"}  # old checkpoints load


def test_gates_gradcheck():
    torch.manual_seed(0)
    R, U, D = 4, 5, 3
    u = torch.randn(R, U, dtype=torch.float64, requires_grad=True)
    x = torch.rand(R, D, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(1, U, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(1, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(D, U, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(D, dtype=torch.float64, requires_grad=True)
    # eq. 3 (region-level) and eq. 5 (feature-level) are autograd's
    assert torch.autograd.gradcheck(lambda u, x, w, b: apply_gate(x, region_gate(u, w, b)), (u, x, w1, b1))
    assert torch.autograd.gradcheck(lambda u, x, w, b: apply_gate(x, feature_gate(u, w, b)), (u, x, wd, bd))


def naive_bin(ratio: float, scales: int) -> int:
    if scales == 1:
        return 0
    for s, edge in enumerate((1 / 32, 1 / 16, 1 / 8, 1 / 4)):
        if ratio <= edge:
            return s
    return 4


def naive_pool(x, area_ratio, image_index, num_images, scales):
    D = x.shape[1]
    out = torch.zeros(num_images, scales, D, dtype=x.dtype)
    for n in range(num_images):
        for s in range(scales):
            rows = [i for i in range(len(x))
                    if image_index[i] == n and naive_bin(float(area_ratio[i]), scales) == s]
            if rows:
                out[n, s] = torch.stack([x[i] for i in rows]).max(0).values
    return out.reshape(num_images, scales * D)


@pytest.mark.parametrize("scales", [1, 5])
def test_cross_region_max_pool_matches_naive_loop(scales):
    g = torch.Generator().manual_seed(scales)
    R, D, N = 40, 6, 4  # image 3 gets no region
    x = torch.randn(R, D, generator=g)  # negative values too: empty bins are 0, not max with 0
    area_ratio = torch.cat([torch.tensor([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0]), torch.rand(R - 5, generator=g) ** 3])
    image_index = torch.randint(0, N - 1, (R,), generator=g)
    got = cross_region_max_pool(x, area_ratio, image_index, N, scales)
    assert got.shape == (N, scales * D)
    assert torch.equal(got, naive_pool(x, area_ratio, image_index, N, scales))
    assert torch.equal(got[N - 1], torch.zeros(scales * D))
    assert torch.equal(CrossRegionMaxPool(scales)(x, area_ratio, image_index, N), got)


def test_bin_edges_are_right_closed():
    ratio = torch.tensor([1e-4, 1 / 32, 1 / 32 + 1e-6, 1 / 16, 0.1, 1 / 8, 1 / 4, 1 / 4 + 1e-6, 0.5, 1.0, 1.2])
    assert area_bins(ratio).tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 4]
    assert area_bins(ratio.double()).tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 4, 4, 4]
    assert area_bins(ratio, scales=1).tolist() == [0] * len(ratio)
    with pytest.raises(ValueError, match="scales"):
        area_bins(ratio, scales=3)


def test_region_of_exactly_1_32_lands_in_the_first_bin_through_the_model():
    model = RGNN(ModelConfig(num_classes=C, gate="none", pool_layer="softmax")).eval()
    # 128x128 image: a 16x32 box is exactly 1/32 of it, a 64x64 box exactly 1/4
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 32.0], [0.0, 0.0, 64.0, 64.0]])]
    seen = {}
    model.pool.register_forward_hook(lambda m, args, out: seen.update(z=out))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128), torch.tensor([[128, 128]]), boxes)
    assert out.area_ratio.tolist() == [1 / 32, 1 / 4, 1.0]
    filled = (seen["z"].view(5, C) > 0).all(1)  # softmax outputs are > 0 where a bin has a region
    assert filled.tolist() == [True, False, False, True, True]


def test_cross_region_max_pool_gradcheck():
    g = torch.Generator().manual_seed(0)
    R, D, N = 12, 3, 2
    x = torch.randn(R, D, generator=g, dtype=torch.float64)
    area_ratio = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.9, 0.01, 0.3, 0.3, 0.6, 0.05, 1.0], dtype=torch.float64)
    image_index = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    group = image_index * 5 + area_bins(area_ratio)
    for g in (group, image_index):  # no ties within a bin (5 scales or 1), far beyond gradcheck's eps
        for k in g.unique():
            assert (x[g == k].sort(0).values.diff(dim=0) > 1e-3).all()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cross_region_max_pool(x, area_ratio, image_index, N, 5), (x,))
    assert torch.autograd.gradcheck(lambda x: cross_region_max_pool(x, area_ratio, image_index, N, 1), (x,))
    # section 3.3: only the arg-max region of each (bin, feature) gets the gradient
    cross_region_max_pool(x, area_ratio, image_index, N, 5).sum().backward()
    assert int(x.grad.sum()) == int(torch.unique(group).numel() * D)
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}


def test_pooling_rejects_bad_shapes():
    with pytest.raises(ValueError, match="area_ratio"):
        cross_region_max_pool(torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="scales"):
        CrossRegionMaxPool(2)


SMALL_REGION_KEYS = [
    "backbone.fc6.0.bias", "backbone.fc6.0.weight", "backbone.fc7.0.bias", "backbone.fc7.0.weight",
    "backbone.trunk.0.bias", "backbone.trunk.0.weight", "backbone.trunk.2.bias", "backbone.trunk.2.weight",
    "backbone.trunk.5.bias", "backbone.trunk.5.weight", "backbone.trunk.8.bias", "backbone.trunk.8.weight",
    "classifier.0.bias", "classifier.0.weight", "classifier.3.bias", "classifier.3.weight",
    "fc8.bias", "fc8.weight", "gate.transform.bias", "gate.transform.weight",
]


def test_state_dict_keys_are_stable():
    model = RGNN(ModelConfig(num_classes=C))
    assert sorted(model.state_dict()) == SMALL_REGION_KEYS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["backbone.fc6.0.weight"] == (SMALL_FC, 64 * 4 * 4)
    assert shapes["gate.transform.weight"] == (1, SMALL_FC)
    assert shapes["classifier.0.weight"] == (512, 5 * C)
    none = RGNN(ModelConfig(num_classes=C, gate="none"))
    assert sorted(none.state_dict()) == [k for k in SMALL_REGION_KEYS if not k.startswith("gate.")]
    assert none.gate is None


def test_imagenet_weights_load_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    ref = torchvision.models.resnet50()
    torch.nn.init.normal_(ref.bn1.running_mean)
    torch.save(ref.state_dict(), folder / "resnet50-11ad3fa6.pth")
    torch.manual_seed(2)
    backbone = build_backbone("resnet50", "imagenet")
    assert torch.equal(backbone.trunk.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.equal(backbone.trunk.bn1.running_mean, ref.bn1.running_mean)
    assert torch.equal(backbone.trunk.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)


def test_weights_path_in_backbone_layout(tmp_path):
    torch.manual_seed(3)
    src = build_backbone("small")
    torch.save(src.state_dict(), tmp_path / "small.pth")
    torch.manual_seed(4)
    dst = RGNN(ModelConfig(num_classes=C, weights=str(tmp_path / "small.pth"))).backbone
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    torch.save({"trunk.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        build_backbone("small", str(tmp_path / "bad.pth"))


def test_fixed_gates_scale_the_pooled_regions():
    """The ablation's oracle: gate values given from outside replace the gate unit's."""
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=C, gate="none")).eval()
    images, sizes, boxes, _, _ = make_batch()
    R = sum(len(b) + 1 for b in boxes)
    with torch.no_grad():
        ones = model(images, sizes, boxes, fixed_gates=torch.ones(R))
        zeros = model(images, sizes, boxes, fixed_gates=torch.zeros(R))
        plain = model(images, sizes, boxes)
    assert torch.allclose(ones.logits, plain.logits) and torch.equal(ones.gates, torch.ones(R))
    assert not torch.allclose(zeros.logits, plain.logits)


@pytest.mark.parametrize("gate", ["region", "feature"])
def test_an_open_whole_image_keeps_its_evidence_where_every_gate_closes(gate):
    """--whole-image-gate open: with every gate at 0 the classifier sees the whole image alone (as with
    no proposals); learned, it sees nothing. The gates returned (for eq. 7 and the metrics) stay the unit's."""
    images, sizes, boxes, _, _ = make_batch()
    logits = {}
    for whole in ("learned", "open"):
        torch.manual_seed(0)
        model = RGNN(ModelConfig(num_classes=C, gate=gate, whole_image_gate=whole)).eval()
        nn.init.constant_(model.gate.transform.bias, -1e4)  # every gate closed
        with torch.no_grad():
            out = model(images, sizes, boxes)
            alone = model(images, sizes, [torch.zeros(0, 4)] * 2)  # the whole images only
            oracle = model(images, sizes, boxes, fixed_gates=torch.zeros(len(out.boxes)))
        assert out.gates.max() == 0.0  # the unit's gates, the whole images' included
        logits[whole] = out.logits, alone.logits, oracle.logits
    closed, _, closed_oracle = logits["learned"]
    opened, whole_only, opened_oracle = logits["open"]
    assert torch.allclose(opened, whole_only) and torch.allclose(opened_oracle, whole_only)
    assert torch.allclose(closed, closed_oracle) and not torch.allclose(closed, whole_only, atol=1e-3)


def test_the_whole_image_is_each_images_last_region_and_gate_quality_leaves_it_out():
    images, sizes, boxes, gt_boxes, _ = make_batch()
    with torch.no_grad():
        out = RGNN(ModelConfig(num_classes=C)).eval()(images, sizes, boxes)
    whole = whole_image_regions(out.image_index)  # image 0: 3 proposals + whole image; image 1: whole image only
    assert whole.tolist() == [False, False, False, True, True]
    assert out.boxes[whole].tolist() == [[0, 0, 128, 96], [0, 0, 80, 64]]
    _, proposal = object_regions(out, gt_boxes)
    assert proposal.tolist() == [True, True, True, False, False]
