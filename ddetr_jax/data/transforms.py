"""Per-example augmentation and resizing, NumPy arrays in and out.

Mirrors the authors' `datasets/coco.py: make_coco_transforms` and
`datasets/transforms.py` (train):

    RandomHorizontalFlip(0.5)
    RandomSelect(                                    # first branch with p = 0.5
        RandomResize(scales, max_size=1333),
        Compose(RandomResize([400, 500, 600]), RandomSizeCrop(384, 600),
                RandomResize(scales, max_size=1333)))
    Normalize(ImageNet mean / std)                   # after the geometry

and validation `RandomResize([800], max_size=1333)`; crowd annotations are
dropped first (`ConvertCocoPolysToMask`), boxes become normalised (cx, cy, w, h).

The random draws are separate from the pixels: `sample_train_geometry` turns a
numpy Generator and the original size into a `Geometry`, and `apply_geometry`
performs it. So the output size of an example is known before its image is
decoded (the pipeline buckets on it), and the same Generator seed gives the
same geometry. The whole geometry (flip, resize, crop, resize) is one affine
map, resampled once with PIL's bilinear filter (antialiased when shrinking,
like torchvision on PIL images).
"""

import dataclasses

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Sizes in pixels; the defaults are the published COCO recipe."""

    scales: tuple = tuple(range(480, 801, 32))  # shorter side choices
    max_size: int = 1333  # longer side limit of the final image
    crop_resize_scales: tuple = (400, 500, 600)  # shorter side before the crop
    crop_size: tuple = (384, 600)  # (min, max) crop side
    val_scale: int = 800
    flip_prob: float = 0.5
    resize_only_prob: float = 0.5  # else the resize-crop-resize branch

    def scaled(self, factor):
        """Every size multiplied by `factor` (rounded), for small-image configs."""
        def scale(value):
            return max(1, int(round(value * factor)))
        return dataclasses.replace(
            self, scales=tuple(scale(s) for s in self.scales), max_size=scale(self.max_size),
            crop_resize_scales=tuple(scale(s) for s in self.crop_resize_scales),
            crop_size=tuple(scale(s) for s in self.crop_size), val_scale=scale(self.val_scale))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """flip, then resize to resized_hw, then crop (top, left, height, width) of
    the resized image (None: no crop), then resize to out_hw."""

    orig_hw: tuple
    flip: bool
    resized_hw: tuple
    crop: tuple | None
    out_hw: tuple


def resized_hw(hw, size, max_size=None):
    """(height, width) with the shorter side `size`, shrunk so that the longer
    side is at most `max_size` (authors' `transforms.py: get_size_with_aspect_ratio`;
    its rounding lets the longer side of an image more than twice as long as
    wide reach max_size + 1)."""
    height, width = hw
    if max_size is not None:
        short, long = min(hw), max(hw)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def sample_train_geometry(rng, orig_hw, config):
    """The training Geometry of an image of size orig_hw from `rng`."""
    flip = bool(rng.random() < config.flip_prob)
    if rng.random() < config.resize_only_prob:
        out = resized_hw(orig_hw, int(rng.choice(config.scales)), config.max_size)
        return Geometry(tuple(orig_hw), flip, out, None, out)
    first = resized_hw(orig_hw, int(rng.choice(config.crop_resize_scales)))
    low, high = config.crop_size
    # authors' RandomSizeCrop: side in [min_size, min(image side, max_size)], inclusive
    crop_h = int(rng.integers(min(low, first[0]), min(first[0], high) + 1))
    crop_w = int(rng.integers(min(low, first[1]), min(first[1], high) + 1))
    top = int(rng.integers(0, first[0] - crop_h + 1))
    left = int(rng.integers(0, first[1] - crop_w + 1))
    out = resized_hw((crop_h, crop_w), int(rng.choice(config.scales)), config.max_size)
    return Geometry(tuple(orig_hw), flip, first, (top, left, crop_h, crop_w), out)


def eval_geometry(orig_hw, config):
    """Validation: shorter side val_scale, longer side at most max_size."""
    out = resized_hw(orig_hw, config.val_scale, config.max_size)
    return Geometry(tuple(orig_hw), False, out, None, out)


def flip_boxes(boxes_xyxy, width):
    """Mirror (N, 4) pixel boxes in an image `width` wide."""
    return np.stack([width - boxes_xyxy[:, 2], boxes_xyxy[:, 1],
                     width - boxes_xyxy[:, 0], boxes_xyxy[:, 3]], axis=-1)


def clean_boxes(boxes_xyxy, hw):
    """Clip (N, 4) pixel boxes to an image of size hw; returns (clipped boxes,
    (N,) bool keep = positive width and height)."""
    height, width = hw
    clipped = np.clip(boxes_xyxy, 0, [width, height, width, height]).astype(np.float32)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, keep


def _crop_window(geometry):
    """(top, left, height, width) of the crop in resized coordinates (the
    whole image if there is no crop)."""
    if geometry.crop is None:
        return (0, 0) + tuple(geometry.resized_hw)
    return geometry.crop


def geometry_boxes(boxes_xyxy, geometry):
    """Boxes (N, 4) pixel xyxy of the original image -> (boxes in the output
    image (K, 4), (N,) bool keep): flip, scale, crop (clip, drop empty), scale."""
    height, width = geometry.orig_hw
    if geometry.flip:
        boxes_xyxy = flip_boxes(boxes_xyxy, width)
    first_h, first_w = geometry.resized_hw
    boxes = boxes_xyxy * np.array([first_w / width, first_h / height] * 2, np.float32)
    top, left, crop_h, crop_w = _crop_window(geometry)
    boxes, keep = clean_boxes(boxes - np.array([left, top, left, top], np.float32),
                              (crop_h, crop_w))
    out_h, out_w = geometry.out_hw
    boxes = boxes[keep] * np.array([out_w / crop_w, out_h / crop_h] * 2, np.float32)
    return boxes.astype(np.float32), keep


def geometry_image(image, geometry):
    """(H, W, 3) uint8 original -> (out_h, out_w, 3) uint8, one bilinear resample."""
    height, width = geometry.orig_hw
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[:2]}, geometry expects {(height, width)}")
    if geometry.flip:
        image = image[:, ::-1]
    first_h, first_w = geometry.resized_hw
    top, left, crop_h, crop_w = _crop_window(geometry)
    sx, sy = width / first_w, height / first_h  # original pixels per resized pixel
    box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    out_h, out_w = geometry.out_hw
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (out_w, out_h), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


def normalize_image(image):
    """(H, W, 3) uint8 -> float32 with ImageNet mean / std."""
    return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def xyxy_to_normalized_cxcywh(boxes_xyxy, hw):
    """(N, 4) pixel xyxy in an image of size hw -> (N, 4) float32 normalised cxcywh."""
    height, width = hw
    x0, y0, x1, y1 = np.moveaxis(boxes_xyxy.astype(np.float32), -1, 0)
    cxcywh = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
    return (cxcywh / np.array([width, height, width, height], np.float32)).astype(np.float32)


def transform_example(image, boxes_xyxy, labels, is_crowd, geometry):
    """Crowd removal, geometry and normalisation of one example.

    image (H, W, 3) uint8; boxes_xyxy (N, 4) pixels; labels (N,); is_crowd (N,).
    Returns {"image": (h, w, 3) float32 normalised, "boxes_cxcywh": (K, 4)
    normalised to (h, w) = geometry.out_hw, "labels": (K,) int32}.
    """
    boxes, valid = clean_boxes(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4),
                               geometry.orig_hw)
    keep = valid & ~np.asarray(is_crowd, bool)
    boxes, kept = geometry_boxes(boxes[keep], geometry)
    return {
        "image": normalize_image(geometry_image(image, geometry)),
        "boxes_cxcywh": xyxy_to_normalized_cxcywh(boxes, geometry.out_hw),
        "labels": np.asarray(labels, np.int32)[keep][kept],
    }
