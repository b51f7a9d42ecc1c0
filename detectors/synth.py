"""Synthetic COCO-format detection set: shapes of 8 classes on textured, cluttered backgrounds.

The embedded default data for ``make demo``: small enough to train on a CPU, and meant to be
hard enough that a bigger teacher clearly beats a small student. What makes it hard:

- classes differ only by shape (circle/ellipse, square/diamond, star/cross/triangle, ring);
  colours are random per object, so colour says nothing about the class;
- object sides are log-uniform in ``[min_side, max_side]`` (default 8..80 px on ~160 px images),
  so most objects are COCO-"small";
- later objects occlude earlier ones; an object more than ``max_occluded`` hidden is dropped
  from the annotations (it stays in the picture, as in COCO);
- backgrounds mix colour gradients, low-frequency noise and stripes, with distractors
  (irregular blobs that belong to no class, scribbles; a scribble may cross the objects),
  pixel noise, and sometimes a slight blur. Object colours are drawn to contrast with what
  lies under them, so the difficulty is in shape and size, not in finding the object at all.

Annotations follow COCO: ``bbox`` is the full (un-occluded) shape's tight box ``[x, y, w, h]``
in pixels, ``area`` the visible pixel count, ``iscrowd`` 0. Everything is a function of
``(seed, split, image index)``: the same seed gives identical JSON and identical JPEG bytes.

    python -m detectors.synth --out runs/demo/data --train 600 --val 100 --size 160 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

CLASS_NAMES = ("circle", "square", "triangle", "star", "ring", "cross", "ellipse", "diamond")
SPLITS = {"train2017": 0, "val2017": 1}  # split name -> code mixed into the per-image seed
_VAL_ID_OFFSET = 1_000_000  # val image ids start here, so ids never collide across splits


@dataclass(frozen=True)
class SynthConfig:
    size: int = 160  # short side of every image, pixels; the long side is 1..4/3 of it
    min_objects: int = 1  # objects drawn per image (before dropping occluded ones)
    max_objects: int = 8
    min_side: int = 8  # nominal object diameter range, pixels (log-uniform)
    max_side: int = 80
    max_occluded: float = 0.7  # drop an object whose hidden fraction exceeds this
    jpeg_quality: int = 90

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 3 <= self.min_side <= self.max_side <= self.size:
            raise ValueError(
                f"need 3 <= min_side <= max_side <= size, got {self.min_side}, {self.max_side}, {self.size}"
            )
        if not 0.0 <= self.max_occluded < 1.0:
            raise ValueError(f"max_occluded must be in [0, 1), got {self.max_occluded}")


# -- shapes ---------------------------------------------------------------------------------
def _ellipse_points(rx: float, ry: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)  # (n, 2) x, y


def _star_points(r_outer: float, r_inner: float, points: int = 5) -> np.ndarray:
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    radius = np.where(np.arange(2 * points) % 2 == 0, r_outer, r_inner)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_polygons(name: str, r: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (n, 2) around the origin and an optional hole polygon, radius ~ ``r`` pixels."""
    tilt = rng.uniform(-0.35, 0.35)  # radians; squares, diamonds and crosses stay near upright
    hole = None
    if name == "circle":
        outer = _ellipse_points(r, r)
    elif name == "ellipse":
        outer = _rotate(_ellipse_points(r, r * rng.uniform(0.35, 0.65)), rng.uniform(0, math.pi))
    elif name == "square":
        outer = _rotate(np.array([[-r, -r], [r, -r], [r, r], [-r, r]]) * 0.8, tilt)
    elif name == "diamond":
        half_w = r * rng.uniform(0.5, 0.7)
        outer = _rotate(np.array([[0, -r], [half_w, 0], [0, r], [-half_w, 0]]), tilt)
    elif name == "triangle":
        t = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3
        outer = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == "star":
        outer = _rotate(_star_points(r, r * rng.uniform(0.38, 0.5)), rng.uniform(0, 2 * math.pi))
    elif name == "ring":
        outer = _ellipse_points(r, r)
        hole = outer * rng.uniform(0.45, 0.65)
    elif name == "cross":
        a = r * rng.uniform(0.25, 0.35)  # half arm thickness
        outer = _rotate(
            np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a],
                      [-r, a], [-r, -a], [-a, -a]]),
            tilt,
        )
    else:
        raise ValueError(f"unknown shape {name!r}")
    return outer, hole


