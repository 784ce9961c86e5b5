"""Post-processing: parity with the authors' PostProcess (in torch) and hand-made cases."""

import numpy as np
import pytest
import torch

from ddetr_jax.postprocess import nms_keep, postprocess


def authors_postprocess(logits, boxes_cxcywh, target_sizes):
    """The authors' models/deformable_detr.py PostProcess.forward, verbatim in torch."""
    out_logits, out_bbox = torch.tensor(logits), torch.tensor(boxes_cxcywh)
    prob = out_logits.sigmoid()
    topk_values, topk_indexes = torch.topk(prob.view(out_logits.shape[0], -1), 100, dim=1)
    topk_boxes = topk_indexes // out_logits.shape[2]
    labels = topk_indexes % out_logits.shape[2]
    cx, cy, w, h = out_bbox.unbind(-1)
    boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    boxes = torch.gather(boxes, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
    img_h, img_w = torch.tensor(target_sizes).unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    boxes = boxes * scale_fct[:, None, :]
    return topk_values.numpy(), labels.numpy(), boxes.numpy(), topk_boxes.numpy()


def test_matches_authors_postprocess():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 30, 91)).astype(np.float32) * 3
    boxes = rng.uniform(0.05, 0.95, size=(3, 30, 4)).astype(np.float32)
    sizes = np.array([[480, 640], [800, 1333], [37, 91]], np.float32)
    out = postprocess(logits, boxes, sizes)
    scores, labels, boxes_xyxy, queries = authors_postprocess(logits, boxes, sizes)
    assert out["scores"].shape == (3, 100) and out["labels"].dtype == np.int32
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-6)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["queries"], queries)
    np.testing.assert_allclose(out["boxes_xyxy"], boxes_xyxy, rtol=1e-5, atol=1e-3)


def test_hand_made_detection():
    logits = np.full((1, 4, 8), -10.0, np.float32)
    logits[0, 2, 5] = 3.0  # query 2, category 5: the best pair
    logits[0, 0, 7] = 1.0  # query 0, category 7: second
    boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.4], np.float32), (1, 4, 1))
    boxes[0, 2] = [0.25, 0.75, 0.5, 0.5]
    out = postprocess(logits, boxes, np.array([[200, 100]]), num_top=3)
    np.testing.assert_allclose(out["scores"][0, :2], 1 / (1 + np.exp([-3.0, -1.0])), rtol=1e-6)
    np.testing.assert_array_equal(out["labels"][0, :2], [5, 7])
    np.testing.assert_array_equal(out["queries"][0, :2], [2, 0])
    # (cx, cy, w, h) = (0.25, 0.75, 0.5, 0.5) of a 100 wide, 200 high image
    np.testing.assert_allclose(out["boxes_xyxy"][0, 0], [0, 100, 50, 200], atol=1e-4)
    np.testing.assert_allclose(out["boxes_xyxy"][0, 1], [40, 60, 60, 140], atol=1e-4)


def test_bad_shapes_are_refused():
    logits = np.zeros((1, 4, 8), np.float32)
    boxes = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="num_top"):
        postprocess(logits, boxes, np.ones((1, 2)), num_top=33)
    with pytest.raises(ValueError, match="orig_size"):
        postprocess(logits, boxes, np.ones((2, 2)), num_top=3)
    with pytest.raises(ValueError, match="pred_boxes"):
        postprocess(logits, boxes[:, :3], np.ones((1, 2)), num_top=3)


def greedy_nms_reference(boxes, labels, threshold):
    """Plain greedy class-wise NMS over score-sorted detections (torchvision's rule)."""
    keep = []
    for i, box in enumerate(boxes):
        def iou(other):
            w = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
            h = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
            union = ((box[2] - box[0]) * (box[3] - box[1])
                     + (other[2] - other[0]) * (other[3] - other[1]) - w * h)
            return w * h / union if union > 0 else 0.0
        if not any(labels[j] == labels[i] and iou(boxes[j]) > threshold for j in keep):
            keep.append(i)
    return np.isin(np.arange(len(boxes)), keep)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_keep_equals_greedy_reference(threshold):
    rng = np.random.default_rng(1)
    centres = rng.uniform(20, 80, (60, 2))
    sizes = rng.uniform(5, 30, (60, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    labels = rng.integers(1, 4, 60).astype(np.int32)
    boxes[7], labels[7] = boxes[6], labels[6]  # an exact duplicate
    boxes[9] = [50, 50, 50, 60]  # empty: IoU 0 with everything, never suppressed
    keep = np.asarray(nms_keep(boxes, labels, threshold))
    expected = greedy_nms_reference(boxes, labels, threshold)
    np.testing.assert_array_equal(keep, expected)
    assert 0 < keep.sum() < 60 and keep[9] and not keep[7]


def test_postprocess_with_nms_zeroes_and_moves_suppressed_detections_last():
    logits = np.full((1, 4, 3), -10.0, np.float32)
    logits[0, 0, 1], logits[0, 1, 1], logits[0, 2, 2], logits[0, 3, 1] = 3.0, 2.0, 1.0, 0.5
    boxes = np.array([[[0.5, 0.5, 0.4, 0.4],  # query 0, class 1: best
                       [0.52, 0.5, 0.4, 0.4],  # query 1, class 1: a duplicate of query 0
                       [0.5, 0.5, 0.4, 0.4],  # query 2, class 2: same place, other class
                       [0.2, 0.2, 0.1, 0.1]]], np.float32)  # query 3, class 1: elsewhere
    plain = postprocess(logits, boxes, np.array([[100, 100]]), num_top=5)
    np.testing.assert_array_equal(plain["queries"][0, :4], [0, 1, 2, 3])
    out = postprocess(logits, boxes, np.array([[100, 100]]), num_top=5, nms_iou=0.5)
    np.testing.assert_array_equal(out["queries"][0, :3], [0, 2, 3])
    np.testing.assert_allclose(out["scores"][0, :3], np.asarray(plain["scores"])[0, [0, 2, 3]])
    assert out["scores"][0, 3] == plain["scores"][0, 4] > 0  # the fifth, kept, moves up
    assert out["queries"][0, 4] == 1 and out["scores"][0, 4] == 0.0  # suppressed: last, 0
    np.testing.assert_allclose(out["boxes_xyxy"][0, 4], plain["boxes_xyxy"][0, 1])
    with pytest.raises(ValueError, match="nms_iou"):
        postprocess(logits, boxes, np.array([[100, 100]]), num_top=5, nms_iou=1.0)
