"""The training input pipeline: the WebDataset shards of sharding/build_shards.py -> `Batch`.

Shard format (DESIGN.md, "Shards"): one sample per image, key = the image id, fields
- `jpg` (JPEG sources) or `png` (PNG sources): the original file's bytes, never re-encoded; any
  other source format keeps its own extension. The reader decodes whichever image field is there;
- `boxes.npy`: float32 (T, 4) EdgeBoxes proposals x1 y1 x2 y2 in original pixels, by score desc;
- `scores.npy`: float32 (T,);
- `json`: {"id", "file", "width", "height", "labels", "gt_boxes": [[x1, y1, x2, y2, class], ...],
  "difficult": [bool per gt box]}.
`<split>/manifest.json` lists the shards with sample counts, sizes and sha256 checksums.

Reading (DESIGN.md, "Training data flow"):
- training: the shard list is shuffled per epoch (seed + epoch), split by world rank, then by
  DataLoader worker; when there are fewer shards than rank x worker slots each shard is cut into
  interleaved parts by sample index so that every slot still gets data. Samples pass a shuffle
  buffer. Every rank yields exactly `steps_per_epoch` full batches, cycling through its part as
  often as needed, so uneven splits never leave one DDP rank waiting for another.
- evaluation (`for_eval=True`): every sample exactly once across ranks (sample i goes to rank
  i % world_size), manifest order, no shuffling; the last batch of a rank (or of a DataLoader
  worker) may be short.
Images are resized to shorter side `image_size` with the longer side capped at `max_size` (default
2 x image_size), or for the size-normalised global stage (stage 1, section 4.2) squashed to a
`global_size` square with no regions. Proposals and ground-truth boxes are scaled with the image.
The model adds the whole-image region itself, so `Batch.boxes` holds proposals only.

No Ray here: this module runs in any PyTorch process.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from rgnn.data.images import decode_image
from rgnn.data.records import ImageRecord

MANIFEST = "manifest.json"
# ImageNet statistics of torchvision's pretrained backbones.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
META_FIELDS = ("json", "boxes.npy", "scores.npy")
SHUFFLE_BUFFER = 256  # raw samples (encoded image + proposals, ~100 KB each) per DataLoader worker


def _join(split_dir: str | Path, name: str) -> str:
    return f"{str(split_dir).rstrip('/')}/{name}"


def read_manifest(split_dir: str | Path) -> dict:
    """The manifest of one split's shards.

    Raises:
        FileNotFoundError: no manifest.json in `split_dir`.
        ValueError: it does not parse, or is not a shard manifest (the message names the file).
    """
    path = _join(split_dir, MANIFEST)
    fs, p = fsspec.core.url_to_fs(path)
    try:
        text = fs.cat_file(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard manifest not found: {path}") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("class_names", "shards", "skipped", "records", "complete")
               if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ValueError(f"{path} is not a shard manifest (missing {missing})")
    return manifest


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file (local path or fsspec URL), read in 1 MiB blocks."""
    fs, p = fsspec.core.url_to_fs(str(path))
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shard(split_dir: str | Path, entry: dict, checksum: bool = True) -> None:
    """Check that one manifest entry's shard exists with its recorded size (and sha256).

    Raises:
        FileNotFoundError: the shard is missing.
        ValueError: its size or checksum differs from the manifest (the message names the shard).
    """
    path = _join(split_dir, entry["name"])
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"shard missing: {path} (listed in {_join(split_dir, MANIFEST)})")
    size = fs.size(p)
    if size != entry["bytes"]:
        raise ValueError(f"shard {path} is {size} bytes but the manifest says {entry['bytes']}: "
                         "corrupt or incomplete; rerun sharding/build_shards.py to rebuild it")
    if checksum and file_sha256(path) != entry["sha256"]:
        raise ValueError(f"shard {path} does not match its manifest sha256: corrupt; "
                         "rerun sharding/build_shards.py to rebuild it")


def verify_shards(split_dir: str | Path) -> None:
    """Check that the split is complete and every shard matches its manifest checksum.

    Raises:
        FileNotFoundError: the manifest or a shard is missing (named).
        ValueError: the job that writes the split has not finished, or a shard is corrupt (named).
    """
    manifest = _require_complete(split_dir, read_manifest(split_dir))
    for entry in manifest["shards"]:
        check_shard(split_dir, entry)


