"""The notebook API: load a checkpoint, detect objects in images, draw them, look at attention.

    detector = Detector.from_checkpoint("converted/r50", class_names={1: "person", ...})
    prediction = detector.predict("image.jpg", score_threshold=0.5)
    detector.draw("image.jpg", prediction).show()
    attention = detector.attention("image.jpg")    # where the best detection's query looked
    plot_attention("image.jpg", attention)           # ddetr_jax.drawing; needs matplotlib

Images are resized as in the authors' validation transform (shorter side
800, longer side at most 1333; a training workdir's own val_scale / max_size),
normalised with the ImageNet statistics and
padded bottom/right to a size bucket (multiples of 128 by default), so a new
image size compiles only when it falls into a bucket (and batch size) not
seen before.
"""

from __future__ import annotations

import functools
import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ddetr_jax.checkpoints.loading import load_model, split_workdir_path
from ddetr_jax.config import run_config
from ddetr_jax.drawing import draw_prediction
from ddetr_jax.images import load_image, prepare_batch
from ddetr_jax.models import DeformableDETR
from ddetr_jax.postprocess import NUM_TOP, check_nms_iou, postprocess

log = logging.getLogger(__name__)


def workdir_defaults(path) -> dict:
    """Detector keyword arguments a training workdir (or one of its checkpoints/STEP
    folders) implies: shorter_side / longer_side, its config's validation resize
    (data.val_scale, data.max_size), and class_names, its dataset's category names
    (left out, with a warning, if the dataset is not found). {} for other kinds."""
    import tensorflow_datasets as tfds

    from ddetr_jax.data.source import categories_of, latest_version_dir
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
