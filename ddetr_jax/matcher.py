"""Hungarian matching of predictions to targets, per image.

Mirrors the authors' models/matcher.py (HungarianMatcher with the focal-style
class cost). The cost matrix is computed on device; the assignment is
scipy.optimize.linear_sum_assignment (`scipy_assign` on the host, as the
train step runs it between its two programs, or `match` through
jax.pure_callback) or optax's on-device Hungarian algorithm. Results have
fixed shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from ddetr_jax import box_ops
from ddetr_jax.ops.manual_axes import varying_axes


@dataclasses.dataclass(frozen=True)
class MatchWeights:
    """Weights of the three matching costs (published: 2 / 5 / 2) and the focal
    parameters, shared by the class cost and the focal loss."""

    class_cost: float = 2.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def cost_matrix(pred_logits, pred_boxes_cxcywh, labels, boxes_cxcywh, weights: MatchWeights):
    """Matching cost of every (query, target) pair of one batch.

    pred_logits: (B, Q, C); pred_boxes_cxcywh: (B, Q, 4); labels: (B, T) int;
    boxes_cxcywh: (B, T, 4) -> cost (B, Q, T) in float32.
    """
    prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32))
    a, g = weights.focal_alpha, weights.focal_gamma
    neg = (1 - a) * prob ** g * -jnp.log(1 - prob + 1e-8)
    pos = a * (1 - prob) ** g * -jnp.log(prob + 1e-8)
    class_cost = jnp.take_along_axis(pos - neg, labels[:, None, :], axis=2)  # (B, Q, T)
    pred = pred_boxes_cxcywh.astype(jnp.float32)
    target = boxes_cxcywh.astype(jnp.float32)
    l1 = jnp.abs(pred[:, :, None, :] - target[:, None, :, :]).sum(-1)  # (B, Q, T)
    giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred)[:, :, None, :],
                                   box_ops.cxcywh_to_xyxy(target)[:, None, :, :])
    return weights.class_cost * class_cost + weights.bbox_cost * l1 - weights.giou_cost * giou


def scipy_assign(cost, target_valid, raise_on_nonfinite: bool):
    """Host side: cost (B, Q, T), target_valid (B, T) -> (B, T) int32 query per target.

    Non-finite costs raise, or leave the image unmatched (all -1).
    """
    cost = np.asarray(cost)
    target_valid = np.asarray(target_valid)
    out = np.full(target_valid.shape, -1, np.int32)
    for b in range(cost.shape[0]):
        columns = np.flatnonzero(target_valid[b])
        if columns.size == 0:
            continue
        sub = cost[b][:, columns]
        if not np.all(np.isfinite(sub)):
            if not raise_on_nonfinite:
                continue
            bad = np.argwhere(~np.isfinite(sub))[0]
            raise ValueError(
                f"matcher: non-finite matching cost for image {b} of this device's batch "
                f"(query {bad[0]}, target {columns[bad[1]]}); the model produced NaN/inf "
                "logits or boxes, or a target box is degenerate")
        rows, cols = scipy.optimize.linear_sum_assignment(sub)
        out[b, columns[cols]] = rows
    return out


def _optax_assign(cost, target_valid):
    """On device: cost (B, Q, T) -> (B, T) int32; invalid targets get -1, and so
    do all targets of an image with non-finite costs (no error on device).

    Padded targets get a constant column cost, which never changes the
    assignment of the real ones (every assignment pays it once).
    """
    finite = jnp.all(jnp.isfinite(cost) | ~target_valid[:, None, :], axis=(1, 2))  # (B,)
    cost = jnp.where(target_valid[:, None, :] & finite[:, None, None], cost, 0.0)

    def one(c):  # (Q, T) -> (T,)
        rows, cols = optax.assignment.hungarian_algorithm(c)
        return jnp.full((c.shape[1],), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))

    axes = tuple(sorted(varying_axes(cost)))
    if axes:
        # Inside shard_map: optax's loop carries start device-invariant and
        # cannot take a per-device cost, so every device solves the whole
        # batch, gathered by a psum (whose result is invariant), and keeps its
        # own slice (a few hundred microseconds of work).
        batch = cost.shape[0]
        start = jax.lax.axis_index(axes) * batch
        slots = jnp.zeros((jax.lax.psum(1, axes) * batch,) + cost.shape[1:], cost.dtype)
        gathered = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(slots, cost, start, 0), axes)
        assigned = jax.lax.dynamic_slice_in_dim(jax.vmap(one)(gathered), start, batch)
    else:
        assigned = jax.vmap(one)(cost)
    return jnp.where(target_valid & finite[:, None], assigned, -1)


def match(pred_logits, pred_boxes_cxcywh, labels, boxes_cxcywh, target_valid,
          weights: MatchWeights = MatchWeights(), solver: str = "scipy",
          nonfinite_costs: str = "raise"):
    """Optimal one-to-one assignment of queries to the real targets of every image.

    Returns query_for_target (B, T) int32: the matched query of each target,
    -1 for padded targets (and for targets left over when T_valid > Q).
    No gradient flows through the matching. nonfinite_costs: 'raise' (an
    error naming image, query and target; scipy solver) or 'unmatched' (that
    image's targets get -1).
    """
    if nonfinite_costs not in ("raise", "unmatched"):
        raise ValueError(f"nonfinite_costs: expected 'raise' or 'unmatched', got "
                         f"{nonfinite_costs!r}")
    cost = jax.lax.stop_gradient(
        cost_matrix(pred_logits, pred_boxes_cxcywh, labels, boxes_cxcywh, weights))
    if solver == "optax":
        return _optax_assign(cost, target_valid)
    if solver != "scipy":
        raise ValueError(f"solver: expected 'scipy' or 'optax', got {solver!r}")
    result = jax.ShapeDtypeStruct(target_valid.shape, jnp.int32)
    assign = functools.partial(scipy_assign, raise_on_nonfinite=nonfinite_costs == "raise")
    return jax.pure_callback(assign, result, cost, target_valid, vmap_method="sequential")