def _require_complete(split_dir: str | Path, manifest: dict) -> dict:
    if not manifest["complete"]:
        raise ValueError(f"{_join(split_dir, MANIFEST)}: incomplete ({len(manifest['shards'])} of "
                         f"{manifest.get('shards_planned', '?')} shards); rerun sharding/build_shards.py to finish")
    return manifest


def _readable_manifest(split_dir: str | Path) -> dict:
    """The manifest of a complete split with at least one sample (what training needs)."""
    manifest = _require_complete(split_dir, read_manifest(split_dir))
    if sum(e["samples"] for e in manifest["shards"]) == 0:
        raise ValueError(f"{_join(split_dir, MANIFEST)}: the split holds no samples")
    return manifest


def class_names(split_dir: str | Path) -> list[str]:
    """The class list the shards' labels index into."""
    return list(read_manifest(split_dir)["class_names"])


def steps_per_epoch(split_dir: str | Path, batch_size: int, world_size: int = 1) -> int:
    """Batches every rank yields per training epoch: floor(samples / world_size / batch_size), >= 1."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    return _steps(sum(e["samples"] for e in _readable_manifest(split_dir)["shards"]), batch_size, world_size)


def _steps(total: int, batch_size: int, world_size: int) -> int:
    return max(total // world_size // batch_size, 1)


# ---------------------------------------------------------------------------------------------
# One sample: decode, resize, scale boxes


def resize_image(image: np.ndarray, image_size: int, max_size: int | None = None,
                 global_size: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize for the network (section 4.2: free-sized images for stages 2-4, size-normalised for stage 1).

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
        nh, nw = max(round(h * s), 1), max(round(w * s), 1)
    interp = cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_LINEAR
    out = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    return out, (nw / w, nh / h)


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 ndarray[H, W, 3] RGB -> float Tensor[3, H, W] standardised with ImageNet MEAN/STD."""
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255)  # (3, H, W)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _scale_boxes(boxes: np.ndarray, sx: float, sy: float, w: int, h: int) -> torch.Tensor:
    """float ndarray[K, 4] x1 y1 x2 y2 -> Tensor[K, 4] scaled and clipped to a w x h image."""
    b = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)) * torch.tensor([sx, sy, sx, sy])
    b[:, 0::2].clamp_(0, w)
    b[:, 1::2].clamp_(0, h)
    return b


def _decode_sample(sample: dict, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, ImageRecord]:
    """Raw shard sample -> (image uint8[H, W, 3], proposals f32[T, 4], scores f32[T], record)."""
    name = f"{where} sample {sample.get('__key__')!r}"
    image_fields = [k for k in sample if not k.startswith("__") and k not in META_FIELDS]
    missing = [k for k in META_FIELDS if k not in sample] + ([] if image_fields else ["jpg"])
    if missing or len(image_fields) > 1:
        raise ValueError(f"{name}: expected fields {list(META_FIELDS)} and one image, got {sorted(sample)}")
    try:
        meta = json.loads(sample["json"])
        boxes = np.load(io.BytesIO(sample["boxes.npy"]), allow_pickle=False)
        scores = np.load(io.BytesIO(sample["scores.npy"]), allow_pickle=False)
        gt = np.asarray(meta["gt_boxes"], np.float32).reshape(-1, 5)  # (G, 5): x1 y1 x2 y2 class
        record = ImageRecord(meta["id"], meta["file"], int(meta["width"]), int(meta["height"]),
                             list(meta["labels"]), gt[:, :4], gt[:, 4].astype(np.int64),
                             np.asarray(meta.get("difficult", [False] * len(gt)), bool))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"{name}: unreadable fields: {e!r}") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),):
        raise ValueError(f"{name}: boxes.npy {boxes.shape} and scores.npy {scores.shape} "
                         "are not (T, 4) and (T,)")
    image = decode_image(sample[image_fields[0]], name=f"{name}.{image_fields[0]}")
    return image, boxes, scores, record


@dataclass(frozen=True)
class _Transform:
    num_classes: int
    image_size: int
    max_size: int | None
    max_regions: int
    global_size: int | None

    def __call__(self, sample: dict, where: str) -> dict:
        image, boxes, scores, rec = _decode_sample(sample, where)
        x, (h, w), boxes, (sx, sy) = prepare(image, boxes, scores, self.image_size, self.max_size,
                                             self.max_regions, self.global_size)
        return {
            "image": x, "boxes": boxes,
            "target": torch.from_numpy(rec.target(self.num_classes)),
            "ignore": torch.from_numpy(rec.difficult_only(self.num_classes)),
            "gt_boxes": _scale_boxes(rec.gt_boxes, sx, sy, w, h),
            "gt_classes": torch.from_numpy(rec.gt_classes), "id": rec.image_id,
        }


