"""Matching and losses against HuggingFace transformers' DeformableDetr matcher and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec as P
from transformers.loss.loss_deformable_detr import (DeformableDetrHungarianMatcher,
                                                    DeformableDetrImageLoss)

from ddetr_jax.losses import LossConfig, criterion, set_losses
from ddetr_jax.matcher import match


def random_problem(seed, b=3, q=12, c=7, t=5, counts=(3, 0, 5)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, q, c)).astype(np.float32)
    pred = np.concatenate([rng.uniform(0.2, 0.8, (b, q, 2)), rng.uniform(0.05, 0.3, (b, q, 2))],
                          -1).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, t, 2)), rng.uniform(0.05, 0.3, (b, t, 2))],
                           -1).astype(np.float32)
    labels = rng.integers(0, c, (b, t)).astype(np.int32)
    valid = np.arange(t)[None, :] < np.asarray(counts)[:, None]
    return logits, pred, labels, boxes, valid


def hf_targets(labels, boxes, valid):
    return [{"class_labels": torch.tensor(labels[i][valid[i]]).long(),
             "boxes": torch.tensor(boxes[i][valid[i]])} for i in range(len(labels))]


@pytest.mark.parametrize("solver", ["scipy", "optax"])
def test_matching_equals_hf(solver):
    logits, pred, labels, boxes, valid = random_problem(0)
    ours = np.asarray(jax.jit(lambda *a: match(*a, solver=solver))(logits, pred, labels, boxes,
                                                                    valid))
    hf = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)(
        {"logits": torch.tensor(logits), "pred_boxes": torch.tensor(pred)},
        hf_targets(labels, boxes, valid))
    for i, (rows, cols) in enumerate(hf):
        expected = np.full(valid.shape[1], -1)
        expected[np.flatnonzero(valid[i])[cols.numpy()]] = rows.numpy()
        np.testing.assert_array_equal(ours[i], expected)


def test_losses_equal_hf():
    logits, pred, labels, boxes, valid = random_problem(1)
    num_boxes = float(valid.sum())
    q4t = jax.jit(match)(logits, pred, labels, boxes, valid)
    ours = set_losses(jnp.asarray(logits), jnp.asarray(pred), labels, boxes, q4t, num_boxes,
                      LossConfig())
    matcher = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    hf_loss = DeformableDetrImageLoss(matcher, num_classes=logits.shape[-1], focal_alpha=0.25,
                                      losses=["labels", "boxes"])
    hf = hf_loss({"logits": torch.tensor(logits), "pred_boxes": torch.tensor(pred)},
                 hf_targets(labels, boxes, valid))
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        np.testing.assert_allclose(float(ours[name]), float(hf[name]), rtol=1e-5)


def test_criterion_has_aux_and_encoder_terms_and_weights():
    logits, pred, labels, boxes, valid = random_problem(2)
    layer = {"pred_logits": jnp.asarray(logits), "pred_boxes": jnp.asarray(pred)}
    outputs = {**layer, "aux_outputs": [layer, layer], "enc_outputs": layer}
    batch = {"labels": labels, "boxes_cxcywh": boxes, "target_valid": valid}
    total, terms = jax.jit(criterion)(outputs, batch, 8.0)
    assert {"loss_ce_0", "loss_giou_1", "loss_bbox_enc"} <= set(terms)
    assert int(terms["num_matched"]) == valid.sum()
    main = 2 * terms["loss_ce"] + 5 * terms["loss_bbox"] + 2 * terms["loss_giou"]
    enc = 2 * terms["loss_ce_enc"] + 5 * terms["loss_bbox_enc"] + 2 * terms["loss_giou_enc"]
    np.testing.assert_allclose(float(total), float(3 * main + enc), rtol=1e-5)
    # Class-agnostic encoder targets: the box terms equal a class-0 matching's.
    assert float(terms["loss_ce_enc"]) != float(terms["loss_ce"])


def test_no_targets_gives_only_the_negative_focal_term():
    logits, pred, labels, boxes, _ = random_problem(3)
    valid = np.zeros(labels.shape, bool)
    q4t = jax.jit(match)(logits, pred, labels, boxes, valid)
    assert np.all(np.asarray(q4t) == -1)
    losses = set_losses(jnp.asarray(logits), jnp.asarray(pred), labels, boxes, q4t, 1.0,
                        LossConfig())
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_giou"]) == 0
    assert float(losses["loss_ce"]) > 0


def test_non_finite_costs_raise_a_clear_error():
    logits, pred, labels, boxes, valid = random_problem(4)
    logits[0, 3, :] = np.nan
    with pytest.raises(Exception, match="non-finite matching cost"):
        jax.block_until_ready(jax.jit(match)(logits, pred, labels, boxes, valid))


def test_optax_matching_inside_shard_map_equals_scipy():
    """On device inside the data-parallel step: each device's slice of the batch."""
    logits, pred, labels, boxes, valid = random_problem(2, b=8, counts=(3, 0, 5, 1, 5, 2, 4, 5))
    expected = np.asarray(jax.jit(match)(logits, pred, labels, boxes, valid))
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    sharded = jax.jit(jax.shard_map(lambda *a: match(*a, solver="optax"), mesh=mesh,
                                    in_specs=P("data"), out_specs=P("data")))
    np.testing.assert_array_equal(np.asarray(sharded(logits, pred, labels, boxes, valid)),
                                  expected)
