"""The notebook API: load a checkpoint, detect objects in images, draw them, look at attention.

    detector = Detector.from_checkpoint("converted/r50", class_names={1: "person", ...})
    prediction = detector.predict("image.jpg", score_threshold=0.5)
    detector.draw("image.jpg", prediction).show()
    attention = detector.attention("image.jpg")    # where the best detection's query looked
    plot_attention("image.jpg", attention)           # needs matplotlib

Images are resized as in the authors' validation transform (shorter side
800, longer side at most 1333; a training workdir's own val_scale / max_size),
normalised with the ImageNet statistics and
padded bottom/right to a size bucket (multiples of 128 by default), so a new
image size compiles only when it falls into a bucket (and batch size) not
seen before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, UnidentifiedImageError

from ddetr_jax.convert import CheckpointMismatch, load_converted, load_torch_checkpoint
from ddetr_jax.data.transforms import resized_hw
from ddetr_jax.models import DeformableDETR
from ddetr_jax.postprocess import NUM_TOP, check_nms_iou, postprocess

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- checkpoints

def _is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_config.json"))


def _load_converted_dir(path: str, defaults=None, **model_overrides):
    if model_overrides:
        raise ValueError(f"{path}: a converted checkpoint fixes its model config; "
                         f"model overrides {sorted(model_overrides)} are not accepted")
    if not os.path.isdir(os.path.join(path, "state")):
        raise CheckpointMismatch(f"{path}: has model_config.json but no state/ directory")
    model, _ = load_converted(path)
    return model


def _hf_weight_file(path: str) -> str | None:
    found = [os.path.join(path, f) for f in HF_WEIGHT_FILES
             if os.path.isfile(os.path.join(path, f))]
    return found[0] if found else None


def _load_hf_dir(path: str, defaults=None, **model_overrides):
    return load_torch_checkpoint(_hf_weight_file(path), defaults, **model_overrides)[0]


def _is_torch_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(TORCH_SUFFIXES)


def _load_torch_file(path: str, defaults=None, **model_overrides):
    return load_torch_checkpoint(path, defaults, **model_overrides)[0]


def _is_training_workdir(path: str) -> bool:
    from ddetr_jax.train.workdir import split_workdir_path
    return split_workdir_path(path) is not None


def _load_training_workdir(path: str, defaults=None, **model_overrides):
    from ddetr_jax.train.workdir import load_workdir_model
    if model_overrides:
        raise ValueError(f"{path}: a training workdir fixes its model config (config.json); "
                         f"model overrides {sorted(model_overrides)} are not accepted")
    return load_workdir_model(path)[0]


# (what it is, does `path` look like one, loader(path, defaults, **model_overrides) -> model);
# the first match loads. Converted checkpoints and workdirs fix their config and ignore
# defaults.
CHECKPOINT_KINDS = (
    ("a training workdir (config.json and checkpoints/, from train.py: its latest "
     "checkpoint) or one of its checkpoints/STEP folders", _is_training_workdir,
     _load_training_workdir),
    ("a converted checkpoint directory (model_config.json and state/, from "
     "python -m ddetr_jax.convert)", _is_converted_dir, _load_converted_dir),
    ("a HuggingFace model directory (model.safetensors or pytorch_model.bin)",
     lambda p: os.path.isdir(p) and _hf_weight_file(p) is not None, _load_hf_dir),
    ("an authors' or HuggingFace weights file (.pth, .pt, .bin, .safetensors)",
     _is_torch_file, _load_torch_file),
)


def load_model(path, defaults=None, **model_overrides) -> DeformableDETR:
    """A DeformableDETR from any checkpoint kind in CHECKPOINT_KINDS.

    PyTorch checkpoints only: defaults are ModelConfig fields used where
    neither the weights nor the authors' args tell (dilation, heads, points,
    num_queries for two-stage); model_overrides win over the args.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    for _, matches, load in CHECKPOINT_KINDS:
        if matches(path):
            return load(path, defaults, **model_overrides)
    kinds = "\n  ".join(kind for kind, _, _ in CHECKPOINT_KINDS)
    raise CheckpointMismatch(f"checkpoint: {path} is none of the kinds this package reads:"
                             f"\n  {kinds}")


def workdir_defaults(path) -> dict:
    """Detector keyword arguments a training workdir (or one of its checkpoints/STEP
    folders) implies: shorter_side / longer_side, its config's validation resize
    (data.val_scale, data.max_size), and class_names, its dataset's category names
    (left out, with a warning, if the dataset is not found). {} for other kinds."""
    import tensorflow_datasets as tfds

    from ddetr_jax.data.source import categories_of, latest_version_dir
    from ddetr_jax.train import run_config
    from ddetr_jax.train.workdir import split_workdir_path
    found = split_workdir_path(path)
    if found is None:
        return {}
    data = run_config.load(found[0]).data
    defaults = {"shorter_side": int(data.val_scale), "longer_side": int(data.max_size)}
    try:
        info = tfds.builder_from_directory(str(latest_version_dir(data.data_dir, data.name))).info
    except FileNotFoundError as error:
        log.warning("class names: the run's dataset %r is not found (%s); detections are "
                    "labelled with their category ids", data.name, error)
        return defaults
    defaults["class_names"] = {c["id"]: c["name"] for c in categories_of(info)}
    return defaults


