"""The built-in synthetic multi-label set, written in the COCO 2017 layout.

    python -m rgnn.data.synthetic --out DIR [--train N] [--val N] [--seed S]

Ten classes, each a shape (disc, square, triangle, diamond, cross) with a fine stripe texture
(horizontal or vertical, 3-pixel period). Object colours are random, so neither colour nor
coarse appearance tells the classes apart: a classifier must resolve the stripes and the
outline. Objects range from below 1/32 of the image area to above 1/4; on a whole image shrunk
small the stripes of the small ones vanish (so regions matter). Clutter that belongs to no
class (the same shapes solid or checkered, ellipses, lines) sits beside them and, pooled
without gates, looks like objects at low resolution. Boxes are exact: the extent of the
pixels each object paints (objects do not overlap). Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np

SHAPES = ("disc", "square", "triangle", "diamond", "cross")
PATTERNS = ("hstripes", "vstripes")
CLASS_NAMES = [f"{s}-{p}" for s in SHAPES for p in PATTERNS]
# Sparse, COCO-like category ids (COCO's run 1..90 with gaps) so the id -> index mapping is used.
CATEGORY_IDS = [3 * i + 2 for i in range(len(CLASS_NAMES))]
STRIPE_PERIOD = 3
SPLITS = {"train2017": 1, "val2017": 2}


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """uint8 [size, size] mask of one shape filling its square."""
    m = np.zeros((size, size), np.uint8)
    s = size - 1
    if shape == "disc":
        cv2.circle(m, (size // 2, size // 2), size // 2, 1, -1)
    elif shape == "square":
        m[:] = 1
    elif shape == "triangle":
        cv2.fillPoly(m, [np.array([[s // 2, 0], [s, s], [0, s]], np.int32)], 1)
    elif shape == "diamond":
        cv2.fillPoly(m, [np.array([[s // 2, 0], [s, s // 2], [s // 2, s], [0, s // 2]], np.int32)], 1)
    elif shape == "cross":
        t = max(size // 3, 2)
        m[:, (size - t) // 2:(size + t) // 2] = 1
        m[(size - t) // 2:(size + t) // 2, :] = 1
    elif shape == "ellipse":
        cv2.ellipse(m, (size // 2, size // 2), (size // 2, size // 4), 30, 0, 360, 1, -1)
    elif shape == "ring":
        cv2.circle(m, (size // 2, size // 2), size // 2 - 1, 1, max(size // 8, 1))
    return m


def _texture(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size] in {0, 1}: which of the object's two tones each pixel takes."""
    yy, xx = np.mgrid[:size, :size]
    if pattern == "hstripes":
        return ((yy // STRIPE_PERIOD) % 2).astype(np.float32)
    if pattern == "vstripes":
        return ((xx // STRIPE_PERIOD) % 2).astype(np.float32)
    if pattern == "checker":
        return (((yy // STRIPE_PERIOD) + (xx // STRIPE_PERIOD)) % 2).astype(np.float32)
    return np.ones((size, size), np.float32)  # solid


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [h, w, 3]: a smooth colour gradient with noise."""
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
    ramp = t[None, :, None] if len(t) == w else t[:, None, None]
    img = c0 + (c1 - c0) * ramp
    return np.broadcast_to(img, (h, w, 3)) + rng.normal(0, 6, (h, w, 3)).astype(np.float32)


def _place(size: int, w: int, h: int, taken: list, rng: np.random.Generator):
    """A free top-left corner for a size x size square (no overlap with `taken`), or None."""
    for _ in range(30):
        x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        if all(x + size <= a or a + s <= x or y + size <= b or b + s <= y for a, b, s in taken):
            return x, y
    return None


def _paint(img: np.ndarray, shape: str, pattern: str, x: int, y: int, size: int,
           rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Paint one object; returns the exact extent of its painted pixels (x1, y1, x2, y2)."""
    mask = _shape_mask(shape, size).astype(bool)
    tone = _texture(pattern, size, rng)[..., None]
    light = rng.uniform(150, 255, 3)
    dark = light * rng.uniform(0.15, 0.4)
    patch = dark + (light - dark) * tone
    region = img[y:y + size, x:x + size]
    region[mask] = patch[mask]
    ys, xs = np.nonzero(mask)
    return x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1


def make_image(rng: np.random.Generator):
    """One synthetic image with its objects.

    Returns:
        (uint8 ndarray[H, W, 3] RGB, list of (class index, [x1, y1, x2, y2])).
    """
    w = int(rng.integers(128, 321))
    h = int(np.clip(w * rng.uniform(0.6, 1.5), 96, 360))
    img = _background(h, w, rng).copy()
    taken, objects = [], []
    n_objects = int(rng.choice(6, p=[0.05, 0.25, 0.25, 0.2, 0.15, 0.1]))
    n_clutter = int(rng.integers(1, 4))
    kinds = ["object"] * n_objects + ["clutter"] * n_clutter
    rng.shuffle(kinds)
    for kind in kinds:
        # log-uniform side: areas from ~1/60 of the image to ~1/2
        frac = np.exp(rng.uniform(np.log(1 / 60), np.log(1 / 2)))
        size = int(np.clip(np.sqrt(frac * w * h), 12, min(w, h) - 1))
        spot = _place(size, w, h, taken, rng)
        if spot is None:
            continue
        taken.append((*spot, size))
        if kind == "object":
            c = int(rng.integers(len(CLASS_NAMES)))
            shape, pattern = SHAPES[c // len(PATTERNS)], PATTERNS[c % len(PATTERNS)]
            objects.append((c, list(_paint(img, shape, pattern, *spot, size, rng))))
        else:
            shape = str(rng.choice(SHAPES + ("ellipse", "ring")))
            _paint(img, shape, str(rng.choice(["solid", "checker"])), *spot, size, rng)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _write_split(out: Path, split: str, n: int, seed: int) -> None:
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        img, objects = make_image(rng)
        image_id = SPLITS[split] * 1_000_000 + i
        name = f"{image_id:012d}.jpg"
        ok, jpg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        (out / split / name).write_bytes(jpg.tobytes())
        h, w = img.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for c, (x1, y1, x2, y2) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[c],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    doc = {
        "info": {"description": f"RGNN built-in synthetic set, seed {seed}"},
        "images": images, "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name in zip(CATEGORY_IDS, CLASS_NAMES)],
    }
    ann = out / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, ann)  # the annotation file appears last and whole: its presence marks a done split


def generate(out_dir: str | Path, train: int = 200, val: int = 50, seed: int = 0) -> Path:
    """Write the synthetic set in COCO 2017 layout under `out_dir`; returns `out_dir`."""
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train} val={val}")
    out = Path(out_dir)
    for split, n in (("train2017", train), ("val2017", val)):
        _write_split(out, split, n, seed)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rgnn.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (COCO 2017 layout)")
    p.add_argument("--train", type=int, default=200, help="number of training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="number of validation images (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    a = p.parse_args(argv)
    out = generate(a.out, a.train, a.val, a.seed)
    print(f"wrote {a.train} train + {a.val} val images to {out}")


if __name__ == "__main__":
    main()
