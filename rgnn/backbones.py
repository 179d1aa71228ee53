"""Backbones: the shared conv trunk (stride 16), the RoI op that replaces pool5, and fc6/fc7.

Section 3, step 2 and section 4.2: the conv layers are shared by all regions of an image, RoI
pooling projects each region to a fixed-size map, FC layers turn it into a region vector.

- `vgg16`, the paper's: conv1_1..conv5_3 of torchvision's VGG-16; pool5 replaced by
  `roi_pool` 7x7 at scale 1/16 (Fast R-CNN); fc6/fc7 (4096) are torchvision's classifier[0] and
  classifier[3], so ImageNet weights map over unchanged.
- `resnet50`: torchvision's ResNet-50 with layer4 dilated instead of strided
  (`replace_stride_with_dilation=[False, False, True]`), so the whole trunk conv1..layer4 is
  shared and its 2048-channel output is at stride 16; `roi_align` 7x7 (aligned, 2 samples per
  bin) on it, average pooling to 2048, then new fc6/fc7 (1024, Xavier). Running layer4 once per
  image rather than once per region (the C4 head of Faster R-CNN) keeps a region as cheap as in
  VGG (two FC layers), which the paper's hundreds of regions need. BatchNorm is frozen at its
  (ImageNet) statistics (`FrozenBatchNorm2d`), as in torchvision's detection models: batches of
  one or two zero-padded free-size images make poor batch statistics.
- `small`: four 3x3 stride-2 conv layers (32, 64, 128, 64 channels; stride 16), `roi_pool` 4x4
  (an image of ~128-192 px gives an 8-12 cell map; 7x7 bins would only repeat cells), fc6/fc7 of
  128. It trains in seconds on a CPU: tests and the built-in demo. The narrow last conv and fc
  layers keep 200 regions' head at about half the trunk's cost, so an RGNN step stays within the
  issue's 1.5x of a global step (benchmarks/model_step.py; 256-wide fc layers on 128 channels
  cost 2.7x).

The global path (stage 1, section 4.2) pools the whole feature map to the RoI op's output size:
adaptive max pooling (what pool5 and RoI max pooling compute) for vgg16/small, adaptive
average pooling for resnet50 (what RoIAlign and ResNet's own head compute).

Weights (`weights` argument): None gives random init; "imagenet" loads torchvision's
`VGG16_Weights.IMAGENET1K_V1` / `ResNet50_Weights.IMAGENET1K_V2` file from
`torch.hub.get_dir()/checkpoints/` (never downloaded: a missing file is a FileNotFoundError that
names it, its URL and the folder); any other string is the path of a state_dict, either in
torchvision's layout for that architecture (the same file as ImageNet's, or a fine-tuned one) or
in this module's layout (`trunk.*`, `fc6.*`, `fc7.*`, as `Backbone.state_dict()` writes it).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d, RoIAlign, RoIPool

BACKBONES = ("vgg16", "resnet50", "small")
STRIDE = 16


def xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A new FC layer, Xavier-initialised with zero bias (section 4.2)."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _fc(linear: nn.Linear, dropout: float) -> nn.Sequential:
    """fc -> ReLU -> dropout, as VGG's fc6 and fc7."""
    return nn.Sequential(linear, nn.ReLU(inplace=True), nn.Dropout(dropout))


class Backbone(nn.Module):
    """The shared trunk and the per-region fc6/fc7 head of one architecture.

    Attributes:
        trunk: images Tensor[N, 3, H, W] -> features Tensor[N, F, ~H/16, ~W/16].
        roi: (features, rois Tensor[R, 5] of (image index, x1, y1, x2, y2) in input pixels)
            -> Tensor[R, F, k, k].
        global_pool: features -> Tensor[N, F, k, k] (the whole image, stage 1).
        neck: Tensor[R, F, k, k] -> Tensor[R, fc6 input] (flatten, or average pool for ResNet).
        fc6, fc7: Tensor[R, .] -> Tensor[R, fc6_dim] -> Tensor[R, fc7_dim], each fc, ReLU, dropout.
    """

    def __init__(self, name: str, trunk: nn.Module, roi: nn.Module, global_pool: nn.Module, neck: nn.Module,
                 fc6: nn.Sequential, fc7: nn.Sequential):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.roi = roi
        self.global_pool = global_pool
        self.neck = neck
        self.fc6 = fc6
        self.fc7 = fc7
        self.fc6_dim = fc6[0].out_features
        self.fc7_dim = fc7[0].out_features

    def forward(self, images: Tensor) -> Tensor:
        return self.trunk(images)  # (N, F, H/16, W/16)

    def region_inputs(self, features: Tensor, rois: Tensor) -> Tensor:
        """Tensor[N, F, h, w], rois Tensor[R, 5] -> fc6 inputs Tensor[R, fc6 input]: one RoI call for the batch.

        RoI pooling runs in float32 under autocast too (features cast up, box coordinates kept: in
        bfloat16 a coordinate near 1000 px would round to 4 px), as torchvision's CUDA autocast does;
        its CPU kernel refuses mixed types."""
        return self.neck(self.roi(features.float(), rois))  # (R, F*k*k) or (R, F)

    def global_inputs(self, features: Tensor) -> Tensor:
        """Tensor[N, F, h, w] -> fc6 inputs Tensor[N, fc6 input] of the whole images (stage 1)."""
        return self.neck(self.global_pool(features))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={STRIDE}, fc6_dim={self.fc6_dim}, fc7_dim={self.fc7_dim}"


