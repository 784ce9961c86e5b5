"""Model outputs -> scored, labelled boxes in original-image pixels.

Mirrors the authors' models/deformable_detr.py (PostProcess.forward): sigmoid
scores, top-k over every (query, class) pair of an image, label = flat index
mod C, query = flat index // C, boxes cxcywh -> xyxy scaled by the original
image size. The class index is the dataset's category id (C = max id + 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ddetr_jax.box_ops import cxcywh_to_xyxy

NUM_TOP = 100  # detections per image in the published COCO evaluation


@functools.partial(jax.jit, static_argnames="num_top")
def postprocess(pred_logits, pred_boxes, orig_size, num_top: int = NUM_TOP):
    """Top `num_top` detections per image.

    pred_logits: (B, Q, C) class logits; pred_boxes: (B, Q, 4) normalised
    (cx, cy, w, h) relative to the unpadded image; orig_size: (B, 2) (height,
    width) of the original images in pixels.
    Returns {'scores': (B, K) float32 descending, 'labels': (B, K) int32,
    'boxes_xyxy': (B, K, 4) float32 pixels of the original image, 'queries':
    (B, K) int32 the query of each detection} with K = num_top.
    """
    b, q, c = pred_logits.shape
    if pred_boxes.shape != (b, q, 4):
        raise ValueError(f"pred_boxes: expected shape {(b, q, 4)}, got {pred_boxes.shape}")
    if orig_size.shape != (b, 2):
        raise ValueError(f"orig_size: expected shape {(b, 2)} (height, width), got "
                         f"{orig_size.shape}")
    if num_top > q * c:
        raise ValueError(f"num_top ({num_top}) exceeds queries * classes ({q} * {c})")
    probs = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(b, q * c)  # (B, Q*C)
    scores, flat = jax.lax.top_k(probs, num_top)  # (B, K)
    labels = (flat % c).astype(jnp.int32)
    query = (flat // c).astype(jnp.int32)
    boxes_xyxy = cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))  # (B, Q, 4)
    boxes_xyxy = jnp.take_along_axis(boxes_xyxy, query[..., None], axis=1)  # (B, K, 4)
    h, w = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], -1)[:, None, :]  # (B, 1, 4)
    return {"scores": scores, "labels": labels, "boxes_xyxy": boxes_xyxy * scale,
            "queries": query}
