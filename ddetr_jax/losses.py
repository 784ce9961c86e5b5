"""Set criterion: sigmoid focal loss, L1 and GIoU on matched pairs, auxiliary and encoder losses.

Mirrors the authors' models/deformable_detr.py (SetCriterion: loss_labels
with sigmoid_focal_loss, loss_boxes) with fixed shapes: targets are padded to
T with a validity flag, and the matching is a (B, T) query index per target.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ddetr_jax import box_ops
from ddetr_jax.matcher import MatchWeights, cost_matrix, match


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (published 2 / 5 / 2), focal parameters, matcher."""

    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
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
    loss_ce = sigmoid_focal_loss(pred_logits, onehot, config.focal_alpha,
                                 config.focal_gamma).sum() / num_boxes
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
    the decoder layers in order ('_0'..'_{L-2}', then '' for the last layer) and,
    two-stage, the encoder proposals ('_enc', class-agnostic: every label 0)."""
    layers = [*outputs["aux_outputs"], outputs]
    sets = [(f"_{i}" if i < len(layers) - 1 else "", out, labels) for i, out in enumerate(layers)]
    if "enc_outputs" in outputs:
        sets.append(("_enc", outputs["enc_outputs"], jnp.zeros_like(labels)))
    return sets


def _stacked_layers(outputs):
    """The decoder layers' predictions stacked: logits (L, B, Q, C), boxes (L, B, Q, 4).
    Costs and losses are computed for all layers at once (vmap): one set of
    operations to compile, not one per layer."""
    layers = [*outputs["aux_outputs"], outputs]
    return (jnp.stack([o["pred_logits"] for o in layers]),
            jnp.stack([o["pred_boxes"] for o in layers]))


def matching_costs(outputs, batch, config: LossConfig = LossConfig()) -> list:
    """The matching cost of every prediction set (prediction_sets' order):
    [(B, Q_set, T) float32], no gradient."""
    labels, boxes = batch["labels"], batch["boxes_cxcywh"]
    cost = functools.partial(cost_matrix, weights=config.matcher)
    logits, pred_boxes = _stacked_layers(outputs)
    costs = list(jax.vmap(cost, (0, 0, None, None))(logits, pred_boxes, labels, boxes))
    if "enc_outputs" in outputs:
        enc = outputs["enc_outputs"]
        costs.append(cost(enc["pred_logits"], enc["pred_boxes"], jnp.zeros_like(labels), boxes))
    return [jax.lax.stop_gradient(c) for c in costs]


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
    if len(matches) != len(sets):
        raise ValueError(f"matches: expected {len(sets)} (one per prediction set), "
                         f"got {len(matches)}")
    num_layers = len(outputs["aux_outputs"]) + 1
    logits, pred_boxes = _stacked_layers(outputs)
    per_layer = jax.vmap(lambda lg, bx, m: set_losses(lg, bx, labels, boxes, m, num_boxes,
                                                      config))(
        logits, pred_boxes, jnp.stack(matches[:num_layers]))  # {name: (L,)}
    losses = [(suffix, {name: value[i] for name, value in per_layer.items()})
              for i, (suffix, _, _) in enumerate(sets[:num_layers])]
    for (suffix, out, set_labels), query_for_target in zip(sets[num_layers:],
                                                           matches[num_layers:]):
        losses.append((suffix, set_losses(out["pred_logits"], out["pred_boxes"], set_labels,
                                           boxes, query_for_target, num_boxes, config)))
    weights = {"loss_ce": config.class_weight, "loss_bbox": config.bbox_weight,
               "loss_giou": config.giou_weight}
    terms = {"num_matched": (matches[num_layers - 1] >= 0).sum()}
    total = 0.0
    for suffix, values in losses:
        for name, value in values.items():
            terms[name + suffix] = value
            total = total + weights[name] * value
    return total, terms
