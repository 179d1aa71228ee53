"""What every image goes through before the network, in training, evaluation and prediction alike.

Section 4.2: stages 2-4 see free-size images (Fast R-CNN's shorter side S, longer side capped),
stage 1 sees size-normalised squares with no regions. The proposals (top T by score) and the
ground-truth boxes are scaled with the image; the model appends the whole-image region itself.
Normalisation uses the mean and std that travel with the model's config (rgnn.nn.model.ModelConfig,
as timm's pretrained cfg carries them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from rgnn.boxes import scale_boxes


MIN_SIDE = 16  # pixels: one cell of the stride-16 feature map
MAX_SIDE = 4096  # pixels: the largest shorter side (or square) an input may ask for

@dataclass
class InputConfig:
    """The network's input (section 4.2); None fields are filled by the training recipe.

    Attributes:
        image_size: shorter side S of the free-size regional input (stages 2-4).
        max_size: cap on the longer side (default 2 x S).
        global_size: side of the size-normalised square of stage 1.
        max_regions: T, the top proposals kept per image (the whole image is added by the model).
    """

    image_size: int | None = None
    max_size: int | None = None
    global_size: int | None = None
    max_regions: int | None = None

    @property
    def stored_proposals(self) -> int:
        """Proposals kept per image where they are computed (shards, prediction): 2 x T, a margin
        so that a later run may ask for a larger T than the one the shards were built for."""
        return max(2 * self.max_regions, 1)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("image_size", "max_size", "global_size"):
            value = getattr(self, name)
            high = 2 * MAX_SIDE if name == "max_size" else MAX_SIDE  # a checkpoint's config may ask for anything
            if (value is not None or name == "image_size") and (not isinstance(value, int) or isinstance(value, bool)
                                                                or not MIN_SIDE <= value <= high):
                raise ValueError(f"{name}={value!r}: expected an int in [{MIN_SIDE}, {high}]")
        if not isinstance(self.max_regions, int) or self.max_regions < 0:
            raise ValueError(f"max_regions={self.max_regions!r}: expected an int >= 0")


@dataclass
class Augment:
    """Training-time augmentation (the paper names none). Proposals and ground-truth boxes
    move with the image; evaluation and prediction never augment.

    Attributes:
        flip: mirror left-right with probability 1/2.
        sizes: shorter sides drawn uniformly per image for the free-size input (Fast R-CNN's
            multi-scale training; the longer-side cap scales with it); () keeps InputConfig's.
        jitter: colour jitter strength j: brightness, contrast and saturation each multiplied by a
            factor drawn from [1 - j, 1 + j]; 0 is none.
    """

    flip: bool = False
    sizes: tuple[int, ...] = field(default=(), metadata={"flat": "train_sizes"})
    jitter: float = field(default=0.0, metadata={"flat": "color_jitter"})

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        self.sizes = tuple(self.sizes)
        if any(not isinstance(v, int) or v < 1 for v in self.sizes):
            raise ValueError(f"train_sizes={list(self.sizes)}: expected shorter sides >= 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"color_jitter={self.jitter}: expected a strength in [0, 1)")


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes Tensor[K, 4] of an image `width` wide -> the same boxes in the left-right mirrored image."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def jitter_colour(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """uint8 ndarray[H, W, 3] -> the same with its brightness, contrast (about the mean grey) and
    saturation (about each pixel's grey) multiplied by the factors."""
    luma = np.float32([0.299, 0.587, 0.114])
    x = image.astype(np.float32) * brightness  # (H, W, 3)
    mean = float((x @ luma).mean())
    x = (x - mean) * contrast + mean
    grey = (x @ luma)[..., None]  # (H, W, 1)
    return np.clip((x - grey) * saturation + grey, 0, 255).astype(np.uint8)


# The paper's input (section 4.2 with Fast R-CNN's scale): shorter side 600, longer side <= 1000,
# a 224-pixel size-normalised global input, T = 500 proposals.
PAPER_INPUT = InputConfig(image_size=600, max_size=1000, global_size=224, max_regions=500)


def resize_image(image: np.ndarray, image_size: int, max_size: int | None = None,
                 global_size: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize for the network (free-sized for stages 2-4, size-normalised for stage 1).

    Args:
        image: uint8 ndarray[H, W, 3].
        image_size: target shorter side S.
        max_size: cap on the longer side (default 2 x S); wins over S for very elongated images.
        global_size: if set, squash to a global_size x global_size square instead.

    Returns:
        (uint8 ndarray[H', W', 3], (sx, sy)): multiply x coordinates by sx, y by sy.
    """
    h, w = image.shape[:2]
    if global_size is not None:
        nh = nw = global_size
    else:
        max_size = max_size or 2 * image_size
        s = min(image_size / min(h, w), max_size / max(h, w))
        # a side of at least one cell of the stride-16 feature map (a 3 x 2000 image would get 1 pixel)
        nh, nw = max(round(h * s), MIN_SIDE), max(round(w * s), MIN_SIDE)
    interp = cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_LINEAR
    out = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    return out, (nw / w, nh / h)


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ndarray[H, W, 3] RGB -> float Tensor[3, H, W] standardised with the model's mean/std."""
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255)  # (3, H, W)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """`normalize`'s inverse: float Tensor[3, H, W] -> uint8 ndarray[H, W, 3] (for pictures)."""
    rgb = x.cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (rgb.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


@dataclass
class Prepared:
    """One image ready for the network: float Tensor[3, h, w] normalised, its (h, w), the top-T
    proposals Tensor[K, 4] in resized pixels, (sx, sy) from original to resized pixels (before any
    flip), and the ground-truth boxes Tensor[G, 4] in resized (and flipped) pixels when given."""

    image: torch.Tensor
    size: tuple[int, int]
    boxes: torch.Tensor
    scale: tuple[float, float]
    gt_boxes: torch.Tensor | None = None


@dataclass(frozen=True)
class Preprocess:
    """The input transform of one stage: `InputConfig` + the model's normalisation.

    `whole_image` is stage 1's size-normalised input with no regions (section 4.2). `augment` is for
    training loaders only; its random draws come from torch's generator (seeded per DataLoader worker).
    """

    inputs: InputConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    whole_image: bool = False
    augment: Augment = field(default_factory=Augment)

    @classmethod
    def for_stage(cls, inputs: InputConfig, model_cfg, stage: str, augment: Augment | None = None) -> "Preprocess":
        """The input of `stage` for a model whose config (rgnn.nn.model.ModelConfig) holds mean/std."""
        return cls(inputs, tuple(model_cfg.mean), tuple(model_cfg.std), whole_image=stage == "global",
                   augment=augment or Augment())

    def __call__(self, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 gt_boxes: np.ndarray | None = None) -> Prepared:
        """uint8 ndarray[H, W, 3], proposals float ndarray[T, 4] in its pixels, scores ndarray[T], and
        optionally ground-truth boxes float ndarray[G, 4] in its pixels -> Prepared."""
        c, a = self.inputs, self.augment
        if self.whole_image and c.global_size is None:
            raise ValueError("the global stage's input needs global_size")
        size, max_size = c.image_size, c.max_size
        if a.sizes and not self.whole_image:
            size = a.sizes[int(torch.randint(len(a.sizes), ()))]
            max_size = round((c.max_size or 2 * c.image_size) * size / c.image_size)
        out, (sx, sy) = resize_image(image, size, max_size, c.global_size if self.whole_image else None)
        h, w = out.shape[:2]
        keep = boxes[:0] if self.whole_image else boxes[np.argsort(-scores, kind="stable")[:c.max_regions]]
        keep = scale_boxes(keep, sx, sy, w, h)
        gt = None if gt_boxes is None else scale_boxes(gt_boxes, sx, sy, w, h)
        if a.jitter:
            out = jitter_colour(out, *(1.0 + a.jitter * (2 * torch.rand(3).numpy() - 1)))
        if a.flip and torch.rand(()) < 0.5:
            out, keep = out[:, ::-1], flip_boxes(keep, w)
            gt = None if gt is None else flip_boxes(gt, w)
        return Prepared(normalize(out, self.mean, self.std), (h, w), keep, (sx, sy), gt)


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """N x Tensor[3, h_i, w_i] -> (Tensor[N, 3, H, W] zero-padded at the bottom and right, long Tensor[N, 2] sizes)."""
    sizes = torch.tensor([tuple(x.shape[1:]) for x in images], dtype=torch.long)  # (N, 2)
    H, W = sizes.max(0).values.tolist()
    batch = images[0].new_zeros(len(images), 3, H, W)
    for i, x in enumerate(images):
        batch[i, :, :x.shape[1], :x.shape[2]] = x
    return batch, sizes


@dataclass
class Batch:
    """N images of different sizes, zero-padded into one tensor, with per-image box lists.

    Attributes:
        images: float Tensor[N, 3, H, W], normalised, zero-padded to the batch's largest size.
        image_sizes: long Tensor[N, 2], (h, w) of each resized image before padding.
        boxes: N x float Tensor[T_i, 4], the top-T proposals, x1 y1 x2 y2 in resized pixels
            (empty for the global stage; the model appends the whole image).
        targets: float Tensor[N, C], the 0/1 labels y of eq. 6.
        ignore: bool Tensor[N, C], classes whose boxes are all VOC-difficult (evaluation skips them).
        gt_boxes: N x float Tensor[G_i, 4], ground-truth boxes in resized pixels (eq. 8's IoU).
        gt_classes: N x long Tensor[G_i].
        ids: the N image ids.
    """

    images: torch.Tensor
    image_sizes: torch.Tensor
    boxes: list[torch.Tensor]
    targets: torch.Tensor
    ignore: torch.Tensor
    gt_boxes: list[torch.Tensor]
    gt_classes: list[torch.Tensor]
    ids: list

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.images.to(device), self.image_sizes.to(device),
                     [b.to(device) for b in self.boxes], self.targets.to(device), self.ignore.to(device),
                     [b.to(device) for b in self.gt_boxes], [c.to(device) for c in self.gt_classes],
                     list(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def collate(samples: list[dict]) -> Batch:
    """Prepared samples -> one Batch, images zero-padded at the bottom and right."""
    images, sizes = pad_images([s["image"] for s in samples])
    return Batch(images, sizes, [s["boxes"] for s in samples],
                 torch.stack([s["target"] for s in samples]), torch.stack([s["ignore"] for s in samples]),
                 [s["gt_boxes"] for s in samples], [s["gt_classes"] for s in samples],
                 [s["id"] for s in samples])
