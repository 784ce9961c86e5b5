"""Box conversions and overlaps (pure jnp).

Mirrors the authors' util/box_ops.py (box_cxcywh_to_xyxy, generalized_box_iou).
Boxes are (..., 4); the format is in every name.
"""

from __future__ import annotations

import jax.numpy as jnp


def cxcywh_to_xyxy(boxes_cxcywh):
    cx, cy, w, h = jnp.moveaxis(boxes_cxcywh, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def xyxy_to_cxcywh(boxes_xyxy):
    x0, y0, x1, y1 = jnp.moveaxis(boxes_xyxy, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def area_xyxy(boxes_xyxy):
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def _iou_and_union(a_xyxy, b_xyxy):
    """a: (..., 4), b: (..., 4) broadcastable -> iou, union (...)."""
    lt = jnp.maximum(a_xyxy[..., :2], b_xyxy[..., :2])
    rb = jnp.minimum(a_xyxy[..., 2:], b_xyxy[..., 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_xyxy(a_xyxy) + area_xyxy(b_xyxy) - inter
    return inter / union, union


def generalized_iou(a_xyxy, b_xyxy):
    """Elementwise GIoU of broadcastable (..., 4) boxes -> (...)."""
    iou, union = _iou_and_union(a_xyxy, b_xyxy)
    lt = jnp.minimum(a_xyxy[..., :2], b_xyxy[..., :2])
    rb = jnp.maximum(a_xyxy[..., 2:], b_xyxy[..., 2:])
    wh = jnp.clip(rb - lt, 0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def pairwise_iou(a_xyxy, b_xyxy):
    """a: (N, 4), b: (M, 4) -> (N, M) IoU of every pair; 0 where the union is empty."""
    iou, union = _iou_and_union(a_xyxy[:, None, :], b_xyxy[None, :, :])
    return jnp.where(union > 0, iou, 0.0)


def pairwise_generalized_iou(a_xyxy, b_xyxy):
    """a: (N, 4), b: (M, 4) -> (N, M) GIoU of every pair."""
    return generalized_iou(a_xyxy[:, None, :], b_xyxy[None, :, :])
