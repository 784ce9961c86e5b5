"""A synthetic detection dataset of coloured shapes, written in COCO format.

Writes the COCO 2017 layout, one JSON and one JPEG folder per split:

    OUT/annotations/instances_train.json       OUT/train/000000000001.jpg ...
    OUT/annotations/instances_validation.json  OUT/validation/000000000001.jpg ...

    python -m ddetr_jax.data.synthetic --out OUT --train-images 2000 --val-images 200 --seed 0

What the images hold:
- sizes: shorter side 96..224 pixels, aspect ratio (width / height) 0.5..2;
- backgrounds: smooth blotches, stripes or blocks in muted colours, and pixel
  noise over the whole image;
- 1..MAX_OBJECTS shapes per image from the classes in CATEGORIES (the
  category ids are not contiguous, to exercise id mapping), each class with
  its own hue (jittered), scaled, stretched and rotated at random; extents uniform from
  MIN_OBJECT_SIZE pixels to MAX_OBJECT_FRACTION of the shorter side (before
  rotation): about 40% of objects are COCO-small (visible area < 32**2),
  about 1% large (>= 96**2), the rest medium;
- occlusion: shapes are painted in order, later ones over earlier ones, and a
  placement that would leave an earlier object less than half visible is
  redrawn;
- every CROWD_PERIOD-th image (index % CROWD_PERIOD == CROWD_OFFSET) also holds
  a crowd: a cluster of tiny shapes of one class with a single iscrowd=1
  annotation; every EMPTY_PERIOD-th image (index % EMPTY_PERIOD == EMPTY_OFFSET)
  holds no objects. Three images per split are enough to have one of each.

Annotations: `bbox` is [x, y, w, h] in integer pixels, the full extent of the
object including any occluded parts (the tight box of its whole mask), so
it always lies inside the image with w, h >= 1. `area` is the number of
visible pixels (the mask minus what later objects cover), as COCO's area is
the visible segmentation area. No `segmentation` is written: the dataset is
for box detection.

Every image comes from its own generator seeded with (seed, split, index), so
the same seed gives byte-identical JSON and JPEG files (for one Pillow build).
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw

# (COCO category id, name, base RGB colour); the ids skip 4 and 6 on purpose.
CATEGORIES = (
    (1, "ellipse", (220, 50, 50)),
    (2, "rectangle", (50, 190, 70)),
    (3, "triangle", (50, 90, 225)),
    (5, "cross", (235, 205, 40)),
    (7, "star", (200, 60, 205)),
    (8, "ring", (40, 200, 215)),
)
SPLITS = ("train", "validation")
# What a synthetic dataset records of how it was made (catalog rebuilds it when they change).
SYNTHETIC_FIELDS = ("train_images", "val_images", "seed")

SHORT_SIDE = (96, 224)
ASPECT = (0.5, 2.0)
MAX_OBJECTS = 5
MIN_OBJECT_SIZE = 20
MAX_OBJECT_FRACTION = 0.7  # of the shorter image side
MIN_VISIBLE_FRACTION = 0.5
PLACEMENT_TRIES = 20
CROWD_PIECES = (6, 14)
CROWD_PIECE_SIZE = (5, 9)
CROWD_REGION = (32, 72)
CROWD_PERIOD, CROWD_OFFSET = 10, 2
EMPTY_PERIOD, EMPTY_OFFSET = 20, 1
COLOUR_JITTER = 30
EDGE_SHADE = 0.6
NOISE_STD = (3.0, 10.0)
JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class DrawnObject:
    """One annotated object: its full mask (H, W) bool, RGB colour and labels."""

    category_id: int
    mask: np.ndarray
    colour: np.ndarray
    iscrowd: int


def _regular_polygon(n, radius=1.0, phase=0.0):
    """n vertices on a circle of `radius`, first at angle `phase`: (n, 2)."""
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def unit_shape(name):
    """The shape `name` in unit coordinates as [(vertices (N, 2), filled), ...].

    Each shape spans [-1, 1] on its widest axis; parts are painted in order,
    filled=False cuts a hole (the ring's centre).
    """
    if name == "ellipse":
        return [(_regular_polygon(48), True)]
    if name == "rectangle":
        return [(np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), True)]
    if name == "triangle":
        return [(_regular_polygon(3, phase=-np.pi / 2), True)]
    if name == "cross":
        a = 1.0 / 3.0
        arm = [[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
               [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1]]
        return [(np.array(arm, dtype=np.float64), True)]
    if name == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None]
        return [(radii * _regular_polygon(10, phase=-np.pi / 2), True)]
    if name == "ring":
        return [(_regular_polygon(48), True), (_regular_polygon(48, radius=0.6), False)]
    raise ValueError(f"unknown shape {name!r}")


def scale_and_rotate(parts, half_size_xy, angle):
    """Scales unit `parts` by half_size (sx, sy) pixels and rotates them by
    `angle` (radians) about the origin; returns parts like `unit_shape`."""
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return [((vertices * half_size_xy) @ rotation.T, filled) for vertices, filled in parts]


def shape_mask(parts, height, width):
    """Rasterises posed parts (pixel coordinates) into a (height, width) bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for vertices, filled in parts:
        draw.polygon([tuple(v) for v in vertices.tolist()], fill=255 if filled else 0)
    return np.asarray(canvas) > 0


def place_shape(rng, name, size, elongation, height, width):
    """Poses shape `name` of extent `size` pixels (before rotation; the other axis
    `size * elongation`) at a random angle and a random spot where it fits the
    image; returns its parts in pixel coordinates, or None if it cannot fit."""
    parts = scale_and_rotate(unit_shape(name), np.array([size / 2, size * elongation / 2]),
                             rng.uniform(0, 2 * np.pi))
    vertices = np.concatenate([v for v, _ in parts])  # (N, 2) around the origin
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    room = np.array([width - 1.0, height - 1.0]) - (high - low)
    if (room <= 0).any():
        return None
    centre = rng.uniform(0, room) - low
    return [(v + centre, filled) for v, filled in parts]


def object_colour(rng, base_rgb):
    """The class colour, each channel jittered by up to COLOUR_JITTER: (3,) float32."""
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
    return np.clip(np.array(base_rgb) + jitter, 0, 255).astype(np.float32)


def sample_object(rng, height, width):
    """One shape of a random class, size and pose, or None if it does not fit."""
    category_id, name, base_rgb = CATEGORIES[rng.integers(len(CATEGORIES))]
    low = MIN_OBJECT_SIZE
    high = max(low, MAX_OBJECT_FRACTION * min(height, width))
    size = rng.uniform(low, high)
    elongation = rng.uniform(0.5, 1.0) if name in ("ellipse", "rectangle", "ring") else 1.0
    parts = place_shape(rng, name, size, elongation, height, width)
    if parts is None:
        return None
    return DrawnObject(category_id, shape_mask(parts, height, width),
                       object_colour(rng, base_rgb), iscrowd=0)


def sample_crowd(rng, height, width):
    """A cluster of CROWD_PIECES tiny shapes of one class inside a random region,
    as one object whose mask is the union of the pieces."""
    category_id, name, base_rgb = CATEGORIES[rng.integers(len(CATEGORIES))]
    region_w = min(int(rng.integers(*CROWD_REGION)), width)
    region_h = min(int(rng.integers(*CROWD_REGION)), height)
    x0 = int(rng.integers(0, width - region_w + 1))
    y0 = int(rng.integers(0, height - region_h + 1))
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(*CROWD_PIECES)):
        parts = place_shape(rng, name, rng.uniform(*CROWD_PIECE_SIZE), 1.0, region_h, region_w)
        if parts is not None:
            mask |= shape_mask([(v + (x0, y0), f) for v, f in parts], height, width)
    return DrawnObject(category_id, mask, object_colour(rng, base_rgb), iscrowd=1)


