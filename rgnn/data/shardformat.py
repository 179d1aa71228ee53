"""The shard format, defined once: what a WebDataset shard sample holds, how its fields are encoded and
decoded, and the split's manifest. sharding/ writes with it, rgnn.data.shards reads with it.

Shard: SHARDS/<split>/<split>-NNNNNN.tar, a tar whose members are `<key>.<field>`, one sample per
image, a sample's fields in sorted order (`add_sample`). A sample:
- key: the image id, with anything but letters, digits, `_` and `-` replaced by `_` (`sample_key`);
- `jpg` (JPEG sources) or `png` (PNG sources): the original file's bytes, never re-encoded; any
  other source format keeps its own extension (`image_field`). One image field per sample;
- `boxes.npy`: float32 (T, 4) EdgeBoxes proposals x1 y1 x2 y2 in original pixels, by score desc;
- `scores.npy`: float32 (T,);
- `json`: {"id", "file", "width", "height", "labels", "gt_boxes": [[x1, y1, x2, y2, class], ...],
  "difficult": [bool per gt box]}: the image's ImageRecord.
`<split>/manifest.json` (MANIFEST) lists the shards with sample counts, sizes and sha256 checksums;
sharding/job.py writes it, `read_manifest` and `check_shard` read and check it.

numpy, json and bytes only, no torch: the sharding actors encode with it and start without torch.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rgnn.io import storage
from rgnn.data.records import ImageRecord

MANIFEST = "manifest.json"
META_FIELDS = ("json", "boxes.npy", "scores.npy")


def sample_key(image_id: int | str) -> str:
    """The WebDataset key of an image: its id, with anything but letters, digits, `_` and `-`
    (dots would split the key from the field names) replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(image_id))


def image_field(data: bytes, path: str) -> str:
    """The sample field that holds an image's bytes: `jpg`, `png`, else the file's extension."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "": "img"}.get(ext, ext)


def image_fields(sample: dict) -> list[str]:
    """The fields of a raw sample that are not metadata: its image (one, in a valid sample)."""
    return [k for k in sample if not k.startswith("__") and k not in META_FIELDS]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(record: ImageRecord, image: bytes, boxes: np.ndarray, scores: np.ndarray) -> dict:
    """One raw sample: {"__key__": key, <image field>: image, "boxes.npy", "scores.npy", "json": bytes}.

    Args:
        record: the image's annotations (its width and height as the image file has them).
        image: the image file's bytes, stored as they are.
        boxes: (T, 4) proposals x1 y1 x2 y2, by score desc; scores: (T,). Stored as float32.
    """
    meta = {
        "id": record.image_id if isinstance(record.image_id, str) else int(record.image_id),
        "file": record.path, "width": int(record.width), "height": int(record.height),
        "labels": [int(c) for c in record.labels],
        "gt_boxes": [[*map(float, b), int(c)] for b, c in zip(record.gt_boxes, record.gt_classes)],
        "difficult": [bool(d) for d in record.difficult],
    }
    return {"__key__": sample_key(record.image_id), image_field(image, record.path): image,
            "boxes.npy": _npy(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "scores.npy": _npy(np.asarray(scores, np.float32).reshape(-1)),
            "json": json.dumps(meta).encode()}


def add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Append one raw sample as WebDataset lays it out: members `<key>.<field>`, fields in sorted order.

    Plain tarfile rather than webdataset's TarWriter, which loads torch: a sharding actor then starts in
    about half the time and memory. mtime 0 and fixed owners: the same sample gives the same bytes.
    """
    key = sample["__key__"]
    for field in sorted(k for k in sample if k != "__key__"):
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size, info.mtime, info.mode = len(sample[field]), 0, 0o444
        info.uname = info.gname = "rgnn"
        tar.addfile(info, io.BytesIO(sample[field]))


@dataclass(frozen=True)
class Sample:
    """One decoded sample; the image stays as stored (rgnn.data.images.decode_image decodes it)."""

    key: str
    image_field: str  # jpg, png, ...
    image: bytes
    boxes: np.ndarray  # float32 (T, 4), x1 y1 x2 y2 in original pixels, by score desc
    scores: np.ndarray  # float32 (T,)
    record: ImageRecord


