"""The training input pipeline: the WebDataset shards of sharding/build_shards.py -> `Batch`.

Shard format (one sample per image: its image file's bytes, `boxes.npy`, `scores.npy`, `json`) and
`<split>/manifest.json`: rgnn.data.shardformat, which sharding/ writes with.

Reading:
- training: the shard list is shuffled per epoch (seed + epoch), split by world rank, then by
  DataLoader worker; when there are fewer shards than rank x worker slots each shard is cut into
  interleaved parts by sample index so that every slot still gets data. Samples pass a shuffle
  buffer. Every rank yields exactly `steps_per_epoch` full batches, cycling through its part as
  often as needed, so uneven splits never leave one DDP rank waiting for another.
- evaluation (`for_eval=True`): every sample exactly once across ranks (sample i goes to rank
  i % world_size), manifest order, no shuffling; the last batch of a rank (or of a DataLoader
  worker) may be short.
Each decoded sample goes through a `rgnn.data.transforms.Preprocess` (resize, top-T proposals,
normalisation) shared with prediction; this module only stores, checks and splits.

No Ray here: this module runs in any PyTorch process.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from rgnn.io import storage
from rgnn.data.images import decode_image
from rgnn.data.shardformat import MANIFEST, check_shard, decode_sample, image_fields, read_manifest
from rgnn.data.transforms import Batch, Preprocess, collate

SHUFFLE_BUFFER = 256  # raw samples (encoded image + proposals, ~100 KB each) per DataLoader worker


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
        raise ValueError(f"{storage.join(split_dir, MANIFEST)}: incomplete ({len(manifest['shards'])} of "
                         f"{manifest.get('shards_planned', '?')} shards); rerun sharding/build_shards.py to finish")
    return manifest


def _readable_manifest(split_dir: str | Path) -> dict:
    """The manifest of a complete split with at least one sample (what training needs)."""
    manifest = _require_complete(split_dir, read_manifest(split_dir))
    if sum(e["samples"] for e in manifest["shards"]) == 0:
        raise ValueError(f"{storage.join(split_dir, MANIFEST)}: the split holds no samples")
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
# One sample: decode (rgnn.data.shardformat, then its image), then the shared Preprocess


@dataclass(frozen=True)
class SampleTransform:
    """Raw shard sample -> the prepared dict `collate` batches (image, proposals, labels, gt boxes)."""

    num_classes: int
    preprocess: Preprocess

    def __call__(self, sample: dict, where: str) -> dict:
        s = decode_sample(sample, where)
        image = decode_image(s.image, name=f"{where} sample {s.key!r}.{s.image_field}")  # uint8 (H, W, 3)
        rec = s.record
        p = self.preprocess(image, s.boxes, s.scores, rec.gt_boxes)
        return {
            "image": p.image, "boxes": p.boxes,
            "target": torch.from_numpy(rec.target(self.num_classes)),
            "ignore": torch.from_numpy(rec.difficult_only(self.num_classes)),
            "gt_boxes": p.gt_boxes,
            "gt_classes": torch.from_numpy(rec.gt_classes), "id": rec.image_id,
        }


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
    """Raw samples of one shard, in order, streamed (from an object store: fetched in blocks as read);
    errors name the shard."""
    n = 0
    try:
        with storage.open_read(path) as f:
            for sample in group_by_keys(tar_file_expander([{"url": path, "stream": f}])):
                n += 1
                yield sample
    except FileNotFoundError:
        raise FileNotFoundError(f"shard missing: {path}") from None
    except (PermissionError, ConnectionError):  # the store's answer (named), not a corrupt shard
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"corrupt shard {path}: {e}") from None
    if n != expected:
        raise ValueError(f"shard {path} holds {n} samples but the manifest says {expected}")


def _read_part(part: _Part) -> Iterator[dict]:
    for i, sample in enumerate(_read_shard(part.path, part.samples)):
        if (part.offset + i) % part.modulus == part.residue:
            sample["__shard__"] = part.path
            yield sample


def first_image(split_dir: str | Path) -> bytes:
    """The image file of the split's first sample, as stored (an example input for a logged model)."""
    entry = next(e for e in _readable_manifest(split_dir)["shards"] if e["samples"] > 0)
    with contextlib.closing(_read_shard(str(storage.join(split_dir, entry["name"])), entry["samples"])) as samples:
        sample = next(samples)
    return sample[image_fields(sample)[0]]


class ShardDataset(IterableDataset):
    """One rank's view of a split: yields `Batch`es (see the module docstring for the splitting)."""

    def __init__(self, split_dir: str | Path, *, batch_size: int, transform: SampleTransform, rank: int,
                 world_size: int, num_workers: int, shuffle: bool, seed: int, epoch: int, for_eval: bool,
                 shuffle_buffer: int = SHUFFLE_BUFFER):
        manifest = _readable_manifest(split_dir)
        offsets = itertools.accumulate([e["samples"] for e in manifest["shards"]], initial=0)
        self.shards = [_Part(str(storage.join(split_dir, e["name"])), off, e["samples"])
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


def shard_loader(split_dir: str | Path, preprocess: Preprocess, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 for_eval: bool = False, shuffle_buffer: int = SHUFFLE_BUFFER) -> Iterable[Batch]:
    """Batches of one split for one rank (see the module docstring).

    Args:
        split_dir: SHARDS/<split>, holding manifest.json and the shards (a local path or an object-store
            URI, s3://bucket/prefix/<split>: every rank streams its shards from the store, no local copy).
        preprocess: the stage's input transform (sizes, T, normalisation, whole images for stage 1).
        batch_size: images per batch.
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
    if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"need batch_size >= 1, num_workers >= 0 and shuffle_buffer >= 1; got {batch_size}, "
                         f"{num_workers}, {shuffle_buffer}")
    preprocess.inputs.validate()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    transform = SampleTransform(len(class_names(split_dir)), preprocess)
    dataset = ShardDataset(split_dir, batch_size=batch_size, transform=transform, rank=rank,
                           world_size=world_size, num_workers=num_workers, shuffle=shuffle and not for_eval,
                           seed=seed, epoch=epoch, for_eval=for_eval, shuffle_buffer=shuffle_buffer)
    if num_workers == 0:
        return dataset
    # Batches are built inside the workers (batch_size=None): each worker owns a quota of whole batches.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
