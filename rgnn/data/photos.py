"""A photographic multi-label set, written in the COCO 2017 layout: photographed objects pasted on photographs.

    python -m rgnn.data.photos --out DIR [--train N] [--val N] [--seed S] [--variant main|alt]

The pixels are real photographs from two Debian packages (`sudo apt-get install tuxpaint-stamps-default
mate-backgrounds`): Tux Paint's stamps, photographed objects cut out with an alpha channel in category
folders, and eight of MATE's twelve nature photographs (four show flowers or an insect, which would
be objects without a label: `UNUSED_BACKGROUNDS`). Each image (384 x 288) is a random crop of a photograph
(crop side 35-100% of the largest 4:3 crop), then 0-4 objects and 0-3 clutter stamps pasted in a random
order, each flipped at random, lightly jittered (brightness, contrast, saturation within +-15%) and
scaled so that its visible extent covers 1-30% (objects) or 1-8% (clutter) of the image. Boxes come
from the visible alpha after every paste: an object's pixels with alpha >= 0.5 that no later stamp
covers with alpha >= 0.5; an object left with under half of them visible is not annotated.

Classes group the stamps' folders (`GROUPINGS`; a folder includes its subfolders, `cartoon` and `toys`
subfolders and `_mirror` copies left out). The `main` variant (12 classes):

    bird       animals/birds             fruit       food/fruit
    fish       animals/fish              vegetable   food/vegetables
    insect     animals/insects           flower      plants/flowers
    mammal     animals/mammals           tree        plants/trees
    instrument hobbies/music             tool        household/tools
    vehicle    vehicles, military/vehicles   clothing    clothes

The `alt` variant regroups them (12 other classes: hoofed mammal, carnivore, rodent, water animal, ...,
see `GROUPINGS`) and takes the other four background photographs, for a second set the recipe
was not tuned on. Clutter stamps (symbols, road signs, flags, planets, seasonal things) belong to no class.

Object *instances* are split between the splits: per class, a quarter of the stamp files (at least one)
appear only in val, so every val object is a photograph the model never saw. Deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from rgnn.data.synthetic import SPLITS, generator_cli, write_split

STAMPS = Path("/usr/share/tuxpaint/stamps")
BACKGROUNDS = Path("/usr/share/backgrounds/mate/nature")
PACKAGES = "tuxpaint-stamps-default mate-backgrounds"
SIZE = (384, 288)  # width, height
OBJECTS = (0.05, 0.3, 0.3, 0.2, 0.15)  # P(0..4 objects)
OBJECT_AREA = (0.01, 0.30)  # of the image, log-uniform
CLUTTER_AREA = (0.01, 0.08)
MAX_CLUTTER = 3
VISIBLE = 0.5  # of an object's own pixels, for it to be annotated
VAL_FRACTION = 0.25  # of each class's stamp files
GROUPINGS = {
    "main": {
        "bird": ["animals/birds"], "fish": ["animals/fish"], "insect": ["animals/insects"],
        "mammal": ["animals/mammals"], "fruit": ["food/fruit"], "vegetable": ["food/vegetables"],
        "flower": ["plants/flowers"], "tree": ["plants/trees"], "instrument": ["hobbies/music"],
        "tool": ["household/tools"], "vehicle": ["vehicles", "military/vehicles"], "clothing": ["clothes"],
    },
    "alt": {
        "bird": ["animals/birds"],
        "water animal": ["animals/fish", "animals/shellfish", "animals/mammals/aquatic"],
        "hoofed mammal": ["animals/mammals/equines", "animals/mammals/bovines", "animals/mammals/deer",
                          "animals/mammals/camel"],
        "carnivore": ["animals/mammals/cats", "animals/mammals/dogs", "animals/mammals/bears"],
        "rodent": ["animals/mammals/rodents"], "insect": ["animals/insects"],
        "fruit or nut": ["food/fruit", "food/nuts"], "vegetable": ["food/vegetables"],
        "flower": ["plants/flowers"], "instrument": ["hobbies/music"],
        "household thing": ["household/tools", "household/dishes", "household/arttools"],
        "vehicle": ["vehicles", "military/vehicles"],
    },
}
CLUTTER = ["symbols", "town/roadsigns", "town/flags", "space", "seasonal"]
# photographs that show a class's objects (flowers, a ladybird), which would be objects without a label
UNUSED_BACKGROUNDS = {"FreshFlower.jpg", "Garden.jpg", "LadyBird.jpg", "YellowFlower.jpg"}
BACKGROUND_HALF = {"main": 0, "alt": 1}  # which half of the other photographs (even or odd positions, sorted)


def _stamp_files(root: Path, folders: list[str]) -> list[Path]:
    files = set()
    for folder in folders:
        for f in (root / folder).rglob("*.png"):
            parts = f.relative_to(root).parts
            if not {"cartoon", "toys"} & set(parts) and not f.stem.endswith("_mirror"):
                files.add(f)
    return sorted(files)


@dataclass
class Library:
    """The stamps and photographs of one variant, split by instance."""

    class_names: list[str]
    train: list[list[Path]]  # per class, its stamp files in the train split
    val: list[list[Path]]
    clutter: list[Path]
    backgrounds: list[Path]

    @classmethod
    def load(cls, variant: str = "main", seed: int = 0, stamps: Path = STAMPS,
             backgrounds: Path = BACKGROUNDS) -> "Library":
        """Find the files (FileNotFoundError naming the Debian packages when they are missing)."""
        if variant not in GROUPINGS:
            raise ValueError(f"variant={variant!r}: expected one of {tuple(GROUPINGS)}")
        photos = sorted(p for p in Path(backgrounds).glob("*")
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.name not in UNUSED_BACKGROUNDS)
        if not Path(stamps).is_dir() or not photos:
            missing = stamps if not Path(stamps).is_dir() else backgrounds
            raise FileNotFoundError(f"{missing} not found or empty: the photographic set needs Debian's packages; "
                                    f"install them with: sudo apt-get install {PACKAGES}")
        rng = np.random.default_rng([seed, 7])
        train, val, used = [], [], set()
        for name, folders in GROUPINGS[variant].items():
            files = _stamp_files(Path(stamps), folders)
            if len(files) < 2:
                raise FileNotFoundError(f"class {name!r}: {len(files)} stamps in {folders} under {stamps} "
                                        f"(need 2 or more; is {PACKAGES.split()[0]} complete?)")
            order = rng.permutation(len(files))
            n_val = max(1, round(VAL_FRACTION * len(files)))
            val.append([files[i] for i in sorted(order[:n_val])])
            train.append([files[i] for i in sorted(order[n_val:])])
            used |= set(files)
        clutter = [f for f in _stamp_files(Path(stamps), CLUTTER) if f not in used]
        return cls(list(GROUPINGS[variant]), train, val, clutter, photos[BACKGROUND_HALF[variant]::2])


def load_stamp(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A stamp cropped to its alpha's extent: (RGB float32 [h, w, 3] in 0..255, alpha float32 [h, w] in 0..1)."""
    try:
        with Image.open(path) as im:
            data = np.asarray(im.convert("RGBA"))  # palette and grey stamps too, with their transparency
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    alpha = data[..., 3].astype(np.float32) / 255
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(ys) == 0:
        raise ValueError(f"{path}: fully transparent")
    crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return data[crop][..., :3].astype(np.float32), alpha[crop]