def hides_too_much(new_mask, objects):
    """True if painting `new_mask` over `objects` (in painting order) would leave
    any of them less than MIN_VISIBLE_FRACTION visible."""
    covered = new_mask.copy()
    for obj in reversed(objects):
        visible = np.count_nonzero(obj.mask & ~covered)
        if visible < MIN_VISIBLE_FRACTION * np.count_nonzero(obj.mask):
            return True
        covered |= obj.mask
    return False


def sample_layout(rng, height, width, with_crowd):
    """The objects of one image in painting order: an optional crowd first, then
    up to MAX_OBJECTS shapes, each redrawn up to PLACEMENT_TRIES times until it
    fits and hides no earlier object too much (dropped otherwise)."""
    objects = [sample_crowd(rng, height, width)] if with_crowd else []
    for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
        for _ in range(PLACEMENT_TRIES):
            candidate = sample_object(rng, height, width)
            if candidate is not None and not hides_too_much(candidate.mask, objects):
                objects.append(candidate)
                break
    return [obj for obj in objects if obj.mask.any()]


def sample_image_size(rng):
    """(height, width): shorter side in SHORT_SIDE, width / height in ASPECT (log-uniform)."""
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    if aspect >= 1:
        return short, round(short * aspect)
    return round(short / aspect), short


def _upsampled_noise(rng, grid_hw, height, width, resample):
    """Uniform [0, 1) noise on a coarse grid (gh, gw) resized to (height, width) float32."""
    coarse = Image.fromarray(rng.uniform(0, 1, size=grid_hw).astype(np.float32))
    return np.asarray(coarse.resize((width, height), resample=resample))


