"""Images for the notebook API: any image as (H, W, 3) uint8 RGB, and a batch of
them resized, normalised and padded to one size.

    batch = prepare_batch([load_image("a.jpg"), load_image("b.png")], 800, 1333, 128)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddetr_jax.data.transforms import normalize_image, resized_hw


def load_image(image) -> np.ndarray:
    """A file path, PIL image or uint8 array (H, W), (H, W, 1|3|4) -> (H, W, 3) uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image: {image} does not exist")
        try:
            with Image.open(image) as opened:
                return np.asarray(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image: cannot read {image} as an image: {err}") from err
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image: expected a uint8 array, got {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
            raise ValueError(f"image: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4),"
                             f" got {image.shape}")
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.shape[-1] == 4:
            return np.asarray(Image.fromarray(image, "RGBA").convert("RGB"))
        return image
    raise TypeError(f"image: expected a path, PIL image or uint8 array, got {type(image)}")


def round_up(length: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `length`."""
    return -(-length // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Batch:
    """pixels (B, H, W, 3) normalised, zero on padding; pad_mask (B, H, W) True on padding;
    orig_size, resized_size: (B, 2) (height, width) before and after resizing."""

    pixels: np.ndarray
    pad_mask: np.ndarray
    orig_size: np.ndarray
    resized_size: np.ndarray


def prepare_batch(images: Sequence[np.ndarray], shorter: int, longer: int | None,
                  multiple: int) -> Batch:
    """(H_i, W_i, 3) uint8 images -> one Batch, padded bottom/right to the largest
    resized height and width rounded up to multiples of `multiple`."""
    sizes = [resized_hw(im.shape[:2], shorter, longer) for im in images]
    height = round_up(max(h for h, _ in sizes), multiple)
    width = round_up(max(w for _, w in sizes), multiple)
    pixels = np.zeros((len(images), height, width, 3), np.float32)
    pad_mask = np.ones((len(images), height, width), bool)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        pixels[i, :h, :w] = normalize_image(
            np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)))
        pad_mask[i, :h, :w] = False
    orig = np.array([im.shape[:2] for im in images], np.int32)
    return Batch(pixels, pad_mask, orig, np.array(sizes, np.int32))
