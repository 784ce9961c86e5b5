"""Model outputs -> scored, labelled boxes in original-image pixels.

Mirrors the authors' models/deformable_detr.py (PostProcess.forward): sigmoid
scores, top-k over every (query, class) pair of an image, label = flat index
mod C, query = flat index // C, boxes cxcywh -> xyxy scaled by the original
image size. The class index is the dataset's category id (C = max id + 1).

Optionally (nms_iou > 0, off by default and in the authors' evaluation)
class-wise non-maximum suppression among those top detections: a detection
whose IoU with a higher-scoring kept detection of the same class exceeds
nms_iou is suppressed. Suppressed detections keep their slot (static
shapes) with score 0, sorted after every kept one; a score of 0 means "no
detection" to every consumer (COCO results, Detector.predict).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ddetr_jax.box_ops import cxcywh_to_xyxy, pairwise_iou
from ddetr_jax.ops.manual_axes import make_varying, varying_axes

NUM_TOP = 100  # detections per image in the published COCO evaluation


def num_top_for(num_queries: int, num_classes: int) -> int:
    """NUM_TOP, or every (query, class) pair of a model with fewer."""
    return min(NUM_TOP, num_queries * num_classes)


def check_nms_iou(value: float, name: str = "nms_iou") -> float:
    """value as a float if it is 0 (no NMS) or an IoU in (0, 1); else a ValueError."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected 0 (off) or an IoU in (0, 1), got {value}")
    return value


def nms_keep(boxes_xyxy, labels, iou_threshold: float):
    """Greedy class-wise NMS of detections sorted by descending score.

    boxes_xyxy: (K, 4); labels: (K,). Returns keep: (K,) bool; detection i is
    kept unless a kept detection j < i of the same label has IoU > iou_threshold
    (torchvision's batched_nms rule).
    """
    k = labels.shape[0]
    index = jnp.arange(k)
    suppresses = ((pairwise_iou(boxes_xyxy, boxes_xyxy) > iou_threshold)
                  & (labels[:, None] == labels[None, :])
                  & (index[None, :] < index[:, None]))  # (K, K): row i, earlier column j

    def visit(i, keep):
        return keep.at[i].set(~jnp.any(suppresses[i] & keep))

    keep = make_varying(jnp.ones(k, bool), varying_axes(suppresses))  # inside shard_map too
    return jax.lax.fori_loop(0, k, visit, keep)


@functools.partial(jax.jit, static_argnames=("num_top", "nms_iou"))
def postprocess(pred_logits, pred_boxes, orig_size, num_top: int = NUM_TOP,
                nms_iou: float = 0.0):
    """Top `num_top` detections per image, then NMS at nms_iou if it is > 0.

    pred_logits: (B, Q, C) class logits; pred_boxes: (B, Q, 4) normalised
    (cx, cy, w, h) relative to the unpadded image; orig_size: (B, 2) (height,
    width) of the original images in pixels.
    Returns {'scores': (B, K) float32 descending, 'labels': (B, K) int32,
    'boxes_xyxy': (B, K, 4) float32 pixels of the original image, 'queries':
    (B, K) int32 the query of each detection} with K = num_top. With NMS the
    suppressed detections have score 0 and come last (see the module doc).
    """
    b, q, c = pred_logits.shape
    if pred_boxes.shape != (b, q, 4):
        raise ValueError(f"pred_boxes: expected shape {(b, q, 4)}, got {pred_boxes.shape}")
    if orig_size.shape != (b, 2):
        raise ValueError(f"orig_size: expected shape {(b, 2)} (height, width), got "
                         f"{orig_size.shape}")
    if num_top > q * c:
        raise ValueError(f"num_top ({num_top}) exceeds queries * classes ({q} * {c})")
    check_nms_iou(nms_iou)
    probs = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(b, q * c)  # (B, Q*C)
    scores, flat = jax.lax.top_k(probs, num_top)  # (B, K)
    labels = (flat % c).astype(jnp.int32)
    query = (flat // c).astype(jnp.int32)
    boxes_xyxy = cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))  # (B, Q, 4)
    boxes_xyxy = jnp.take_along_axis(boxes_xyxy, query[..., None], axis=1)  # (B, K, 4)
    h, w = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], -1)[:, None, :]  # (B, 1, 4)
    out = {"scores": scores, "labels": labels, "boxes_xyxy": boxes_xyxy * scale,
           "queries": query}
    if nms_iou > 0:
        keep = jax.vmap(nms_keep, in_axes=(0, 0, None))(out["boxes_xyxy"], labels, nms_iou)
        out["scores"] = jnp.where(keep, scores, 0.0)
        order = jnp.argsort(~keep, axis=1, stable=True)  # kept first, each part in score order
        out = {k: jnp.take_along_axis(v, order if v.ndim == 2 else order[..., None], axis=1)
               for k, v in out.items()}
    return out
