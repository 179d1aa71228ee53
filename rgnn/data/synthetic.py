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
from pathlib import Path

import cv2
import numpy as np

from rgnn.cli import user_errors
from rgnn.io.storage import write_text

SHAPES = ("disc", "square", "triangle", "diamond", "cross")
PATTERNS = ("hstripes", "vstripes")
CLASS_NAMES = [f"{s}-{p}" for s in SHAPES for p in PATTERNS]
STRIPE_PERIOD = 3
SPLITS = {"train2017": 1, "val2017": 2}


def shape_mask(shape: str, size: int) -> np.ndarray:
    """uint8 [size, size] mask of one shape filling its square.

    `SHAPES` and the clutter's "ellipse" and "ring" draw the built-in set; "star", "frame" and
    "lshape" widen the label space of the pretraining crops (rgnn/train/pretrain.py).
    """
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
    elif shape == "star":  # 5 points up, inner radius 0.45 of the outer
        angle = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2, 0.45, 1.0) * s / 2
        poly = np.stack([s / 2 + radius * np.cos(angle), s / 2 + radius * np.sin(angle)], 1)
        cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
    elif shape == "frame":  # a hollow square, sides a quarter of the size thick
        t = max(size // 4, 2)
        m[:] = 1
        m[t:size - t, t:size - t] = 0
    elif shape == "lshape":
        t = max(2 * size // 5, 2)
        m[:, :t] = 1
        m[size - t:, :] = 1
    else:
        raise ValueError(f"shape={shape!r}: not a shape this module draws")
    return m


def texture(pattern: str, size: int, period: int = STRIPE_PERIOD) -> np.ndarray:
    """float32 [size, size] in {0, 1}: which of the object's two tones each pixel takes.

    `pattern` is "hstripes", "vstripes", "dstripes" (diagonal), "checker" or "solid"; stripes
    and checker squares are `period` pixels wide.
    """
    yy, xx = np.mgrid[:size, :size]
    if pattern == "hstripes":
        return ((yy // period) % 2).astype(np.float32)
    if pattern == "vstripes":
        return ((xx // period) % 2).astype(np.float32)
    if pattern == "dstripes":
        return (((yy + xx) // period) % 2).astype(np.float32)
    if pattern == "checker":
        return (((yy // period) + (xx // period)) % 2).astype(np.float32)
    if pattern == "solid":
        return np.ones((size, size), np.float32)
    raise ValueError(f"pattern={pattern!r}: expected hstripes, vstripes, dstripes, checker or solid")


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
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


def paint(img: np.ndarray, shape: str, pattern: str, x: int, y: int, size: int,
          rng: np.random.Generator, period: int = STRIPE_PERIOD) -> tuple[int, int, int, int]:
    """Paint one object (random light tone, dark tone a fraction of it) into float32 `img`[H, W, 3].

    The size x size square at (x, y) must lie inside `img`. Returns the exact extent of the
    painted pixels (x1, y1, x2, y2).
    """
    mask = shape_mask(shape, size).astype(bool)
    tone = texture(pattern, size, period)[..., None]
    light = rng.uniform(150, 255, 3)
    dark = light * rng.uniform(0.15, 0.4)
    patch = dark + (light - dark) * tone
    region = img[y:y + size, x:x + size]
    region[mask] = patch[mask]
    ys, xs = np.nonzero(mask)
    return x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1


def _canvas(rng: np.random.Generator) -> np.ndarray:
    """A float32 [H, W, 3] backdrop of random size (W 128-320, aspect 0.6-1.5)."""
    w = int(rng.integers(128, 321))
    h = int(np.clip(w * rng.uniform(0.6, 1.5), 96, 360))
    return background(h, w, rng).copy()


def _layout(img: np.ndarray, n_objects: int, n_clutter: int, areas: tuple[float, float], min_side: int,
            rng: np.random.Generator):
    """Yield (kind, (x, y), side) for "object" and "clutter" squares in random order, sides log-uniform
    in `areas` (fractions of the image area), none overlapping; a square with no free spot is left out."""
    h, w = img.shape[:2]
    kinds = ["object"] * n_objects + ["clutter"] * n_clutter
    rng.shuffle(kinds)
    taken = []
    for kind in kinds:
        frac = np.exp(rng.uniform(np.log(areas[0]), np.log(areas[1])))
        size = int(np.clip(np.sqrt(frac * w * h), min_side, min(w, h) - 1))
        spot = _place(size, w, h, taken, rng)
        if spot is None:
            continue
        taken.append((*spot, size))
        yield kind, spot, size


def make_image(rng: np.random.Generator):
    """One synthetic image with its objects.

    Returns:
        (uint8 ndarray[H, W, 3] RGB, list of (class index, [x1, y1, x2, y2])).
    """
    img = _canvas(rng)
    objects = []
    n_objects = int(rng.choice(6, p=[0.05, 0.25, 0.25, 0.2, 0.15, 0.1]))
    # log-uniform side: areas from ~1/60 of the image to ~1/2
    for kind, spot, size in _layout(img, n_objects, int(rng.integers(1, 4)), (1 / 60, 1 / 2), 12, rng):
        if kind == "object":
            c = int(rng.integers(len(CLASS_NAMES)))
            shape, pattern = SHAPES[c // len(PATTERNS)], PATTERNS[c % len(PATTERNS)]
            objects.append((c, list(paint(img, shape, pattern, *spot, size, rng))))
        else:
            shape = str(rng.choice(SHAPES + ("ellipse", "ring")))
            paint(img, shape, str(rng.choice(["solid", "checker"])), *spot, size, rng)
    return np.clip(img, 0, 255).astype(np.uint8), objects


# A second set for checking a recipe on data the project was not tuned on: glyphs instead
# of striped shapes, solid colours, the same backdrop and size range, solid shapes as clutter.
GLYPHS = ("A", "E", "K", "R", "X", "Z", "3", "7")


def _glyph_mask(glyph: str, size: int) -> np.ndarray:
    """uint8 [size, size] mask of one glyph (OpenCV's Hershey simplex font) filling most of its square."""
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(size // 8, 1)
    (w, h), base = cv2.getTextSize(glyph, font, 1.0, thick)
    scale = 0.9 * size / max(w, h + base)
    (w, h), base = cv2.getTextSize(glyph, font, scale, thick)
    m = np.zeros((size, size), np.uint8)
    cv2.putText(m, glyph, ((size - w) // 2, (size + h) // 2), font, scale, 1, thick, cv2.LINE_8)
    return m


def make_glyph_image(rng: np.random.Generator):
    """One image of the glyph set: (uint8 ndarray[H, W, 3] RGB, list of (class index, [x1, y1, x2, y2]))."""
    img = _canvas(rng)
    objects = []
    n_objects = int(rng.integers(1, 5))
    for kind, spot, size in _layout(img, n_objects, int(rng.integers(1, 4)), (1 / 40, 1 / 3), 16, rng):
        if kind == "clutter":
            paint(img, str(rng.choice(["disc", "square", "ring"])), "solid", *spot, size, rng)
            continue
        c = int(rng.integers(len(GLYPHS)))
        mask = _glyph_mask(GLYPHS[c], size).astype(bool)
        x, y = spot
        img[y:y + size, x:x + size][mask] = rng.uniform(0, 255, 3)
        ys, xs = np.nonzero(mask)
        objects.append((c, [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]))
    return np.clip(img, 0, 255).astype(np.uint8), objects


VARIANTS = {"shapes": (make_image, CLASS_NAMES), "glyphs": (make_glyph_image, list(GLYPHS))}


def write_split(out: Path, split: str, n: int, seed: int, make, class_names: list[str], description: str,
                supercategory: str) -> None:
    """Write `n` images of `make(rng) -> (RGB uint8 image, [(class index, [x1, y1, x2, y2]), ...])` and
    their COCO annotation file, out/<split>/ and out/annotations/instances_<split>.json. Image i draws
    from its own generator, seeded (seed, split, i): the same seed gives the same files."""
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        img, objects = make(rng)
        image_id = SPLITS[split] * 1_000_000 + i
        name = f"{image_id:012d}.jpg"
        ok, jpg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        (out / split / name).write_bytes(jpg.tobytes())
        h, w = img.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for c, (x1, y1, x2, y2) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id(c),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    doc = {
        "info": {"description": description},
        "images": images, "annotations": annotations,
        "categories": [{"id": category_id(c), "name": name, "supercategory": supercategory}
                       for c, name in enumerate(class_names)],
    }
    # the annotation file appears last and whole: its presence marks a done split
    write_text(out / "annotations" / f"instances_{split}.json", json.dumps(doc))


def category_id(c: int) -> int:
    """Sparse, COCO-like category ids (COCO's run 1..90 with gaps), so the id -> index mapping is used."""
    return 3 * c + 2


def generate(out_dir: str | Path, train: int = 200, val: int = 50, seed: int = 0, variant: str = "shapes") -> Path:
    """Write the synthetic set (`variant` "shapes", the built-in one, or "glyphs") in COCO 2017 layout
    under `out_dir`; returns `out_dir`."""
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train} val={val}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {tuple(VARIANTS)}")
    out = Path(out_dir)
    make, class_names = VARIANTS[variant]
    for split, n in (("train2017", train), ("val2017", val)):
        write_split(out, split, n, seed, make, class_names, f"RGNN built-in synthetic set ({variant}), seed {seed}",
                    variant)
    return out


def generator_cli(generate, prog: str, doc: str, sizes: tuple[int, int], variants: tuple[str, ...],
                  variant_help: str, argv: list[str] | None) -> Path:
    """The command line of a generated set: `generate(out, train, val, seed, variant)` from flags."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (COCO 2017 layout)")
    p.add_argument("--train", type=int, default=sizes[0], help=f"number of training images (default {sizes[0]})")
    p.add_argument("--val", type=int, default=sizes[1], help=f"number of validation images (default {sizes[1]})")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    p.add_argument("--variant", choices=variants, default=variants[0], help=variant_help)
    a = p.parse_args(argv)
    if a.train < 0 or a.val < 0:
        p.error("--train and --val must be >= 0")
    with user_errors():
        out = generate(a.out, a.train, a.val, a.seed, a.variant)
    print(f"wrote {a.train} train + {a.val} val images to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    generator_cli(generate, "python -m rgnn.data.synthetic", __doc__, (200, 50), tuple(VARIANTS),
                  "shapes: the built-in set; glyphs: 8 letter and digit classes, solid colours (default shapes)", argv)


if __name__ == "__main__":
    main()