def prepare(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, image_size: int, max_size: int | None,
            max_regions: int, global_size: int | None = None):
    """One image and its proposals -> the network's input (what training, evaluation and prediction share).

    Args:
        image: uint8 ndarray[H, W, 3]; boxes: float ndarray[T, 4] in its pixels; scores: ndarray[T].
        global_size: stage 1's size-normalised square input, no regions.

    Returns:
        (float Tensor[3, h, w] normalised, (h, w), Tensor[K, 4] the top-K <= max_regions proposals by
        score in the resized pixels, (sx, sy) the scale from original to resized pixels).
    """
    out, (sx, sy) = resize_image(image, image_size, max_size, global_size)
    h, w = out.shape[:2]
    if global_size is not None:  # stage 1: whole images only
        boxes = boxes[:0]
    else:
        boxes = boxes[np.argsort(-scores, kind="stable")[:max_regions]]
    return normalize(out), (h, w), _scale_boxes(boxes, sx, sy, w, h), (sx, sy)


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
        images: float Tensor[N, 3, H, W], ImageNet-normalised, zero-padded to the batch's largest size.
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


# ---------------------------------------------------------------------------------------------
# Which samples each rank and DataLoader worker reads


@dataclass(frozen=True)
class _Part:
    """The samples of one shard whose split-wide index g satisfies g % modulus == residue."""

    path: str
    offset: int  # split-wide index of the shard's first sample
    samples: int
    modulus: int = 1
    residue: int = 0

    def count(self) -> int:
        first = (self.residue - self.offset) % self.modulus
        return len(range(first, self.samples, self.modulus))


def _read_shard(path: str, expected: int) -> Iterator[dict]:
    """Raw samples of one shard, in order; errors name the shard."""
    fs, p = fsspec.core.url_to_fs(path)
    n = 0
    try:
        with fs.open(p, "rb") as f:
            for sample in group_by_keys(tar_file_expander([{"url": path, "stream": f}])):
                n += 1
                yield sample
    except FileNotFoundError:
        raise FileNotFoundError(f"shard missing: {path}") from None
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"corrupt shard {path}: {e}") from None
    if n != expected:
        raise ValueError(f"shard {path} holds {n} samples but the manifest says {expected}")


def _read_part(part: _Part) -> Iterator[dict]:
    for i, sample in enumerate(_read_shard(part.path, part.samples)):
        if (part.offset + i) % part.modulus == part.residue:
            sample["__shard__"] = part.path
            yield sample