def imagenet_file(name: str) -> Path:
    """The local file of torchvision's ImageNet weights for `name`; FileNotFoundError if absent."""
    from torchvision.models import ResNet50_Weights, VGG16_Weights

    enums = {"vgg16": VGG16_Weights.IMAGENET1K_V1, "resnet50": ResNet50_Weights.IMAGENET1K_V2}
    if name not in enums:
        raise ValueError(f"no ImageNet weights for backbone {name!r}: expected one of {tuple(enums)}")
    url = enums[name].url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(urlparse(url).path)
    if not file.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for {name} not found: {file.name} is not in {folder}. Nothing is downloaded "
            f"at run time: fetch {url} and put it there as {file} (or pass weights=PATH to a state_dict).")
    return file


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors)")
    return state


def _load(module: nn.Module, state: dict[str, Tensor], source: str, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source} does not fit {what}: {e}") from None


def _vgg16(dropout: float) -> tuple[nn.Module, Backbone]:
    net = torchvision.models.vgg16(weights=None)
    # features[30] is pool5, replaced by RoI max pooling (section 4.2)
    return net, Backbone("vgg16", trunk=net.features[:30], roi=RoIPool(7, 1 / STRIDE),
                         global_pool=nn.AdaptiveMaxPool2d(7), neck=nn.Flatten(1),
                         fc6=_fc(net.classifier[0], dropout), fc7=_fc(net.classifier[3], dropout))


def _resnet50(dropout: float) -> tuple[nn.Module, Backbone]:
    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True],
                                      norm_layer=FrozenBatchNorm2d)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    trunk = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # (R, 2048)
    return net, Backbone("resnet50", trunk=trunk, roi=RoIAlign(7, 1 / STRIDE, sampling_ratio=2, aligned=True),
                         global_pool=nn.AdaptiveAvgPool2d(7), neck=neck,
                         fc6=_fc(xavier_linear(2048, 1024), dropout), fc7=_fc(xavier_linear(1024, 1024), dropout))


SMALL_WIDTHS = (32, 64, 128, 64)
SMALL_ROI = 4
SMALL_FC = 128


def _small(dropout: float) -> tuple[None, Backbone]:
    # conv 5x5 at stride 2 (two periods of a fine texture in view), then VGG-like blocks of
    # conv 3x3 and 2x2 max pooling: stride 16
    layers, c = [], 3
    for i, w in enumerate(SMALL_WIDTHS):
        conv = nn.Conv2d(c, w, 5, stride=2, padding=2) if i == 0 else nn.Conv2d(c, w, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2)] if i else [])
        c = w
    return None, Backbone("small", trunk=nn.Sequential(*layers), roi=RoIPool(SMALL_ROI, 1 / STRIDE),
                          global_pool=nn.AdaptiveMaxPool2d(SMALL_ROI), neck=nn.Flatten(1),
                          fc6=_fc(xavier_linear(c * SMALL_ROI ** 2, SMALL_FC), dropout),
                          fc7=_fc(xavier_linear(SMALL_FC, SMALL_FC), dropout))


def build_backbone(name: str, weights: str | None = None, dropout: float = 0.5) -> Backbone:
    """The trunk, RoI op and fc6/fc7 of `name` ("vgg16", "resnet50", "small").

    Args:
        weights: None (random init), "imagenet" (torchvision's file from the local torch hub cache),
            or the path of a state_dict (torchvision's layout for vgg16/resnet50, or Backbone's own).
        dropout: the dropout after fc6 and fc7.
    """
    builders = {"vgg16": _vgg16, "resnet50": _resnet50, "small": _small}
    if name not in builders:
        raise ValueError(f"backbone={name!r}: expected one of {BACKBONES}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}: expected a probability in [0, 1)")
    # find the weights before building: a missing file fails at once
    source = imagenet_file(name) if weights == "imagenet" else weights
    state = None if source is None else _read_state_dict(source)
    net, backbone = builders[name](dropout)
    if state is None:
        return backbone
    if weights != "imagenet" and any(k.startswith("trunk.") for k in state):
        _load(backbone, state, str(weights), f"the {name} backbone")
    elif net is not None:
        _load(net, state, str(source), f"torchvision's {name}")
    else:
        raise ValueError(f"{weights}: a {name} backbone state_dict needs keys trunk.*, fc6.*, fc7.*")
    return backbone
