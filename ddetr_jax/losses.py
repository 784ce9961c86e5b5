"""Set criterion: sigmoid focal loss, L1 and GIoU on matched pairs, auxiliary and encoder losses.

Mirrors the authors' models/deformable_detr.py (SetCriterion: loss_labels
with sigmoid_focal_loss, loss_boxes) with fixed shapes: targets are padded to
T with a validity flag, and the matching is a (B, T) query index per target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ddetr_jax import box_ops
from ddetr_jax.matcher import MatchWeights, cost_matrix, match


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (published 2 / 5 / 2); the matching costs and the focal parameters
    (matcher); the assignment solver."""

    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    matcher: MatchWeights = MatchWeights()
    solver: str = "scipy"  # or "optax" (on device)
    nonfinite_costs: str = "raise"  # or "unmatched" (see matcher.match)


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise focal loss. logits, targets: (...) -> (...)."""
    logits = logits.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma


def set_losses(pred_logits, pred_boxes_cxcywh, labels, boxes_cxcywh, query_for_target,
               num_boxes, config: LossConfig):
    """Unweighted losses of one prediction set given a matching.

    pred_logits: (B, Q, C); pred_boxes_cxcywh: (B, Q, 4); labels: (B, T);
    boxes_cxcywh: (B, T, 4); query_for_target: (B, T), -1 = unmatched;
    num_boxes: scalar normaliser. Returns {'loss_ce', 'loss_bbox', 'loss_giou'}.
    """
    b, q, c = pred_logits.shape
    matched = query_for_target >= 0  # (B, T)
    query = jnp.maximum(query_for_target, 0)
    batch = jnp.arange(b)[:, None]
    onehot = jnp.zeros((b, q, c), jnp.float32).at[batch, query, labels].add(
        matched.astype(jnp.float32))  # (B, Q, C)
    loss_ce = sigmoid_focal_loss(pred_logits, onehot, config.matcher.focal_alpha,
                                 config.matcher.focal_gamma).sum() / num_boxes
    pred = jnp.take_along_axis(pred_boxes_cxcywh.astype(jnp.float32), query[..., None],
                               axis=1)  # (B, T, 4)
    target = boxes_cxcywh.astype(jnp.float32)
    l1 = jnp.abs(pred - target).sum(-1)
    giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(target))
    return {"loss_ce": loss_ce,
            "loss_bbox": jnp.where(matched, l1, 0).sum() / num_boxes,
            "loss_giou": jnp.where(matched, 1 - giou, 0).sum() / num_boxes}


def prediction_sets(outputs, labels):
    """[(suffix, {'pred_logits', 'pred_boxes'}, labels)] of every matched prediction set:
    the last layer (''), the auxiliary layers ('_0'..'_{L-2}') and, two-stage, the
    encoder proposals ('_enc', class-agnostic: every label 0)."""
    sets = [("", outputs, labels)]
    sets += [(f"_{i}", aux, labels) for i, aux in enumerate(outputs["aux_outputs"])]
    if "enc_outputs" in outputs:
        sets.append(("_enc", outputs["enc_outputs"], jnp.zeros_like(labels)))
    return sets


def matching_costs(outputs, batch, config: LossConfig = LossConfig()) -> list:
    """The matching cost of every prediction set (prediction_sets' order):
    [(B, Q_set, T) float32], no gradient."""
    return [jax.lax.stop_gradient(cost_matrix(out["pred_logits"], out["pred_boxes"],
                                              set_labels, batch["boxes_cxcywh"], config.matcher))
            for _, out, set_labels in prediction_sets(outputs, batch["labels"])]


def criterion(outputs, batch, num_boxes, config: LossConfig = LossConfig(), matches=None):
    """Every loss term of a model output, matched per prediction set.

    outputs: the DeformableDETR dict; batch: 'labels' (B, T), 'boxes_cxcywh'
    (B, T, 4), 'target_valid' (B, T). matches: the matching of every set
    (prediction_sets' order) as [(B, T) query per target, -1 unmatched], or
    None to match here (config.solver). Returns (total weighted loss, terms)
    with terms named 'loss_ce', ..., '_0'..'_{L-2}' suffixed for auxiliary
    layers and '_enc' for the two-stage encoder (class-agnostic targets), and
    'num_matched' (the last layer's matched boxes).
    """
    labels, boxes, valid = batch["labels"], batch["boxes_cxcywh"], batch["target_valid"]
    sets = prediction_sets(outputs, labels)
    if matches is None:
        matches = [match(out["pred_logits"], out["pred_boxes"], set_labels, boxes, valid,
                         config.matcher, config.solver, config.nonfinite_costs)
                   for _, out, set_labels in sets]
    weights = {"loss_ce": config.class_weight, "loss_bbox": config.bbox_weight,
               "loss_giou": config.giou_weight}
    terms, total = {}, 0.0
    for (suffix, out, set_labels), query_for_target in zip(sets, matches, strict=True):
        if suffix == "":
            terms["num_matched"] = (query_for_target >= 0).sum()
        for name, value in set_losses(out["pred_logits"], out["pred_boxes"], set_labels, boxes,
                                      query_for_target, num_boxes, config).items():
            terms[name + suffix] = value
            total = total + weights[name] * value
    return total, terms
