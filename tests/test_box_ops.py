import numpy as np
import torch
from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou

from ddetr_jax import box_ops


def random_boxes_cxcywh(rng, n):
    return np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.4, (n, 2))],
                          -1).astype(np.float32)


def test_round_trip():
    boxes = random_boxes_cxcywh(np.random.default_rng(0), 20)
    back = box_ops.xyxy_to_cxcywh(box_ops.cxcywh_to_xyxy(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-6)


def test_pairwise_giou_matches_reference_and_its_bounds():
    rng = np.random.default_rng(1)
    a = np.asarray(box_ops.cxcywh_to_xyxy(random_boxes_cxcywh(rng, 7)))
    b = np.asarray(box_ops.cxcywh_to_xyxy(random_boxes_cxcywh(rng, 5)))
    ours = np.asarray(box_ops.pairwise_generalized_iou(a, b))
    ref = generalized_box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert np.all(ours <= 1) and np.all(ours >= -1)
    np.testing.assert_allclose(np.diag(np.asarray(box_ops.pairwise_generalized_iou(a, a))), 1,
                               atol=1e-6)


def test_pairwise_iou_matches_reference_and_empty_boxes_give_zero():
    rng = np.random.default_rng(2)
    a = np.asarray(box_ops.cxcywh_to_xyxy(random_boxes_cxcywh(rng, 6)))
    b = np.asarray(box_ops.cxcywh_to_xyxy(random_boxes_cxcywh(rng, 4)))
    ref = box_iou(torch.tensor(a), torch.tensor(b))[0].numpy()
    np.testing.assert_allclose(np.asarray(box_ops.pairwise_iou(a, b)), ref, atol=1e-6)
    empty = np.array([[0.3, 0.3, 0.3, 0.3]], np.float32)
    np.testing.assert_array_equal(np.asarray(box_ops.pairwise_iou(empty, empty)), [[0.0]])