def _jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [0.85, 1.15]."""
    b, c, s = rng.uniform(0.85, 1.15, 3)
    out = rgb * b
    out = (out - out.mean()) * c + out.mean()
    grey = out.mean(axis=2, keepdims=True)
    return np.clip((out - grey) * s + grey, 0, 255)


def _background(path: Path, rng: np.random.Generator, cache: dict) -> np.ndarray:
    if path not in cache:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{path}: not an image")
        scale = 1200 / max(img.shape[:2])  # photographs of several megapixels: keep a 1200-pixel copy
        cache[path] = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)[..., ::-1]
    img = cache[path]
    W, H = SIZE
    h, w = img.shape[:2]
    full = min(w / W, h / H)  # the largest 4:3 crop, in units of the output size
    f = full * rng.uniform(0.35, 1.0)
    cw, ch = int(W * f), int(H * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = cv2.resize(np.ascontiguousarray(img[y:y + ch, x:x + cw]), SIZE, interpolation=cv2.INTER_AREA)
    return _jitter(crop.astype(np.float32), rng)


@dataclass
class Paste:
    """One stamp on the image: its class (None for clutter), where it lies and its alpha >= 0.5 there."""

    cls: int | None
    x: int
    y: int
    footprint: np.ndarray  # bool [h, w]


def compose(rng: np.random.Generator, library: Library, split: str, cache: dict | None = None
            ) -> tuple[np.ndarray, list[tuple[int, list[int]]], list[Paste]]:
    """One image: (RGB uint8 [288, 384, 3], annotated objects [(class, [x1, y1, x2, y2])], the pastes in order)."""
    cache = {} if cache is None else cache
    W, H = SIZE
    img = _background(library.backgrounds[int(rng.integers(len(library.backgrounds)))], rng, cache)
    instances = library.train if split == "train2017" else library.val
    todo = []
    for _ in range(int(rng.choice(len(OBJECTS), p=OBJECTS))):
        c = int(rng.integers(len(instances)))
        todo.append((c, instances[c][int(rng.integers(len(instances[c])))], OBJECT_AREA))
    for _ in range(int(rng.integers(MAX_CLUTTER + 1))):
        todo.append((None, library.clutter[int(rng.integers(len(library.clutter)))], CLUTTER_AREA))
    pastes = []
    for k in rng.permutation(len(todo)):
        c, path, (lo, hi) = todo[k]
        if path not in cache:
            cache[path] = load_stamp(path)
        rgb, alpha = cache[path]
        area = np.exp(rng.uniform(np.log(lo), np.log(hi))) * W * H
        scale = min(np.sqrt(area / (rgb.shape[0] * rgb.shape[1])), W / rgb.shape[1], H / rgb.shape[0])
        w, h = max(int(rgb.shape[1] * scale), 4), max(int(rgb.shape[0] * scale), 4)
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        a = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            rgb, a = rgb[:, ::-1], a[:, ::-1]
        rgb = _jitter(rgb, rng)
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        region = img[y:y + h, x:x + w]
        region[:] = region * (1 - a[..., None]) + rgb * a[..., None]
        pastes.append(Paste(c, x, y, a >= 0.5))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), visible_boxes(pastes), pastes


def visible_boxes(pastes: list[Paste]) -> list[tuple[int, list[int]]]:
    """The annotated objects of a paste sequence: each object's footprint minus every later paste's,
    its extent as the box, when at least VISIBLE of the footprint remains."""
    W, H = SIZE
    covered = np.zeros((H, W), bool)  # what later pastes hide, filled from the last paste back
    objects = []
    for p in reversed(pastes):
        h, w = p.footprint.shape
        mine = np.zeros((H, W), bool)
        mine[p.y:p.y + h, p.x:p.x + w] = p.footprint
        if p.cls is not None:
            visible = mine & ~covered
            if visible.sum() >= VISIBLE * mine.sum() and visible.any():
                ys, xs = np.nonzero(visible)
                objects.append((p.cls, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]))
        covered |= mine
    return objects[::-1]


def generate(out_dir: str | Path, train: int = 600, val: int = 200, seed: int = 0, variant: str = "main",
             stamps: Path = STAMPS, backgrounds: Path = BACKGROUNDS) -> Path:
    """Write the photographic set in COCO 2017 layout under `out_dir`; returns `out_dir`."""
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train} val={val}")
    library = Library.load(variant, seed, stamps, backgrounds)
    out = Path(out_dir)
    cache: dict = {}
    for split, n in (("train2017", train), ("val2017", val)):
        assert split in SPLITS
        write_split(out, split, n, seed, lambda rng, split=split: compose(rng, library, split, cache)[:2],
                    library.class_names, f"RGNN photographic set ({variant}), seed {seed}", f"photos-{variant}")
    return out


def main(argv: list[str] | None = None) -> None:
    generator_cli(generate, "python -m rgnn.data.photos", __doc__, (600, 200), tuple(GROUPINGS),
                  "main: 12 classes by the stamps' folders (default); alt: 12 other groupings, the other backgrounds",
                  argv)


if __name__ == "__main__":
    main()