def decode_sample(sample: dict, where: str) -> Sample:
    """Raw sample ({"__key__": key, field: bytes, ...}, as read from a shard) -> Sample.

    Raises:
        ValueError: a field is missing, extra or unreadable (a `.npy` field not float32 as written, or
            whose header's shape does not match its bytes; json nested too deeply), or the proposals'
            shapes are not (T, 4) and (T,) (the message names `where` and the sample's key).
    """
    name = f"{where} sample {sample.get('__key__')!r}"
    images = image_fields(sample)
    missing = [k for k in META_FIELDS if k not in sample] + ([] if images else ["jpg"])
    if missing or len(images) > 1:
        raise ValueError(f"{name}: expected fields {list(META_FIELDS)} and one image, got {sorted(sample)}")
    boxes = _load_npy(sample["boxes.npy"], name, "boxes.npy")
    scores = _load_npy(sample["scores.npy"], name, "scores.npy")
    try:
        meta = json.loads(sample["json"])
        gt = np.asarray(meta["gt_boxes"], np.float32).reshape(-1, 5)  # (G, 5): x1 y1 x2 y2 class
        record = ImageRecord(meta["id"], meta["file"], int(meta["width"]), int(meta["height"]),
                             list(meta["labels"]), gt[:, :4], gt[:, 4].astype(np.int64),
                             np.asarray(meta.get("difficult", [False] * len(gt)), bool))
    except RecursionError:
        raise ValueError(f"{name}: its json is nested too deeply to read") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"{name}: unreadable fields: {e!r}") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),):
        raise ValueError(f"{name}: boxes.npy {boxes.shape} and scores.npy {scores.shape} "
                         "are not (T, 4) and (T,)")
    return Sample(sample.get("__key__"), images[0], sample[images[0]], boxes, scores, record)


def _load_npy(data: bytes, name: str, field: str) -> np.ndarray:
    """The float32 array of a sample's `.npy` field (`name`: the sample, for errors), its header checked
    first: the dtype the writer writes (little-endian float32) and a shape whose values are exactly the
    bytes that follow, so a header declaring (10**11, 4) is refused before anything is allocated."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format version {version}, expected 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except ValueError as e:
        raise ValueError(f"{name}: {field} is not a .npy array: {e}") from None
    if dtype != np.dtype("<f4"):
        raise ValueError(f"{name}: {field} holds {dtype}, expected float32")
    values = math.prod(shape)
    if min(shape, default=0) < 0 or values * 4 != len(data) - f.tell():
        raise ValueError(f"{name}: {field} declares shape {shape} ({values} values) but holds "
                         f"{len(data) - f.tell()} bytes of data")
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# The manifest


def read_manifest(split_dir: str | Path) -> dict:
    """The manifest of one split's shards (a local folder or an object-store URI).

    Raises:
        FileNotFoundError: no manifest.json in `split_dir` (or no such bucket).
        ValueError: it does not parse, or is not a shard manifest, or lists a shard by anything but a
            file name in `split_dir` (the message names the file).
        PermissionError / ConnectionError: the object store refuses or does not answer (named).
    """
    path = storage.join(split_dir, MANIFEST)
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"shard manifest {e}") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("class_names", "shards", "skipped", "records", "complete")
               if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ValueError(f"{path} is not a shard manifest (missing {missing})")
    if not isinstance(manifest["shards"], list) or not all(isinstance(e, dict) for e in manifest["shards"]):
        raise ValueError(f"{path} is not a shard manifest (its shards should be a list of entries)")
    for entry in manifest["shards"]:
        name = entry.get("name")
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"{path}: shard {name!r} is not a file name in the split's folder (a shard "
                             "listed by an absolute path, a subfolder or `..` could be another split's)")
    return manifest


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file (local path or URI), streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for block in iter(lambda: f.read(storage.BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def check_shard(split_dir: str | Path, entry: dict, checksum: bool = True) -> None:
    """Check that one manifest entry's shard exists with its recorded size (and sha256); on an object
    store the size is the object's metadata, the sha256 reads the object back (streamed).

    Raises:
        FileNotFoundError: the shard is missing.
        ValueError: its size or checksum differs from the manifest (the message names the shard).
    """
    path = storage.join(split_dir, entry["name"])
    if not storage.exists(path):
        raise FileNotFoundError(f"shard missing: {path} (listed in {storage.join(split_dir, MANIFEST)})")
    size = storage.size(path)
    if size != entry["bytes"]:
        raise ValueError(f"shard {path} is {size} bytes but the manifest says {entry['bytes']}: "
                         "corrupt or incomplete; rerun sharding/build_shards.py to rebuild it")
    if checksum and file_sha256(path) != entry["sha256"]:
        raise ValueError(f"shard {path} does not match its manifest sha256: corrupt; "
                         "rerun sharding/build_shards.py to rebuild it")