def _polygon_mask(hw: tuple[int, int], outer: np.ndarray, hole: np.ndarray | None = None) -> np.ndarray:
    """(h, w) bool mask of a polygon (with an optional hole), pixel coordinates."""
    mask = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([tuple(p) for p in outer.tolist()], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in hole.tolist()], fill=0)
    return np.asarray(mask) > 127


def _scribble_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool mask of a random polyline (2..5 steps of 8..50 px), 1..3 px wide."""
    h, w = hw
    mask = Image.new("L", (w, h), 0)
    steps = int(rng.integers(2, 6))
    angles = rng.uniform(0, 2 * math.pi, size=steps)
    lengths = rng.uniform(8, 50, size=steps)
    moves = np.stack([lengths * np.cos(angles), lengths * np.sin(angles)], axis=1)  # (steps, 2)
    points = rng.uniform([0, 0], [w, h]) + np.concatenate([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
    ImageDraw.Draw(mask).line([tuple(p) for p in points.tolist()], fill=255, width=int(rng.integers(1, 4)))
    return np.asarray(mask) > 127


# -- pixels ---------------------------------------------------------------------------------
def _background(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float32 in 0..255: gradient + low-frequency noise + stripes + pixel noise."""
    h, w = hw
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = x * math.cos(angle) + y * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)  # (h, w) in [0, 1]
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]  # (h, w, 3)

    coarse = rng.normal(0, 1, size=(h // 16 + 2, w // 16 + 2, 3))
    coarse = np.clip(coarse * 40 + 128, 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32) - 128
    image += blotches * rng.uniform(0.2, 0.6)

    if rng.random() < 0.6:
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(5, 30)
        wave = np.sin(2 * math.pi * (x * math.cos(phi) + y * math.sin(phi)) / period + rng.uniform(0, 2 * math.pi))
        image += rng.uniform(8, 30) * wave[..., None] * rng.uniform(-1, 1, size=3)

    image += rng.normal(0, rng.uniform(2, 10), size=image.shape)
    return np.clip(image, 0, 255).astype(np.float32)


def _contrasting_colour(canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour, re-drawn a few times if too close to the pixels under ``mask``."""
    under = canvas[mask].mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 255, size=3)
        distance = float(np.linalg.norm(colour - under))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= 90:
            break
    return best


def _fill(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Paint ``mask``: solid, or (30% of shapes over 400 px) a gradient towards a second colour."""
    rows, cols = np.nonzero(mask)
    if len(rows) < 400 or rng.random() < 0.7:
        canvas[mask] = colour
        return
    angle = rng.uniform(0, 2 * math.pi)
    t = cols * math.cos(angle) + rows * math.sin(angle)
    weight = 0.6 * (t - t.min()) / max(float(t.max() - t.min()), 1.0)  # (n,) in [0, 0.6]
    canvas[rows, cols] = colour * (1 - weight[:, None]) + rng.uniform(0, 255, size=3) * weight[:, None]


def render_image(rng: np.random.Generator, config: SynthConfig) -> tuple[Image.Image, list[dict]]:
    """One image and its objects: dicts with ``category_id`` (1-based), ``bbox`` [x, y, w, h]
    (pixels, full shape) and ``area`` (visible pixels)."""
    short, long = config.size, int(round(config.size * rng.uniform(1.0, 4 / 3)))
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    canvas = _background((h, w), rng)  # (h, w, 3) float32
    owner = np.full((h, w), -1, dtype=np.int32)  # index of the object visible at each pixel

    for _ in range(int(rng.integers(0, 3))):  # irregular blobs: shape-like but no class
        r = rng.uniform(5, 25)
        n = int(rng.integers(6, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        radii = r * rng.uniform(0.4, 1.0, size=n)
        outer = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1) + rng.uniform([0, 0], [w, h])
        blob = _polygon_mask((h, w), outer)
        if blob.any():
            canvas[blob] = rng.uniform(0, 255, size=3)
    for _ in range(int(rng.integers(0, 4))):  # scribbles under the objects
        canvas[_scribble_mask((h, w), rng)] = rng.uniform(0, 255, size=3)

    category_ids: list[int] = []
    masks: list[np.ndarray] = []  # full (un-occluded) shape masks, (h, w) bool
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        class_index = int(rng.integers(len(CLASS_NAMES)))
        side = math.exp(rng.uniform(math.log(config.min_side), math.log(config.max_side)))
        outer, hole = _shape_polygons(CLASS_NAMES[class_index], side / 2, rng)
        lo, hi = outer.min(axis=0), outer.max(axis=0)  # (2,) x, y extent around the origin
        offset = rng.uniform(-lo, np.maximum([w, h] - hi, -lo + 1e-3))  # keep the shape inside
        mask = _polygon_mask((h, w), outer + offset, None if hole is None else hole + offset)
        if not mask.any():
            continue
        _fill(canvas, mask, _contrasting_colour(canvas, mask, rng), rng)
        if rng.random() < 0.25:  # outline in another colour
            eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3))
            canvas[mask & ~(np.asarray(eroded) > 127)] = rng.uniform(0, 255, size=3)
        owner[mask] = len(masks)
        masks.append(mask)
        category_ids.append(class_index + 1)

    for _ in range(int(rng.integers(0, 2))):  # a scribble over the objects
        scribble = _scribble_mask((h, w), rng)
        canvas[scribble] = rng.uniform(0, 255, size=3)
        owner[scribble] = -1

    canvas += rng.normal(0, rng.uniform(0, 6), size=canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))

    objects = []
    for index, (category_id, mask) in enumerate(zip(category_ids, masks)):
        visible = int((owner == index).sum())
        if visible < (1 - config.max_occluded) * mask.sum():
            continue
        rows, cols = np.nonzero(mask)
        x1, y1 = int(cols.min()), int(rows.min())
        bbox = [x1, y1, int(cols.max()) + 1 - x1, int(rows.max()) + 1 - y1]
        objects.append({"category_id": category_id, "bbox": bbox, "area": float(visible)})
    return image, objects


# -- writing --------------------------------------------------------------------------------
def generate_split(
    out: Path, split: str, num_images: int, config: SynthConfig, seed: int, progress: bool = True
) -> Path:
    """Write ``out/{split}/*.jpg`` and ``out/annotations/instances_{split}.json``; returns the json path."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    id_offset = _VAL_ID_OFFSET if split == "val2017" else 0
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"synth {split}", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        image, objects = render_image(rng, config)
        image_id = id_offset + index + 1
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, format="JPEG", quality=config.jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "height": image.height, "width": image.width})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    dataset = {
        "info": {"description": "detkd synthetic shapes", "seed": seed, "config": asdict(config)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)
        ],
    }
    ann_path = out / "annotations" / f"instances_{split}.json"
    ann_path.write_text(json.dumps(dataset))
    return ann_path


def generate(out: str | Path, num_train: int = 600, num_val: int = 100, config: SynthConfig = SynthConfig(),
             seed: int = 0, progress: bool = True) -> Path:
    """Write the COCO-layout set (train2017 and val2017) under ``out``; returns ``out``."""
    out = Path(out)
    generate_split(out, "train2017", num_train, config, seed, progress)
    generate_split(out, "val2017", num_val, config, seed, progress)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m detectors.synth",
        description=(
            "Generate a synthetic COCO-format detection set: 8 shape classes ("
            + ", ".join(CLASS_NAMES)
            + ") in random colours, sizes from small to large, with occlusion, distractor blobs and "
            "scribbles, on textured backgrounds. Writes OUT/annotations/instances_{train,val}2017.json "
            "and OUT/{train,val}2017/*.jpg. Deterministic: the same seed gives identical files."
        ),
        epilog="example: python -m detectors.synth --out runs/demo/data --train 600 --val 100 --seed 0",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (COCO layout)")
    counts = [
        ("--train", 600, "number of training images"),
        ("--val", 100, "number of validation images"),
        ("--size", SynthConfig.size, "short side of each image, pixels"),
        ("--seed", 0, "random seed"),
        ("--min-objects", SynthConfig.min_objects, "fewest objects drawn per image"),
        ("--max-objects", SynthConfig.max_objects, "most objects drawn per image (occluded ones dropped after)"),
        ("--min-side", SynthConfig.min_side, "smallest object diameter, pixels"),
    ]
    for flag, default, text in counts:
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"largest object diameter, pixels (default: min({SynthConfig.max_side}, size))")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    max_side = args.max_side if args.max_side is not None else min(SynthConfig.max_side, args.size)
    try:
        config = SynthConfig(size=args.size, min_objects=args.min_objects, max_objects=args.max_objects,
                             min_side=args.min_side, max_side=max_side)
    except ValueError as err:
        parser.error(str(err))
    generate(args.out, args.train, args.val, config, args.seed, progress=not args.quiet)
    print(f"wrote {args.train} train and {args.val} val images to {args.out}")


if __name__ == "__main__":
    main()