class ShardDataset(IterableDataset):
    """One rank's view of a split: yields `Batch`es (see the module docstring for the splitting)."""

    def __init__(self, split_dir: str | Path, *, batch_size: int, transform: _Transform, rank: int,
                 world_size: int, num_workers: int, shuffle: bool, seed: int, epoch: int, for_eval: bool,
                 shuffle_buffer: int = SHUFFLE_BUFFER):
        manifest = _readable_manifest(split_dir)
        offsets = itertools.accumulate([e["samples"] for e in manifest["shards"]], initial=0)
        self.shards = [_Part(_join(split_dir, e["name"]), off, e["samples"])
                       for e, off in zip(manifest["shards"], offsets) if e["samples"] > 0]
        for entry in manifest["shards"]:
            check_shard(split_dir, entry, checksum=False)  # cheap: missing or truncated shards fail here, named
        self.total = sum(p.samples for p in self.shards)
        self.batch_size, self.transform = batch_size, transform
        self.rank, self.world_size, self.workers = rank, world_size, max(num_workers, 1)
        self.shuffle, self.seed, self.epoch, self.for_eval = shuffle, seed, epoch, for_eval
        self.shuffle_buffer = shuffle_buffer
        self.steps = _steps(self.total, batch_size, world_size)

    def _eval_parts(self, worker: int) -> list[_Part]:
        """Sample g goes to rank g % world_size; a rank's DataLoader workers take whole shards in
        turn, or, with fewer shards than workers, every world_size-th of the rank's samples."""
        R, W = self.world_size, self.workers
        if len(self.shards) >= W:
            return [_Part(p.path, p.offset, p.samples, R, self.rank) for p in self.shards[worker::W]]
        return [_Part(p.path, p.offset, p.samples, R * W, self.rank + R * worker) for p in self.shards]

    def _train_parts(self, worker: int) -> list[_Part]:
        """This epoch's shard order, cut into at least one part per (rank, worker) slot; a slot's
        parts are every world_size-th part, then every num_workers-th of those."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)  # same order on every rank
        k = math.ceil(self.world_size * self.workers / len(shards))
        parts = [_Part(p.path, p.offset, p.samples, k, r) for p in shards for r in range(k)]
        mine = parts[self.rank::self.world_size][worker::self.workers]
        if sum(p.count() for p in mine) == 0:  # a slot left without samples resamples the whole split
            mine = shards
        return mine

    def _quota(self, worker: int) -> int:
        """Training batches of one DataLoader worker; the workers of a rank add up to `steps`."""
        return self.steps // self.workers + (worker < self.steps % self.workers)

    def __len__(self) -> int:
        if not self.for_eval:
            return self.steps
        return sum(math.ceil(sum(p.count() for p in self._eval_parts(w)) / self.batch_size)
                   for w in range(self.workers))

    def _prepared(self, raw: Iterable[dict]) -> Iterator[dict]:
        for sample in raw:
            yield self.transform(sample, sample["__shard__"])

    def _batches(self, prepared: Iterator[dict], limit: int | None = None) -> Iterator[Batch]:
        for _ in range(limit) if limit is not None else itertools.count():
            chunk = list(itertools.islice(prepared, self.batch_size))
            if not chunk:
                return
            yield collate(chunk)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"ShardDataset planned for {self.workers} DataLoader workers, runs in {info.num_workers}")
        if self.for_eval:
            parts = self._eval_parts(worker)
            yield from self._batches(self._prepared(s for p in parts for s in _read_part(p)))
            return
        parts, quota = self._train_parts(worker), self._quota(worker)
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")

        def cycle() -> Iterator[dict]:  # the slot's parts again and again, reshuffled each pass
            while True:
                order = list(parts)
                if self.shuffle:
                    rng.shuffle(order)
                for p in order:
                    yield from _read_part(p)

        raw = cycle()
        if self.shuffle:
            raw = wds.shuffle(self.shuffle_buffer, min(64, self.shuffle_buffer), rng=rng)(raw)
        yield from self._batches(self._prepared(raw), quota)


def shard_loader(split_dir: str | Path, *, batch_size: int, image_size: int = 224, max_size: int | None = None,
                 max_regions: int = 200, global_size: int | None = None, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 for_eval: bool = False, shuffle_buffer: int = SHUFFLE_BUFFER) -> Iterable[Batch]:
    """Batches of one split for one rank (see the module docstring).

    Args:
        split_dir: SHARDS/<split>, holding manifest.json and the shards (a path or an fsspec URL).
        batch_size: images per batch.
        image_size: shorter side S of the resized images.
        max_size: cap on the longer side (default 2 x image_size).
        max_regions: T, the proposals kept per image (top T by score).
        global_size: squash images to this square and give no regions (the global stage).
        rank, world_size: this process's place among the DDP ranks.
        num_workers: DataLoader worker processes (0: decode in this process).
        shuffle, seed, epoch: training order; the same (seed, epoch) gives the same batches.
        for_eval: every sample once across ranks, in order, last batch possibly short.
        shuffle_buffer: raw samples held by the shuffle buffer of each worker.

    Returns:
        an iterable of Batch with len() = its number of batches (a DataLoader when num_workers > 0);
        in training that is steps_per_epoch(split_dir, batch_size, world_size) on every rank.

    Raises:
        FileNotFoundError / ValueError: a bad argument, or a missing, incomplete or corrupt
        manifest or shard (named).
    """
    if batch_size < 1 or image_size < 1 or max_regions < 0 or num_workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"need batch_size >= 1, image_size >= 1, max_regions >= 0, num_workers >= 0 and "
                         f"shuffle_buffer >= 1; got {batch_size}, {image_size}, {max_regions}, {num_workers}, "
                         f"{shuffle_buffer}")
    if (max_size is not None and max_size < 1) or (global_size is not None and global_size < 1):
        raise ValueError(f"max_size and global_size must be >= 1, got {max_size}, {global_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    transform = _Transform(len(class_names(split_dir)), image_size, max_size, max_regions, global_size)
    dataset = ShardDataset(split_dir, batch_size=batch_size, transform=transform, rank=rank,
                           world_size=world_size, num_workers=num_workers, shuffle=shuffle and not for_eval,
                           seed=seed, epoch=epoch, for_eval=for_eval, shuffle_buffer=shuffle_buffer)
    if num_workers == 0:
        return dataset
    # Batches are built inside the workers (batch_size=None): each worker owns a quota of whole batches.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
