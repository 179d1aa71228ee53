"""The Regional Gating Neural Network (section 3, Figure 1).

Per image: shared conv layers -> RoI pooling of every region (the whole image is always added as
one more region, so no image has none) -> fc6 -> fc7 (the gate input u_i, section 4.2) -> the
pooled layer x_i (`pool_layer`, default softmax of fc8) -> gate a_i (section 3.1) -> x^_i = a_i x_i
-> multi-scale cross-region max pooling (section 3.2) -> z -> two FC layers -> C logits.

The paper calls the last layer "soft-max" but trains it with per-class binary cross-entropy
(eq. 6): the logits go through a per-class sigmoid (in the loss and at prediction time).

What `pool_layer` pools (Table 1's ablation, section 4.3). Cross-region max pooling gives an empty
bin 0 and a closed gate scales a feature to 0, so both mean "no evidence" only for non-negative
features. fc6 and fc7 follow a ReLU, softmax is positive; for `fc8` the pooled feature is
max(fc8, 0): a raw logit that is negative would be *raised* towards 0 by a closing gate and beaten
by an empty bin. The classifier of the global path (stage 1) uses the raw fc8 logits.

The model returns logits and gate values; losses live in rgnn.nn.losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgnn.nn.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, build_backbone, xavier_linear
from rgnn.boxes import box_area
from rgnn.nn.gates import FeatureGate, RegionGate, apply_gate
from rgnn.nn.pooling import SCALES, CrossRegionMaxPool

STAGES = ("global", "regional", "gates", "joint")  # the training stages of section 4.2, in order
GATES = ("none", "region", "feature")
GATE_NORMS = ("none", "batch")  # the gate's input u_i as it is (the paper's), or standardised (rgnn.nn.gates)
GATE_INPUTS = ("fc7", "roi")  # u_i: the region's fc7 (the paper's), or its pooled trunk feature (fc6's input)
POOL_LAYERS = ("fc6", "fc7", "fc8", "softmax")
WHOLE_IMAGE_GATES = ("learned", "open")  # the whole-image region gated like a proposal, or always at 1


@dataclass
class ModelConfig:
    """What an RGNN is; saved with every checkpoint (`dataclasses.asdict`).

    Attributes:
        num_classes: C (None in a training config until the data is known).
        backbone: "vgg16" (the paper's), "resnet50", "efficientnet_lite0" (ImageNet weights offline, the
            photo job) or "small" (CPU tests and the built-in demo).
        gate: "none" (gates fixed at 1), "region" (eq. 2) or "feature" (eq. 4).
        gate_norm: "none" (the gate reads u_i as it is, the paper's) or "batch" (u_i standardised by a
            BatchNorm without affine parameters first: rgnn.nn.gates._Gate says why).
        gate_input: u_i, what the gate reads: "fc7" (the paper's, section 4.2) or "roi" (the region's
            RoI-pooled trunk feature, fc6's input: for a frozen pretrained trunk, features that stage 1-2's
            classification has not reshaped).
        gate_hidden: 0 (the gate is one FC layer and a sigmoid, the paper's) or the width of one hidden
            layer before it (rgnn.nn.gates._Gate; dropout `dropout` before it).
        scales: 5 area bins or 1 (section 3.2).
        pool_layer: the layer that is gated and pooled: "fc6", "fc7", "fc8" or "softmax" (of fc8).
        hidden: width of the classifier's first FC layer (scales * D -> hidden -> C).
        weights: None (random init), "imagenet" (rgnn.nn.backbones.imagenet_file), or the path of a
            backbone state_dict (see rgnn.nn.backbones).
        dropout: after fc6, fc7 and the classifier's hidden layer.
        whole_image_gate: "learned" (the whole-image region is gated as every proposal is) or "open" (the
            classifier always sees it at gate 1: an object no proposal covers keeps the whole image's
            evidence, where eq. 8 would close every region of it; the gate unit still runs on it and
            eq. 7 still trains it there). Ours: the paper has no whole-image region.
        mean, std: the per-channel input normalisation the backbone's weights expect (images in
            [0, 1]; rgnn.nn.backbones.normalisation); they travel with the model so that prediction
            normalises as training did.
    """

    num_classes: int | None = None
    backbone: str = "small"
    gate: str = "region"
    gate_norm: str = "none"
    gate_input: str = "fc7"
    gate_hidden: int = 0
    scales: int = 5
    pool_layer: str = "softmax"
    hidden: int = 512
    weights: str | None = None
    dropout: float = 0.5
    whole_image_gate: str = "learned"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r}: expected an int >= 1")
        choices = {"backbone": BACKBONES, "gate": GATES, "gate_norm": GATE_NORMS, "gate_input": GATE_INPUTS,
                   "scales": SCALES, "pool_layer": POOL_LAYERS, "whole_image_gate": WHOLE_IMAGE_GATES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden={self.hidden!r}: expected an int >= 1")
        if not isinstance(self.gate_hidden, int) or isinstance(self.gate_hidden, bool) or self.gate_hidden < 0:
            raise ValueError(f"gate_hidden={self.gate_hidden!r}: expected an int >= 0")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v) or (name == "std" and min(v) <= 0):
                raise ValueError(f"{name}={v!r}: expected three numbers (one per RGB channel{', > 0' if name == 'std' else ''})")


def whole_image_regions(image_index: Tensor) -> Tensor:
    """long Tensor[R] (`RGNN.regions`' image index) -> bool Tensor[R]: each image's whole-image region,
    the last of its regions."""
    last = torch.ones_like(image_index, dtype=torch.bool)
    last[:-1] = image_index[1:] != image_index[:-1]
    return last


@dataclass
class RGNNOutput:
    """What `RGNN.forward` returns for a batch of N images with R regions in all.

    Attributes:
        logits: Tensor[N, C], the classifier's output before the per-class sigmoid.
        gates: Tensor[R] (region-level), Tensor[R, D] (feature-level, D = the pooled layer's
            dimension), or None (gate "none", or gates held open).
        boxes: Tensor[R, 4], every region (x1, y1, x2, y2 in input pixels), image by image, each
            image's proposals followed by its whole-image box.
        image_index: long Tensor[R], the image of each region.
        area_ratio: Tensor[R], region area / image area (what picks the scale bin).
    """

    logits: Tensor
    gates: Tensor | None
    boxes: Tensor
    image_index: Tensor
    area_ratio: Tensor

    @classmethod
    def whole_images(cls, logits: Tensor, image_sizes: Tensor) -> "RGNNOutput":
        """The global path's output (stage 1): one region per image, the whole image, no gate.

        Args:
            logits: Tensor[N, C]; image_sizes: long Tensor[N, 2], (h, w).
        """
        N = len(logits)
        h, w = image_sizes.to(logits.device, torch.float32).unbind(1)  # (N,) each
        zero = torch.zeros_like(h)
        return cls(logits, None, torch.stack([zero, zero, w, h], 1), torch.arange(N, device=logits.device),
                   torch.ones(N, device=logits.device))


@dataclass
class RegionFeatures:
    """The regions' half of the model (`RGNN.forward_features`) for N images with R regions in all.

    Attributes:
        h6: Tensor[R, fc6_dim]; h7: Tensor[R, fc7_dim], or None where nothing reads it.
        u: Tensor[R, U], the gate's input u_i (h7, or fc6's input for gate_input "roi"), or None where no gate runs.
        boxes, image_index, area_ratio: as RGNNOutput's.
        num_images: N.
    """

    h6: Tensor
    h7: Tensor | None
    u: Tensor | None
    boxes: Tensor
    image_index: Tensor
    area_ratio: Tensor
    num_images: int


class RGNN(nn.Module):
    """See the module docstring. Parts: `backbone` (trunk, fc6, fc7), `fc8`, `gate`, `pool`, `classifier`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.weights, cfg.dropout)
        C = cfg.num_classes
        # a new classification layer on features that may be pretrained: N(0, 0.01^2) as Fast R-CNN
        # initialises its class scores. Xavier on the stand-in's fc7 (norm ~37) gave logits of std 6
        # and a first global epoch at loss 4.9, three times chance.
        self.fc8 = nn.Linear(self.backbone.fc7_dim, C)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        D = self.pooled_dim
        # section 4.2: the gate reads fc7 (u_i; fc6's input with gate_input "roi") and scales the pooled layer (x_i)
        U = self.backbone.fc7_dim if cfg.gate_input == "fc7" else self.backbone.roi_dim
        options = dict(standardise=cfg.gate_norm == "batch", hidden=cfg.gate_hidden, dropout=cfg.dropout)
        if cfg.gate == "region":
            self.gate = RegionGate(U, **options)
        elif cfg.gate == "feature":
            self.gate = FeatureGate(U, D, **options)
        else:
            self.gate = None
        self.pool = CrossRegionMaxPool(cfg.scales)
        self.classifier = nn.Sequential(xavier_linear(cfg.scales * D, cfg.hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(cfg.dropout), xavier_linear(cfg.hidden, C))

    @property
    def pooled_dim(self) -> int:
        """D, the dimension of the gated and pooled layer x_i."""
        return {"fc6": self.backbone.fc6_dim, "fc7": self.backbone.fc7_dim}.get(self.cfg.pool_layer,
                                                                              self.cfg.num_classes)

    def _gated(self, open_gates: bool) -> bool:
        return self.gate is not None and not open_gates

    def _runs_fc7(self, gated: bool) -> bool:
        """fc7 feeds the pooled layer (fc7, fc8, softmax) or the gate (u_i)."""
        return (gated and self.cfg.gate_input == "fc7") or self.cfg.pool_layer != "fc6"

    def used_modules(self, regions: bool = True, open_gates: bool = False) -> list[nn.Module]:
        """The modules with parameters that a forward pass runs.

        Args:
            regions: the regional path (`forward`); False: the global path (`forward_global`).
            open_gates: as `forward`'s argument.

        The regional path skips fc8 when fc6/fc7 is pooled, and fc7 when fc6 is pooled and no gate
        reads it; rgnn.train.schedule trains only what runs (every trainable parameter gets a gradient).
        """
        b = self.backbone
        if not regions:
            return [b.trunk, b.fc6, b.fc7, self.fc8]
        gated = self._gated(open_gates)
        used = [b.trunk, b.fc6]
        if self._runs_fc7(gated):
            used.append(b.fc7)
        if self.cfg.pool_layer in ("fc8", "softmax"):
            used.append(self.fc8)
        if gated:
            used.append(self.gate)
        return used + [self.classifier]

    def regions(self, image_sizes: Tensor, boxes: list[Tensor], device: torch.device,
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Every region of the batch with the whole images appended.

        Args:
            image_sizes: long Tensor[N, 2], (h, w) of each unpadded image.
            boxes: N x Tensor[T_i, 4] (T_i may be 0).

        Returns:
            (boxes Tensor[R, 4], image_index long Tensor[R], area_ratio Tensor[R]), R = sum(T_i + 1).
        """
        N = len(boxes)
        if image_sizes.shape != (N, 2):
            raise ValueError(f"image_sizes must be Tensor[N, 2] with N={N} (one box list per image), "
                             f"got shape {tuple(image_sizes.shape)}")
        sizes = image_sizes.to(device=device, dtype=dtype)
        h, w = sizes.unbind(1)  # (N,) each
        zero = torch.zeros_like(h)
        whole = torch.stack([zero, zero, w, h], 1)  # (N, 4)
        parts = []
        for i, b in enumerate(boxes):
            b = b.to(device=device, dtype=dtype)
            if b.numel() == 0:
                b = b.reshape(0, 4)
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be Tensor[T, 4] (x1, y1, x2, y2), got shape {tuple(b.shape)}")
            parts += [b, whole[i:i + 1]]
        all_boxes = torch.cat(parts)  # (R, 4)
        counts = [len(b) + 1 for b in parts[::2]]
        image_index = torch.repeat_interleave(torch.arange(N, device=device), torch.tensor(counts, device=device),
                                              output_size=sum(counts))  # (R,), no device sync
        area_ratio = box_area(all_boxes) / (h * w)[image_index]  # (R,)
        return all_boxes, image_index, area_ratio

    def _pooled_layer(self, h6: Tensor, h7: Tensor | None) -> Tensor:
        layer = self.cfg.pool_layer
        if layer == "fc6":
            return h6
        if layer == "fc7":
            return h7
        logits = self.fc8(h7)  # (R, C)
        return F.relu(logits) if layer == "fc8" else torch.softmax(logits, dim=1)

    def forward_features(self, images: Tensor, image_sizes: Tensor, boxes: list[Tensor],
                         open_gates: bool = False) -> RegionFeatures:
        """The regions' half: the shared trunk once per image, one RoI call for the batch, fc6 and fc7.

        Args:
            images: Tensor[N, 3, H, W], normalised, zero-padded at the bottom and right.
            image_sizes: long Tensor[N, 2], (h, w) of each unpadded image.
            boxes: N x float Tensor[T_i, 4], x1 y1 x2 y2 in the pixels of `images` (T_i may be 0).
            open_gates: as `forward`'s (fc7 is skipped when nothing reads it).
        """
        N = len(images)
        if len(boxes) != N:
            raise ValueError(f"got {len(boxes)} box lists for {N} images")
        all_boxes, image_index, area_ratio = self.regions(image_sizes, boxes, images.device, images.dtype)
        rois = torch.cat([image_index.unsqueeze(1).to(images.dtype), all_boxes], 1)  # (R, 5)
        b, gated = self.backbone, self._gated(open_gates)
        pooled = b.region_inputs(b(images), rois)  # (R, roi_dim): one RoI call
        h6 = b.fc6(pooled)  # (R, fc6_dim): batched FC layers
        h7 = b.fc7(h6) if self._runs_fc7(gated) else None  # (R, fc7_dim)
        u = (h7 if self.cfg.gate_input == "fc7" else pooled) if gated else None  # (R, U): u_i
        return RegionFeatures(h6, h7, u, all_boxes, image_index, area_ratio, N)

    def forward_head(self, f: RegionFeatures, open_gates: bool = False, fixed_gates: Tensor | None = None,
                     detach_gates: bool = False) -> RGNNOutput:
        """The gating half: the pooled layer x_i, its gate, cross-region max pooling, the classifier.

        detach_gates: the classifier reads the gate values without a gradient into the gate (the logits
        then train everything but the gate; the returned gates keep theirs, for eq. 7)."""
        x = self._pooled_layer(f.h6, f.h7)  # (R, D)
        gates = self.gate(f.u) if self._gated(open_gates) else fixed_gates  # (R,) or (R, D)
        if gates is not None:
            applied = gates.detach() if detach_gates else gates
            if self.cfg.whole_image_gate == "open":
                whole = whole_image_regions(f.image_index)  # (R,)
                applied = applied.masked_fill(whole if applied.dim() == 1 else whole.unsqueeze(1), 1.0)
            x = apply_gate(x, applied)  # eq. 2 / eq. 4
        z = self.pool(x, f.area_ratio, f.image_index, f.num_images)  # (N, scales*D)
        return RGNNOutput(self.classifier(z), gates, f.boxes, f.image_index, f.area_ratio)

    def forward(self, images: Tensor, image_sizes: Tensor, boxes: list[Tensor], open_gates: bool = False,
                fixed_gates: Tensor | None = None, detach_gates: bool = False) -> RGNNOutput:
        """The regional path (stages 2-4): `forward_head(forward_features(...))`.

        Args:
            images, image_sizes, boxes: as `forward_features`'.
            open_gates: gates fixed at 1 and not run (stage 2).
            fixed_gates: Tensor[R], region-level gate values to use instead of the gate unit's (the
                ablation's oracle: eq. 8's targets); R counts every region, whole images included.
            detach_gates: as `forward_head`'s.
        """
        return self.forward_head(self.forward_features(images, image_sizes, boxes, open_gates), open_gates,
                                 fixed_gates, detach_gates)

    def forward_global(self, images: Tensor) -> Tensor:
        """Stage 1 and the global baseline: Tensor[N, 3, H, W] (size-normalised) -> fc8 logits Tensor[N, C]."""
        return self.fc8(self.backbone.global_features(images))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"num_classes={c.num_classes}, gate={c.gate!r}, scales={c.scales}, pool_layer={c.pool_layer!r}"
