"""The sharding job: EdgeBoxes proposals on a Ray actor pool, written as WebDataset shards.

The library half of `python sharding/build_shards.py` (the CLI, sharding/build_shards.py): the
classes Ray ships (the shard tasks, the actors) live here, in an importable module, so that Ray
pickles them by reference even when the CLI runs as a script.

Step 1 of the paper's pipeline (section 3: "We adopt EdgeBox for region proposal generation"), done
once ahead of training. Writes SHARDS/<split>/<split>-NNNNNN.tar and SHARDS/<split>/manifest.json.

How it works:
- The shard plan is fixed up front from the record list alone: records in order, cut into shards
  by estimated size (image file bytes + proposal bytes), so that a rerun knows exactly which
  images belong to which shard.
- Each shard is one task for a pool of Ray actors (one CPU each) spread over the cluster's nodes
  (SPREAD). An actor computes the proposals of the shard's images and writes the shard under a
  temporary name, renamed when whole (to an object store: written to a local temporary file, then
  uploaded once; sharding/writer.py). A shard is the unit of parallel work:
  a job uses at most as many actors as it has shards to build.
- Images that cannot be used (missing file, corrupt or truncated image, a size that differs from
  the annotation's) are skipped and listed in the manifest with the reason, never a crash.
- If an actor dies, its shard goes to a new actor. The manifest is rewritten (atomically) after
  every finished shard, so an interrupted job loses at most the shards in flight.
- Resume: rerunning the same command keeps every shard whose manifest entry matches the plan and
  whose file matches its size and sha256 (on an object store: read back, streamed), and builds the
  rest. A manifest written with other settings (data set, proposal parameters, shard size, limit) is
  replaced: everything is rebuilt.
- Image bytes are stored as they are in the source file, never re-encoded: under `jpg` for JPEG
  files, `png` for PNG files (other formats keep their own extension). The sample format, and the
  manifest's reading and checks: rgnn.data.shardformat, which the reader (rgnn.data.shards) shares.

Ray: `build_shards` joins the Ray that is initialised, or starts (or joins) one as
`sharding.ray_setup.init_ray()` does; `actors=0` runs in this process, without Ray.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import ray
from tqdm import tqdm

from rgnn.io import storage
from rgnn.data.images import decode_image
from rgnn.data.records import ImageRecord, LabeledSet
from rgnn.data.proposals import EdgeBoxes, ProposalParams, add_counts, recall_counts, recall_summary
from rgnn.data.shardformat import MANIFEST, add_sample, check_shard, encode_sample, read_manifest, sample_key
from sharding.ray_setup import init_ray
from sharding.writer import exclusive, remove_stale_temps, write_atomic

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
DEFAULT_SHARD_SIZE = 1 << 30  # about 1 GB: few files per split, each streamed whole
SAMPLE_OVERHEAD = 4096  # json + 4 tar headers and padding, per sample (for the size estimate)
MAX_ATTEMPTS = 3  # a shard whose actor dies this often is an error, not bad luck
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class ShardTask:
    """One shard of the plan: its name and the records it holds, in order."""

    index: int
    name: str
    records: tuple[ImageRecord, ...]

    @functools.cached_property
    def inputs(self) -> str:
        """Fingerprint of what the shard is made from: each image's id, file (path, size, modification
        time) and whole annotation record. A kept shard must match it, so editing an annotation or
        replacing an image file rebuilds exactly the shards that hold it (the class list and the
        proposal settings are compared for the whole split, in the manifest's head)."""
        h = hashlib.sha256()
        for r in self.records:
            try:
                st = os.stat(r.path)
                file = [st.st_size, st.st_mtime_ns]
            except OSError:
                file = None  # missing: skipped by the actor
            h.update(json.dumps([str(r.image_id), r.path, file, r.width, r.height, list(map(int, r.labels)),
                                 r.gt_boxes.tolist(), r.gt_classes.tolist(), r.difficult.tolist()]).encode())
        return h.hexdigest()[:16]


def plan_shards(records: list[ImageRecord], split: str, shard_size: int, max_boxes: int) -> list[ShardTask]:
    """Cut the records, in order, into shards of at most about `shard_size` bytes.

    The estimate per image is its file size plus its proposals (`max_boxes` x 20 bytes) plus
    SAMPLE_OVERHEAD; a shard holds at least one image. Deterministic for the same inputs.

    Raises:
        ValueError: shard_size < 1, or two image ids that map to the same sample key.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 byte, got {shard_size}")
    seen: dict[str, int | str] = {}
    for r in records:
        key = sample_key(r.image_id)
        if key in seen:
            raise ValueError(f"image ids {seen[key]!r} and {r.image_id!r} share the sample key {key!r}")
        seen[key] = r.image_id
    groups: list[list[ImageRecord]] = []
    size = 0
    for r in records:
        try:
            est = os.stat(r.path).st_size
        except OSError:  # missing: skipped by the actor, listed in the manifest
            est = 0
        est += max_boxes * 20 + SAMPLE_OVERHEAD
        if not groups or (size + est > shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += est
    return [ShardTask(i, f"{split}-{i:06d}.tar", tuple(g)) for i, g in enumerate(groups)]


def make_sample(record: ImageRecord, proposer: Callable, recall_at: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """One raw shard sample (rgnn.data.shardformat.encode_sample) for a record, and its proposals'
    `recall_counts` among the best k for each k of `recall_at`.

    Raises:
        FileNotFoundError / OSError: the image file cannot be read.
        ValueError: it does not decode, or its size differs from the annotation's.
    """
    data = Path(record.path).read_bytes()
    image = decode_image(data, name=record.path)
    h, w = image.shape[:2]
    if (w, h) != (record.width, record.height):
        raise ValueError(f"{record.path}: image is {w}x{h} but the annotation says {record.width}x{record.height}")
    boxes, scores = proposer(image)
    return encode_sample(record, data, boxes, scores), recall_counts(boxes, record.gt_boxes, w, h, recall_at)


def write_shard(task: ShardTask, split_dir: str, params: ProposalParams, edge_model: str | None = None,
                report: Callable[[int], None] = lambda done: None) -> dict:
    """Compute the proposals of a shard's images and write the shard (whole or not at all).

    Each shard gets a fresh proposer, so that its bytes depend on its own inputs only: OpenCV's
    EdgeBoxes object carries state from one image to the next (its scores shift slightly), and a
    rebuilt shard must equal the original whichever actor built what before.

    Args:
        report: called with the number of images handled so far (progress).

    Returns:
        the shard's manifest entry {name, samples, sha256, bytes, inputs, recall_counts} plus
        `skipped`, a list of {image, reason, shard} for the images left out. `recall_counts` (summed
        `rgnn.data.proposals.recall_counts`) is taken among the best T = max_boxes / 2 proposals (training's
        T when the shards store 2 T) and among all max_boxes.
    """
    proposer = EdgeBoxes(params, edge_model)
    skipped, samples, counts = [], 0, {}
    recall_at = tuple(sorted({max(params.max_boxes // 2, 1), params.max_boxes}))

    def fill(stream) -> None:
        nonlocal samples
        tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)
        for i, record in enumerate(task.records):
            try:
                sample, found = make_sample(record, proposer, recall_at)
                add_sample(tar, sample)
                add_counts(counts, found)
                samples += 1
            except FileNotFoundError:
                skipped.append({"image": record.path, "reason": "image file missing", "shard": task.name})
            except (OSError, ValueError, cv2.error) as e:
                skipped.append({"image": record.path, "reason": str(e).strip(), "shard": task.name})
            report(i + 1)
        tar.close()  # writes the end-of-archive blocks; the stream itself is write_atomic's

    sha, size = write_atomic(f"{split_dir}/{task.name}", fill)
    for s in skipped:
        log.warning("skipped %s: %s", s["image"], s["reason"])
    return {"name": task.name, "samples": samples, "sha256": sha, "bytes": size, "inputs": task.inputs,
            "recall_counts": counts, "skipped": skipped}


@ray.remote(num_cpus=0)
class _Progress:
    """Images handled per shard, reported by the workers, read by the driver's progress bar."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def report(self, shard: int, done: int) -> None:
        self.done[shard] = done  # a resubmitted shard starts again from 0

    def total(self) -> int:
        return sum(self.done.values())


@ray.remote(num_cpus=1)
class ShardWorker:
    """Computes proposals and writes shards; one CPU, one thread (many of them share a node)."""

    def __init__(self, params: ProposalParams, edge_model: str | None, split_dir: str, progress):
        cv2.setNumThreads(1)
        if "torch" in sys.modules:  # nothing here loads torch; should anything, one thread
            sys.modules["torch"].set_num_threads(1)
        self.params, self.edge_model = params, edge_model
        self.split_dir = split_dir
        self.progress = progress

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def build(self, task: ShardTask) -> dict:
        last = [0.0]

        def report(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done == len(task.records):
                last[0] = now
                self.progress.report.remote(task.index, done)

        return write_shard(task, self.split_dir, self.params, self.edge_model, report)


def _settings(labeled_set: LabeledSet, params: ProposalParams, edge_model: str | None,
              shard_size: int, limit: int | None, records: int) -> dict:
    """What a manifest must agree on for its shards to be kept."""
    return {"format": MANIFEST_FORMAT, "dataset": labeled_set.name,
            "proposals": {**params.to_dict(), "edge_model": edge_model},
            "shard_size": shard_size, "limit": limit, "records": records}


class _Manifest:
    """The manifest of one split, rewritten whole after every change."""

    def __init__(self, split_dir: str, labeled_set: LabeledSet, settings: dict, plan: list[ShardTask]):
        self.path = f"{split_dir}/{MANIFEST}"
        self.split_dir = split_dir
        head = {**settings, "split": labeled_set.name.rsplit("/", 1)[-1],
                "class_names": list(labeled_set.class_names),
                "category_ids": [int(c) for c in labeled_set.category_ids], "shards_planned": len(plan)}
        self.head = json.loads(json.dumps(head))  # as a reread manifest holds it (tuples -> lists)
        self.read_skipped = [{"image": str(image), "reason": reason} for image, reason in labeled_set.skipped]
        self.entries: dict[str, dict] = {}  # name -> entry, with its `skipped`
        self.job = {"actors": 0, "nodes": [], "resubmitted": []}

    def resume(self, plan: list[ShardTask]) -> list[ShardTask]:
        """Keep the verified shards of a previous run with the same settings; return the rest."""
        try:
            old = read_manifest(self.split_dir)
        except FileNotFoundError:
            old = None
        except ValueError as e:
            log.warning("%s; rebuilding every shard", e)
            old = None
        if old is not None and any(old.get(k) != v for k, v in self.head.items() if k != "shards_planned"):
            log.warning("%s was written with other settings; rebuilding every shard", self.path)
            old = None
        if old is not None:
            by_name = {t.name: t for t in plan}
            changed = [e["name"] for e in old["shards"] if e["name"] in by_name and e.get("inputs") != by_name[e["name"]].inputs]
            if changed:
                log.warning("%s: the inputs (annotations or image files) of %d shards changed since they were built; "
                            "rebuilding them: %s", self.split_dir, len(changed), ", ".join(changed[:10]))
            for e in old["shards"]:
                task = by_name.get(e["name"])
                if task is None or e.get("inputs") != task.inputs:
                    continue
                try:
                    check_shard(self.split_dir, e)
                except (FileNotFoundError, ValueError) as err:
                    log.info("rebuilding: %s", err)
                    continue
                skipped = [s for s in old["skipped"] if s.get("shard") == e["name"]]
                self.entries[e["name"]] = {**e, "skipped": skipped}
        return [t for t in plan if t.name not in self.entries]

    def add(self, result: dict) -> None:
        self.entries[result["name"]] = result
        self.write()

    def write(self) -> None:
        entries = [self.entries[k] for k in sorted(self.entries)]
        counts = {}
        for e in entries:
            add_counts(counts, e.get("recall_counts", {}))
        doc = {**self.head,
               "complete": len(entries) == self.head["shards_planned"],
               "samples": sum(e["samples"] for e in entries),
               "proposal_recall": recall_summary(counts),
               "shards": [{k: v for k, v in e.items() if k != "skipped"} for e in entries],
               "skipped": self.read_skipped + [s for e in entries for s in e["skipped"]],
               "job": self.job}
        storage.write_bytes(self.path, json.dumps(doc, indent=1).encode())  # object store: one PUT


def _run_inline(todo: list[ShardTask], manifest: _Manifest, params: ProposalParams, edge_model: str | None,
                bar: tqdm) -> None:
    for task in todo:
        base = bar.n
        manifest.add(write_shard(task, manifest.split_dir, params, edge_model,
                                 lambda done: bar.update(base + done - bar.n)))


def _run_on_ray(todo: list[ShardTask], manifest: _Manifest, actors: int | None, params: ProposalParams,
                edge_model: str | None, bar: tqdm) -> None:
    """Run the shard tasks on a pool of actors; a dead actor's shard goes to a new actor."""
    if actors is None:
        actors = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    n = min(actors, len(todo))
    if n < actors:
        log.warning("%d shards to build for %d actors: only %d actors used (a smaller --shard-size "
                    "gives more, smaller shards)", len(todo), actors, n)
    progress = _Progress.remote()
    token = uuid.uuid4().hex[:8]
    pool, node_refs = [], []

    def new_actor() -> ray.actor.ActorHandle:
        name = f"rgnn-shards-{manifest.head['split']}-{token}-{len(pool)}"
        actor = ShardWorker.options(name=name, scheduling_strategy="SPREAD").remote(
            params, edge_model, manifest.split_dir, progress)
        pool.append(actor)
        node_refs.append(actor.node_id.remote())
        return actor

    idle = collections.deque(new_actor() for _ in range(n))
    queue, running, attempts = collections.deque(todo), {}, collections.Counter()
    manifest.job["actors"] = n
    try:
        while queue or running:
            while queue and idle:
                task, actor = queue.popleft(), idle.popleft()
                running[actor.build.remote(task)] = (task, actor)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_EVERY_S)
            for ref in ready:
                task, actor = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    attempts[task.name] += 1
                    if attempts[task.name] >= MAX_ATTEMPTS:
                        raise RuntimeError(f"shard {task.name}: its actor died {MAX_ATTEMPTS} times; "
                                           f"last: {e}") from e
                    log.warning("actor building %s died (%s); resubmitting it to a new actor",
                                task.name, type(e).__name__)
                    ray.kill(actor)  # if it is only unreachable, it must not write on
                    manifest.job["resubmitted"].append(task.name)
                    queue.appendleft(task)
                    idle.append(new_actor())
                    continue
                manifest.add(result)
                idle.append(actor)
            bar.update(max(min(ray.get(progress.total.remote()), bar.total) - bar.n, 0))
        bar.update(bar.total - bar.n)
        manifest.job["nodes"] = sorted({node for node in _gather(node_refs) if node})
        manifest.write()
    finally:
        for actor in pool:
            ray.kill(actor)
        ray.kill(progress)


def _gather(refs: list, timeout: float = 10.0) -> list:
    """Results of refs that succeed within `timeout` (None for those that fail or time out)."""
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=timeout))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            out.append(None)
    return out


