"""An ImageNet stand-in for the built-in synthetic set: the `small` backbone pretrained as a plain
image classifier on a wider, disjoint synthetic distribution.

    python -m rgnn.train.pretrain [--cache-dir ~/.cache/rgnn] [--seed 0] [--crops N] [--epochs E]
                            [--tracking-uri URI] [--force]

Why: the paper (section 4.2) starts every stage from an ImageNet-pretrained VGG-16, so its region
classifier (RoI pooling -> fc6 -> fc7) already tells objects apart before the RGNN is trained; the
`small` backbone of the built-in set starts from random weights and its region classifier is weak.
This module recreates the paper's situation on synthetic data. Like ImageNet (1000 classes, one
object per picture, centred, at many scales) is wider than VOC and disjoint from its images, the
pretraining set is

- object-centric crops: one object on the built-in set's gradient backdrop, filling 30-90% of the
  crop's shorter side, anywhere in it; crop aspect ratio 0.6-1.6 squashed to a square input (as
  ImageNet training's random-resized crops, and as stage 1 squashes whole images); half the crops
  show part of a clutter shape at one border; random colours as in rgnn/data/synthetic.py;
- a wider label space (`LABELS`, 90 classes): 10 shapes (the built-in set's 5, its clutter's
  ellipse and ring, star, a hollow square, an L) x 9 textures (horizontal, vertical and diagonal
  stripes and checker, each with a 3- or 6-pixel period, and solid). The built-in set's 10 classes
  (shape x horizontal/vertical stripes, period 3) are among them, under the same names (`TARGETS`);
- disjoint from the built-in images: crop i of stream k comes from
  `np.random.default_rng([seed, 100 + k, i])` (k = 0 the held-out crops, k = 1 + e the training
  crops of epoch e, fresh every epoch), where the built-in set uses streams 1 (train) and 2 (val).

Crops are painted at about the input size (x0.9-1.1, then the aspect squash), so a texture's
period on the input is its painted period x0.72-1.43: 3-pixel stripes span 2.2-4.3 input pixels and
6-pixel ones 4.3-8.6 (the two never overlap), about what the RGNN sees of the built-in set's
3-pixel stripes once its images are resized to a 192-pixel shorter side (1.8-6 pixels).

The model is `build_backbone("small")` (trunk -> global pooling -> fc6 -> fc7, the stage-1 path)
plus a linear head over `LABELS`, trained with Adam and cross-entropy on inputs standardised as
the RGNN's (`rgnn.nn.model.IMAGENET_MEAN` / `IMAGENET_STD`). Only the backbone is kept: its
`state_dict()` (keys `trunk.*`, `fc6.*`, `fc7.*`) is what `build_backbone("small", weights=PATH)`
and the training's `--weights PATH` load; the head, like ImageNet's fc8, is dropped.

Measured with the defaults (14 epochs of 5000 crops, 64 px, Adam 2e-3) on 2 CPU cores with one
torch thread: 3 minutes, 93.5% held-out accuracy over the 90 classes (94-95% on the 10 target
classes; 94% over 3000 other crops). A linear probe on RoI-pooled features of the built-in set's
ground-truth boxes (images at a 192-pixel shorter side) reaches 96% with these weights and 54%
with random ones.

`pretrained_weights(cache_dir, settings)` returns `<cache_dir>/pretrained/small-<hash>.pt`, built
only when missing (the hash covers the settings and `VERSION`), beside a `.json` with the settings
and the per-epoch history. Same settings, same tensors (with the same number of torch threads).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from rgnn.nn.backbones import Backbone, build_backbone, xavier_linear
from rgnn.data import synthetic
from rgnn.nn.backbones import IMAGENET_MEAN, IMAGENET_STD
from rgnn.io.storage import atomic_write, write_text

# Bump when the crops or the training change meaning: it is part of the cache file's hash.
VERSION = 1
SHAPES = synthetic.SHAPES + ("ellipse", "ring", "star", "frame", "lshape")
PERIODS = (synthetic.STRIPE_PERIOD, 6)
# (name, pattern, period); the built-in period keeps the built-in names ("hstripes"), the other
# period is spelled out ("hstripes-p6")
TEXTURES = tuple(
    (pattern if period == synthetic.STRIPE_PERIOD else f"{pattern}-p{period}", pattern, period)
    for pattern in ("hstripes", "vstripes", "dstripes", "checker") for period in PERIODS
) + (("solid", "solid", synthetic.STRIPE_PERIOD),)
LABELS = [f"{shape}-{name}" for shape in SHAPES for name, _, _ in TEXTURES]
# indices in LABELS of the built-in set's classes, in synthetic.CLASS_NAMES order
TARGETS = [LABELS.index(name) for name in synthetic.CLASS_NAMES]
STREAM = 100  # rng stream base: synthetic.SPLITS uses 1 and 2
FILL = (0.3, 0.9)  # object side / crop's shorter side
ASPECT = (0.6, 1.6)  # crop width / height, squashed to a square
SCALE = (0.9, 1.1)  # crop's mean side / input size, log-uniform
CLUTTER = 0.5  # share of crops with a clutter shape cut by one border
CLUTTER_VISIBLE = (0.25, 0.6)  # share of the clutter's side inside the crop
EXPERIMENT = "rgnn-pretrain"  # MLflow


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the pretrained weights (and so the cache file's name).

    Attributes:
        seed: numpy crop streams and torch initialisation / dropout.
        crops: training crops per epoch (fresh every epoch, held in memory as uint8).
        val_crops: held-out crops, scored after every epoch.
        epochs: passes, each over `crops` new crops.
        lr: Adam's learning rate, decayed to 0 along a cosine over all steps.
        batch_size: crops per step.
        input_size: side S of the square network input, in pixels.
        dropout: after fc6 and fc7, as in build_backbone. 0 by default: every crop is new, so
            there is nothing to overfit, and without it the held-out accuracy rises faster (0.1:
            91% after the default 14 epochs, 0: 94%).
    """

    seed: int = 0
    crops: int = 5000
    val_crops: int = 1000
    epochs: int = 14
    lr: float = 2e-3
    batch_size: int = 32
    input_size: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("crops", "val_crops", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: expected a positive learning rate")
        if self.input_size < 32:
            # below 32 px a crop's feature map is under 2x2 cells at stride 16
            raise ValueError(f"input_size={self.input_size}: expected at least 32 pixels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a probability in [0, 1)")

    def key(self) -> str:
        """A short hash of the settings and VERSION: the cache file's name."""
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Crops


def make_crop(rng: np.random.Generator, input_size: int) -> tuple[np.ndarray, int]:
    """One object-centric crop and its label.

    Returns:
        (uint8 ndarray[S, S, 3] RGB with S = input_size, index in LABELS).
    """
    label = int(rng.integers(len(LABELS)))
    shape = SHAPES[label // len(TEXTURES)]
    _, pattern, period = TEXTURES[label % len(TEXTURES)]
    side = input_size * math.exp(rng.uniform(*np.log(SCALE)))
    aspect = math.exp(rng.uniform(*np.log(ASPECT)))
    w, h = round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
    size = max(int(rng.uniform(*FILL) * min(w, h)), 8)
    # the crop is the window [oy, oy + h) x [ox, ox + w) of a canvas that, with clutter, extends
    # past one border by the clutter's side so that the clutter can be cut by it
    ox = oy = 0
    cw, ch = w, h
    clutter = None
    if rng.random() < CLUTTER:
        csize = max(int(rng.uniform(*FILL) * min(w, h)), 8)
        seen = max(int(rng.uniform(*CLUTTER_VISIBLE) * csize), 1)
        border = int(rng.integers(4))  # left, right, top, bottom
        along = int(rng.integers(0, (h if border < 2 else w) - csize + 1))
        if border < 2:
            cw, ox = w + csize, (csize if border == 0 else 0)
            clutter = ((ox - csize + seen) if border == 0 else (w - seen), along, csize)
        else:
            ch, oy = h + csize, (csize if border == 2 else 0)
            clutter = (along, (oy - csize + seen) if border == 2 else (h - seen), csize)
    canvas = synthetic.background(ch, cw, rng).copy()
    if clutter is not None:
        synthetic.paint(canvas, str(rng.choice(SHAPES)), str(rng.choice(["solid", "checker"])), *clutter, rng)
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    synthetic.paint(canvas, shape, pattern, ox + x, oy + y, size, rng, period)
    crop = np.clip(canvas[oy:oy + h, ox:ox + w], 0, 255).astype(np.uint8)
    interp = cv2.INTER_AREA if input_size * input_size < w * h else cv2.INTER_LINEAR
    return cv2.resize(crop, (input_size, input_size), interpolation=interp), label


def make_crops(seed: int, stream: int, n: int, input_size: int) -> tuple[Tensor, Tensor]:
    """Crops 0..n-1 of stream `stream` (rng `[seed, STREAM + stream, i]`).

    Returns:
        (uint8 Tensor[n, S, S, 3], int64 Tensor[n] labels).
    """
    images = np.empty((n, input_size, input_size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        images[i], labels[i] = make_crop(np.random.default_rng([seed, STREAM + stream, i]), input_size)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _standardise(images: Tensor) -> Tensor:
    """uint8 Tensor[N, S, S, 3] -> float Tensor[N, 3, S, S] in the RGNN's input statistics
    (ModelConfig's default mean/std, ImageNet's)."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# Training


class CropClassifier(nn.Module):
    """The stage-1 path of the RGNN (section 4.2) with a head over LABELS.

    Tensor[N, 3, S, S] -> trunk -> global max pooling to 4x4 -> fc6 -> fc7 -> logits Tensor[N, len(LABELS)].
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.head = xavier_linear(backbone.fc7_dim, len(LABELS))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone.global_features(images))


@torch.no_grad()
def _accuracy(model: CropClassifier, images: Tensor, labels: Tensor, batch_size: int) -> tuple[float, float]:
    """(accuracy over all crops, accuracy over the crops of TARGETS classes), predictions over all LABELS."""
    model.eval()
    pred = torch.cat([model(_standardise(images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images), batch_size)])
    model.train()
    right = pred == labels
    target = torch.isin(labels, torch.tensor(TARGETS))
    return right.float().mean().item(), (right[target].float().mean().item() if target.any() else float("nan"))


def train(settings: PretrainSettings, progress: bool = True) -> tuple[dict[str, Tensor], list[dict]]:
    """Pretrain the small backbone on crops.

    A helper thread paints the next epoch's crops while this one trains (numpy and OpenCV on one
    core, torch's kernels, which release the GIL, on the other).

    Returns:
        (the backbone's state_dict: trunk.*, fc6.*, fc7.*; one dict per epoch with "epoch",
        "train/loss", "val/acc", "val/acc_target", "seconds").
    """
    s = settings
    start = time.monotonic()
    steps = s.epochs * math.ceil(s.crops / s.batch_size)
    history = []
    with ThreadPoolExecutor(1) as painter, torch.random.fork_rng(devices=[]):  # the caller's torch rng stays
        upcoming = painter.submit(make_crops, s.seed, 1, s.crops, s.input_size)
        held_out = painter.submit(make_crops, s.seed, 0, s.val_crops, s.input_size)
        torch.manual_seed(s.seed)
        # channels-last convolutions: a third faster on CPUs (the crops arrive as [N, S, S, 3])
        model = CropClassifier(build_backbone("small", None, s.dropout)).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        model.train()
        for epoch in range(s.epochs):
            images, labels = upcoming.result()
            if epoch + 1 < s.epochs:
                upcoming = painter.submit(make_crops, s.seed, 2 + epoch, s.crops, s.input_size)
            total = 0.0
            for i in range(0, s.crops, s.batch_size):
                y = labels[i:i + s.batch_size]
                loss = nn.functional.cross_entropy(model(_standardise(images[i:i + s.batch_size])), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(y)
            acc, acc_target = _accuracy(model, *held_out.result(), 256)
            history.append({"epoch": epoch + 1, "train/loss": total / s.crops, "val/acc": acc,
                            "val/acc_target": acc_target, "seconds": time.monotonic() - start})
            if progress:
                print(_epoch_line(history[-1], s.epochs), flush=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.backbone.state_dict().items()}
    return state, history


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train/loss']:.3f}  held-out acc {row['val/acc']:.3f}"
            f"  (10 target classes {row['val/acc_target']:.3f})  {row['seconds']:.0f}s")


def weights_path(cache_dir: str | Path, settings: PretrainSettings) -> Path:
    """`<cache_dir>/pretrained/small-<settings.key()>.pt` (the history beside it, `.json`)."""
    return Path(cache_dir).expanduser() / "pretrained" / f"small-{settings.key()}.pt"


def pretrained_weights(cache_dir: str | Path, settings: PretrainSettings | None = None, progress: bool = True,
                       *, force: bool = False) -> Path:
    """The pretrained small backbone's state_dict file for `settings` (default PretrainSettings()).

    Built (and the `.json` history beside it) only when missing, or always with `force`. The
    `.pt` file appears last and whole, so its presence marks a finished build.
    """
    settings = settings or PretrainSettings()
    path = weights_path(cache_dir, settings)
    if path.is_file() and not force:
        return path
    state, history = train(settings, progress)
    doc = {"settings": asdict(settings), "version": VERSION, "labels": LABELS, "history": history}
    write_text(path.with_suffix(".json"), json.dumps(doc, indent=1))
    atomic_write(path, lambda f: torch.save(state, f))
    return path


# ---------------------------------------------------------------------------------------------
# MLflow and the command line


def log_run(uri: str, settings: PretrainSettings, path: Path) -> str:
    """One MLflow run in experiment "rgnn-pretrain"; returns its id.

    Params: the settings. Metrics: "train/loss", "val/acc", "val/acc_target" per epoch (step =
    epoch), from the `.json` history beside `path` (none if it is gone). Artifact: the weights file.
    """
    from rgnn.tracking.runs import RunLogger, resolve_tracking_uri, training_run

    uri = resolve_tracking_uri(uri)
    with training_run(uri, EXPERIMENT, path.stem, asdict(settings), {"weights": str(path)}) as run_id:
        log = RunLogger(uri, run_id)
        doc = path.with_suffix(".json")
        for row in json.loads(doc.read_text())["history"] if doc.is_file() else []:
            log.metrics({k: row[k] for k in ("train/loss", "val/acc", "val/acc_target")}, row["epoch"])
        log.flush()
        log.artifact(path)
    return run_id


def main(argv: list[str] | None = None) -> Path:
    d = PretrainSettings()
    p = argparse.ArgumentParser(prog="python -m rgnn.train.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default="~/.cache/rgnn",
                   help="the weights go to CACHE_DIR/pretrained/small-<hash>.pt (default ~/.cache/rgnn)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"crop streams and initialisation (default {d.seed})")
    p.add_argument("--crops", type=int, default=d.crops, help=f"training crops per epoch, fresh each epoch (default {d.crops})")
    p.add_argument("--val-crops", type=int, default=d.val_crops, help=f"held-out crops (default {d.val_crops})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam's initial learning rate, cosine decay (default {d.lr})")
    p.add_argument("--input-size", type=int, default=d.input_size, help=f"side of the square input (default {d.input_size})")
    p.add_argument("--tracking-uri", help="log one MLflow run to experiment rgnn-pretrain (default "
                                          "$MLFLOW_TRACKING_URI; neither: no logging), e.g. sqlite:///mlflow.db")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached file exists")
    a = p.parse_args(argv)
    try:
        settings = PretrainSettings(seed=a.seed, crops=a.crops, val_crops=a.val_crops, epochs=a.epochs,
                                    lr=a.lr, input_size=a.input_size)
    except ValueError as e:
        p.error(str(e))
    uri = a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:  # an HTTP server that does not answer fails now, not after the training
        from rgnn.tracking.runs import check_reachable

        check_reachable(uri)
    path = weights_path(a.cache_dir, settings)
    if path.is_file() and not a.force:
        print(f"cached (--force rebuilds it): {path}")
    path = pretrained_weights(a.cache_dir, settings, progress=True, force=a.force)
    print(f"weights: {path}")
    if uri:
        run_id = log_run(uri, settings, path)
        print(f"MLflow run {run_id} (experiment {EXPERIMENT}) at {uri}")
    return path


if __name__ == "__main__":
    main()
