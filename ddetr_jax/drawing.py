"""Drawing detections and attention: boxes with '<class> <score>' labels, a
query's sampling points over its image (matplotlib, optional).

    draw_prediction("image.jpg", detector.predict("image.jpg")).show()
    plot_attention("image.jpg", detector.attention("image.jpg"))
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ddetr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ddetr_jax.images import load_image


def draw_prediction(image, prediction: dict, width: int = 2) -> Image.Image:
    """The image (RGB) with the boxes of a prediction dict ('boxes_xyxy', 'scores',
    'labels', 'class_names', as Detector.predict returns) and '<class> <score>' labels."""
    canvas = Image.fromarray(load_image(image))
    draw = ImageDraw.Draw(canvas)
    for box, score, label, name in zip(prediction["boxes_xyxy"], prediction["scores"],
                                       prediction["labels"], prediction["class_names"]):
        colour = colour_of(int(label))
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour,
                       width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text)
        draw.rectangle([left, top, right, bottom], fill=colour)
        draw.text((x0, y0), text, fill=(255, 255, 255))
    return canvas


def colour_of(label: int) -> tuple[int, int, int]:
    """A fixed, distinct-enough RGB colour per label."""
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(40, 216, 3))


def drawn_batch_image(batch, row, detections, names, threshold):
    """The resized, unpadded image of one batch row with its detections (resized pixels)."""
    h, w = (int(v) for v in batch["size"][row])
    pixels = batch["images"][row, :h, :w] * IMAGENET_STD + IMAGENET_MEAN
    image = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    scale = np.array([w, h, w, h], np.float32) / np.tile(batch["orig_size"][row][::-1], 2)
    keep = detections["scores"][row] >= threshold
    labels = detections["labels"][row][keep]
    prediction = {"boxes_xyxy": detections["boxes_xyxy"][row][keep] * scale,
                  "scores": detections["scores"][row][keep], "labels": labels,
                  "class_names": [names.get(int(label), str(int(label))) for label in labels]}
    return draw_prediction(image, prediction)


def plot_attention(image, attention: dict, ax=None):
    """Draws a query's sampling points on the image, one colour per level, the marker
    area proportional to the attention weight, with its box. Returns the matplotlib Axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_attention needs matplotlib: pip install matplotlib") from err
    image = load_image(image)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    points, weights = attention["points_xy"], attention["weights"]  # (M, L, P, 2), (M, L, P)
    colours = plt.get_cmap("tab10")
    for level in range(points.shape[1]):
        xy = points[:, level].reshape(-1, 2)  # (M*P, 2)
        ax.scatter(xy[:, 0], xy[:, 1], s=600 * weights[:, level].reshape(-1), alpha=0.7,
                   color=colours(level), edgecolors="white", linewidths=0.5,
                   label=f"level {level}")
    if attention["box_xyxy"] is not None:
        x0, y0, x1, y1 = attention["box_xyxy"]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow",
                                   linewidth=2))
        ax.set_title(f"layer {attention['layer']}, query {attention['query']}: "
                     f"{attention['class_name']} {attention['score']:.2f}")
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.legend(loc="upper right", fontsize="small")
    ax.axis("off")
    return ax