def build_shards(labeled_set: LabeledSet, out_dir: str | Path, *, actors: int | None = None,
                 params: ProposalParams = ProposalParams(), shard_size: int = DEFAULT_SHARD_SIZE,
                 edge_model: str | Path | None = None, limit: int | None = None,
                 progress: bool = True, address: str | None = None) -> Path | str:
    """Compute proposals and write the shards and manifest of one split (see the module docstring).

    Joins the Ray that is initialised, or starts (or joins) one as `init_ray(address)` does.

    Args:
        labeled_set: the split's records; its name's last part ("coco/train2017" -> "train2017")
            names the output folder and the shards.
        out_dir: SHARDS, a local folder or an object-store URI (s3://bucket/prefix); the split goes to
            SHARDS/<split>/.
        actors: actor count (default: one per CPU of the cluster); 0 runs in this process, no Ray.
        params: EdgeBoxes parameters (params.max_boxes = T proposals kept per image).
        shard_size: target shard size in bytes.
        edge_model: OpenCV structured-edge model file (model.yml.gz); default: gradient edges.
        limit: use only the first `limit` records.
        progress: show a progress bar (images/s).
        address: the Ray cluster to join when actors run (None: RAY_ADDRESS, a running local head, or a new one).

    Returns:
        SHARDS/<split> (a Path, or a str for a URI: rgnn.io.storage.location).

    Raises:
        ValueError: a bad argument; RuntimeError: a shard whose actor keeps dying.
    """
    if actors is not None and actors < 0:
        raise ValueError(f"actors must be >= 0, got {actors}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if edge_model is not None:
        edge_model = str(Path(edge_model).expanduser().resolve())
        if not Path(edge_model).is_file():
            raise FileNotFoundError(f"edge model file not found: {edge_model}")
    records = labeled_set.records[:limit] if limit is not None else labeled_set.records
    split = labeled_set.name.rsplit("/", 1)[-1]
    split_dir = str(storage.join(out_dir, split))
    plan = plan_shards(records, split, shard_size, params.max_boxes)
    with exclusive(split_dir):
        return _build(labeled_set, split_dir, plan, len(records), actors, params, shard_size, edge_model, limit, progress,
                      address)


def _build(labeled_set: LabeledSet, split_dir: str, plan: list[ShardTask], records: int, actors: int | None,
           params: ProposalParams, shard_size: int, edge_model: str | None, limit: int | None,
           progress: bool, address: str | None) -> Path | str:
    split = labeled_set.name.rsplit("/", 1)[-1]
    manifest = _Manifest(split_dir, labeled_set, _settings(labeled_set, params, edge_model, shard_size, limit, records), plan)
    remove_stale_temps(split_dir)
    todo = manifest.resume(plan)
    manifest.write()
    kept = len(plan) - len(todo)
    if kept:
        log.info("%s: keeping %d verified shards, building %d", split_dir, kept, len(todo))
    with tqdm(total=sum(len(t.records) for t in todo), unit="img", desc=f"shards {split}",
              disable=not progress, dynamic_ncols=True) as bar:
        if todo and actors == 0:
            _run_inline(todo, manifest, params, edge_model, bar)
        elif todo:
            init_ray(address)
            _run_on_ray(todo, manifest, actors, params, edge_model, bar)
    return storage.location(split_dir)