# ----------------------------------------------------------------------------- images

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


def bucket(length: int, multiple: int) -> int:
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
    """(H_i, W_i, 3) uint8 images -> one Batch padded to the bucket of the largest."""
    sizes = [resized_hw(im.shape[:2], shorter, longer) for im in images]
    height = bucket(max(h for h, _ in sizes), multiple)
    width = bucket(max(w for _, w in sizes), multiple)
    pixels = np.zeros((len(images), height, width, 3), np.float32)
    pad_mask = np.ones((len(images), height, width), bool)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.float32)
        pixels[i, :h, :w] = (resized / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        pad_mask[i, :h, :w] = False
    orig = np.array([im.shape[:2] for im in images], np.int32)
    return Batch(pixels, pad_mask, orig, np.array(sizes, np.int32))


# ----------------------------------------------------------------------------- detector

def _detect(graphdef, state, pixels, pad_mask, orig_size, *, num_top, nms_iou, layer,
            on_trace):
    """The jitted body: forward, post-process and, if `layer` is not None, that decoder
    layer's cross-attention sampling locations (B, Q, M, L, P, 2) and weights (B, Q, M, L, P)."""
    on_trace()
    model = nnx.merge(graphdef, state)
    if layer is None:
        out = model(pixels, pad_mask)
        return postprocess(out["pred_logits"], out["pred_boxes"], orig_size, num_top,
                           nms_iou), None
    out = model(pixels, pad_mask, with_attention=True)
    attention = out["decoder_attention"]
    return postprocess(out["pred_logits"], out["pred_boxes"], orig_size, num_top, nms_iou), {
        "locations": attention["sampling_locations"][layer],
        "weights": attention["attention_weights"][layer]}


class Detector:
    """A DeformableDETR with its pre- and post-processing; see the module docstring.

    Holds the model's weights as they are at construction.
    class_names: {category id: name} or a sequence indexed by category id
    (default: the id as text). shorter_side, longer_side: the resize; size_multiple:
    the padding bucket; batch_size: images per forward pass; num_top:
    detections kept per image before the score threshold; nms_iou: > 0 adds
    class-wise NMS at that IoU (postprocess.postprocess; 0: the authors' post-processing).
    """

    def __init__(self, model: DeformableDETR, class_names: Mapping[int, str] |
                 Sequence[str] | None = None, *, shorter_side: int = 800,
                 longer_side: int | None = 1333, size_multiple: int = 128, batch_size: int = 8,
                 num_top: int = NUM_TOP, nms_iou: float = 0.0):
        self.nms_iou = check_nms_iou(nms_iou)
        self.config = model.config
        if isinstance(class_names, Sequence):
            class_names = dict(enumerate(class_names))
        self.class_names = dict(class_names or {})
        self.shorter_side, self.longer_side = shorter_side, longer_side
        self.size_multiple, self.batch_size, self.num_top = size_multiple, batch_size, num_top
        self.compilations = 0  # traces of the jitted forward (each compiles once)
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(functools.partial(_detect, self._graphdef,
                                                  on_trace=self._count_trace),
                                static_argnames=("num_top", "nms_iou", "layer"))

    @classmethod
    def from_checkpoint(cls, path, class_names=None, *, model_overrides: Mapping | None = None,
                        **detector_kwargs) -> "Detector":
        """A Detector for any checkpoint kind load_model reads; a training workdir also
        sets the resize and the class names (workdir_defaults) unless given here."""
        model = load_model(path, **dict(model_overrides or {}))
        defaults = workdir_defaults(path)
        if class_names is None:
            class_names = defaults.pop("class_names", None)
        defaults.pop("class_names", None)
        return cls(model, class_names, **{**defaults, **detector_kwargs})

    def _count_trace(self):
        self.compilations += 1

    def class_name(self, label: int) -> str:
        return self.class_names.get(int(label), str(int(label)))

    def _run(self, images: Sequence[np.ndarray], layer: int | None):
        batch = prepare_batch(images, self.shorter_side, self.longer_side, self.size_multiple)
        detections, attention = self._forward(self._state, jnp.asarray(batch.pixels),
                                              jnp.asarray(batch.pad_mask),
                                              jnp.asarray(batch.orig_size),
                                              num_top=self.num_top, nms_iou=self.nms_iou,
                                              layer=layer)
        return batch, jax.device_get(detections), jax.device_get(attention)

    def predict(self, image_or_images, score_threshold: float = 0.5):
        """Detections of one image (a dict) or of a list of images (a list of dicts).

        Each dict: 'boxes_xyxy' (N, 4) float32 pixels of the original image,
        'scores' (N,) descending, 'labels' (N,) int category ids, 'class_names'
        [N names], 'queries' (N,) the decoder query of each detection; N <=
        num_top detections with score >= score_threshold (and > 0: not suppressed).
        """
        single = not isinstance(image_or_images, (list, tuple))
        images = [load_image(im) for im in ([image_or_images] if single else image_or_images)]
        predictions = []
        for start in range(0, len(images), self.batch_size):
            _, detections, _ = self._run(images[start:start + self.batch_size], None)
            for i in range(len(detections["scores"])):
                predictions.append(self._select(detections, i, score_threshold))
        return predictions[0] if single else predictions

    def _select(self, detections, i: int, score_threshold: float) -> dict:
        scores = detections["scores"][i]
        keep = (scores >= score_threshold) & (scores > 0)
        labels = detections["labels"][i][keep]
        return {"boxes_xyxy": detections["boxes_xyxy"][i][keep],
                "scores": scores[keep], "labels": labels,
                "class_names": [self.class_name(label) for label in labels],
                "queries": detections["queries"][i][keep]}

    def attention(self, image, layer: int = -1, query: int | None = None) -> dict:
        """Where one decoder query's cross-attention samples, in original-image pixels.

        layer: decoder layer (negative counts from the last); query: the query
        index (default: the query of the best detection).
        Returns {'query', 'layer', 'box_xyxy' (4,), 'score', 'label', 'class_name'
        (the query's best detection; None if it has none among the num_top),
        'points_xy' (M, L, P, 2) pixels of the original image, 'weights' (M, L, P)
        attention weights (summing to 1 per head)}.
        """
        layers, queries = self.config.dec_layers, self.config.num_queries
        if not -layers <= layer < layers:
            raise ValueError(f"layer: expected -{layers} <= layer < {layers}, got {layer}")
        if query is not None and not 0 <= query < queries:
            raise ValueError(f"query: expected 0 <= query < {queries}, got {query}")
        image = load_image(image)
        batch, detections, attention = self._run([image], layer % layers)
        if query is None:
            query = int(detections["queries"][0, 0])
        # The query's best-scoring detection among the kept ones, if any.
        rows = np.flatnonzero((detections["queries"][0] == query)
                              & (detections["scores"][0] > 0))
        row = int(rows[0]) if rows.size else None
        shapes = self._level_shapes(batch.pixels.shape[1:3])
        points = _to_original_pixels(attention["locations"][0, query], shapes,
                                     batch.pixels.shape[1:3], batch.resized_size[0],
                                     batch.orig_size[0])
        label = int(detections["labels"][0, row]) if row is not None else None
        return {"query": query, "layer": layer % layers,
                "box_xyxy": detections["boxes_xyxy"][0, row] if row is not None else None,
                "score": float(detections["scores"][0, row]) if row is not None else None,
                "label": label, "class_name": self.class_name(label) if row is not None else None,
                "points_xy": points, "weights": attention["weights"][0, query]}

    def _level_shapes(self, padded_hw) -> list[tuple[int, int]]:
        """[(H_l, W_l)] of the feature levels for a padded (H, W) input (shapes only)."""
        model = nnx.merge(self._graphdef, self._state)
        sources, _, _ = jax.eval_shape(model.features, jnp.zeros((1, *padded_hw, 3)),
                                       jnp.zeros((1, *padded_hw), bool))
        return [(s.shape[1], s.shape[2]) for s in sources]

    def draw(self, image, prediction: dict, width: int = 2) -> Image.Image:
        """The image (RGB) with the prediction's boxes and '<class> <score>' labels."""
        return draw_prediction(image, prediction, width)


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


def _to_original_pixels(locations, level_shapes, padded_hw, resized_hw, orig_hw):
    """Normalised sampling locations (M, L, P, 2) (x, y over each padded level map) ->
    pixels of the original image (M, L, P, 2).

    A level map cell spans `stride` input pixels, a power of two (padded size /
    level size, rounded up to it where the convolutions rounded the map size up).
    """
    cells = np.array([[w, h] for h, w in level_shapes], np.float32)  # (L, 2)
    stride = 2.0 ** np.round(np.log2(np.array(padded_hw[::-1], np.float32) / cells))  # (L, 2)
    scale = np.array([orig_hw[1] / resized_hw[1], orig_hw[0] / resized_hw[0]], np.float32)
    return locations * (cells * stride)[None, :, None, :] * scale  # (M, L, P, 2)


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