def sample_background(rng, height, width):
    """A muted background with smooth blotches, stripes or blocks: (H, W, 3) float32."""
    tint = rng.uniform(70, 170) + rng.uniform(-20, 20, size=3)
    kind = rng.integers(3)
    if kind == 0:
        texture = _upsampled_noise(rng, rng.integers(3, 9, size=2), height, width,
                                   Image.Resampling.BICUBIC) - 0.5
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 32)
        ys, xs = np.mgrid[0:height, 0:width]
        texture = 0.5 * np.sin(2 * np.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    else:
        block = int(rng.integers(6, 20))  # pixels
        grid = (max(1, height // block), max(1, width // block))
        texture = _upsampled_noise(rng, grid, height, width, Image.Resampling.NEAREST) - 0.5
    amplitude = rng.uniform(20, 70)
    return (tint + amplitude * texture[..., None]).astype(np.float32)


def mask_edge(mask):
    """The pixels of `mask` (H, W) bool with a 4-neighbour outside it: (H, W) bool."""
    padded = np.pad(mask, 1)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def render(rng, background, objects):
    """Paints `objects` in order over `background` (H, W, 3), each with an
    EDGE_SHADE darker rim so that touching objects of one class stay apart,
    and adds pixel noise: (H, W, 3) uint8."""
    image = background.copy()
    for obj in objects:
        image[obj.mask] = obj.colour
        image[mask_edge(obj.mask)] = EDGE_SHADE * obj.colour
    image += rng.normal(0, rng.uniform(*NOISE_STD), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def annotate(objects):
    """COCO annotation fields of `objects` (painting order), without ids:
    bbox [x, y, w, h] of the full mask, area = visible pixels, iscrowd."""
    annotations, covered = [], None
    for obj in reversed(objects):
        visible = obj.mask if covered is None else obj.mask & ~covered
        covered = obj.mask.copy() if covered is None else covered | obj.mask
        rows, cols = np.flatnonzero(obj.mask.any(axis=1)), np.flatnonzero(obj.mask.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        bbox = [x, y, int(cols[-1]) + 1 - x, int(rows[-1]) + 1 - y]
        annotations.append({"category_id": obj.category_id, "bbox": bbox,
                            "area": int(np.count_nonzero(visible)), "iscrowd": obj.iscrowd})
    return annotations[::-1]


def make_example(seed, split, index):
    """Image `index` of `split`: ((H, W, 3) uint8 pixels, annotations without ids)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    height, width = sample_image_size(rng)
    background = sample_background(rng, height, width)
    if index % EMPTY_PERIOD == EMPTY_OFFSET:
        objects = []
    else:
        objects = sample_layout(rng, height, width, index % CROWD_PERIOD == CROWD_OFFSET)
    return render(rng, background, objects), annotate(objects)


def write_split(out_dir, split, num_images, seed):
    """Writes OUT/<split>/*.jpg and OUT/annotations/instances_<split>.json and
    returns the COCO dict. Image and annotation ids start at 1."""
    out_dir = pathlib.Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)

    def write_image(index):  # drawing and JPEG encoding release the GIL: 1.5x on 2 cores
        pixels, image_annotations = make_example(seed, split, index)
        Image.fromarray(pixels).save(out_dir / split / f"{index + 1:012d}.jpg", format="JPEG",
                                     quality=JPEG_QUALITY)
        return pixels.shape, image_annotations

    images, annotations = [], []
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        written = list(pool.map(write_image, range(num_images)))
    for index, (shape, image_annotations) in enumerate(written):
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg",
                       "height": shape[0], "width": shape[1]})
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    coco = {
        "info": {"description": f"ddetr_jax synthetic shapes, split {split}, seed {seed}",
                 "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name, _ in CATEGORIES],
    }
    (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return coco


def write_dataset(out_dir, train_images, val_images, seed):
    """Writes both splits under `out_dir`; returns {split: COCO dict}."""
    if seed < 0 or train_images < 0 or val_images < 0:
        raise ValueError("seed and image counts must be non-negative, got "
                         f"seed={seed}, train_images={train_images}, val_images={val_images}")
    counts = {"train": train_images, "validation": val_images}
    return {split: write_split(out_dir, split, counts[split], seed) for split in SPLITS}


def summarize(cocos):
    """Two lines per split: images, empty images, annotations, crowd; per-class
    counts of the annotations that are not crowd."""
    names = {cid: name for cid, name, _ in CATEGORIES}
    lines = []
    for split, coco in cocos.items():
        per_class = collections.Counter(a["category_id"] for a in coco["annotations"]
                                        if not a["iscrowd"])
        crowd = sum(a["iscrowd"] for a in coco["annotations"])
        with_objects = {a["image_id"] for a in coco["annotations"]}
        lines.append(f"{split}: {len(coco['images'])} images "
                     f"({len(coco['images']) - len(with_objects)} empty), "
                     f"{len(coco['annotations'])} annotations ({crowd} crowd)")
        lines.append("  not crowd: " + ", ".join(f"{names[cid]} (id {cid}): {per_class[cid]}"
                                                   for cid in sorted(names)))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cocos = write_dataset(args.out, args.train_images, args.val_images, args.seed)
    print(f"wrote {args.out}")
    print(summarize(cocos))


if __name__ == "__main__":
    main()
