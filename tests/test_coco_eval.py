"""COCO evaluation: equal to pycocotools run directly on the same JSONs; padding, duplicates
and several processes handled."""

import json
import threading

import jax
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr_jax.data.synthetic import write_split
from ddetr_jax.evaluation.coco import (METRICS, CocoAccumulator, evaluate_detections,
                                       first_occurrences, format_metrics, gather_rows,
                                       to_coco_results)

K = 6  # detections per image


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    coco = write_split(out, "validation", 12, seed=3)
    return out / "annotations" / "instances_validation.json", coco


def hand_made_predictions(coco, seed=0):
    """(N,) ids, (N, K) scores and labels, (N, K, 4) xyxy: jittered true boxes (some with the
    wrong class), plus random false positives, for every image."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in coco["categories"]]
    ids = np.array([im["id"] for im in coco["images"]])
    scores = rng.uniform(0.05, 1.0, (len(ids), K))
    labels = rng.choice(cat_ids, (len(ids), K))
    boxes = np.zeros((len(ids), K, 4))
    for row, image in enumerate(coco["images"]):
        w, h = image["width"], image["height"]
        xy = rng.uniform(0, [w, h, w, h], (K, 4))
        boxes[row] = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]),
                                     np.maximum(xy[:, :2], xy[:, 2:])], 1)
        truths = [a for a in coco["annotations"] if a["image_id"] == image["id"]][:K - 1]
        for slot, a in enumerate(truths):
            x, y, bw, bh = a["bbox"]
            boxes[row, slot] = np.array([x, y, x + bw, y + bh]) + rng.normal(0, 2, 4)
            if rng.uniform() < 0.8:
                labels[row, slot] = a["category_id"]
    return ids, scores.astype(np.float32), labels.astype(np.int32), boxes.astype(np.float32)


def pycocotools_stats(gt_path, results_path):
    """pycocotools directly: stats (12,) and per-class AP (sorted category ids)."""
    gt = COCO(str(gt_path))
    coco_eval = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K) area all, 100 dets
    per_class = [p[p > -1].mean() if (p > -1).any() else -1.0
                 for p in np.moveaxis(precision, 2, 0)]
    return coco_eval.stats, np.array(per_class)


def padded_batches(ids, scores, labels, boxes, batch_size, rng):
    """Batches with padding rows first (a real image id with junk boxes, example_valid
    False), and every image's row once more in a later batch (multi-device padding)."""
    order = np.concatenate([np.arange(len(ids)), rng.permutation(len(ids))[:5]])
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        pad = batch_size - len(rows) + 1
        batch = (np.concatenate([np.full(pad, ids[0]), ids[rows]]),
                 np.concatenate([np.ones((pad, K), np.float32), scores[rows]]),
                 np.concatenate([np.full((pad, K), labels[0, 0]), labels[rows]]),
                 np.concatenate([np.zeros((pad, K, 4), np.float32), boxes[rows]]),
                 np.arange(batch_size + 1) >= pad)
        batches.append(batch)
    return batches


def test_accumulator_equals_pycocotools_on_the_same_jsons(ground_truth, tmp_path):
    gt_path, coco = ground_truth
    ids, scores, labels, boxes = hand_made_predictions(coco)
    accumulator = CocoAccumulator(str(gt_path))
    for batch in padded_batches(ids, scores, labels, boxes, 4, np.random.default_rng(1)):
        accumulator.add(*batch)
    metrics = accumulator.evaluate(results_path=tmp_path / "results.json")

    direct = tmp_path / "direct.json"
    direct.write_text(json.dumps(to_coco_results(ids, scores, labels, boxes)))
    expected, expected_per_class = pycocotools_stats(gt_path, direct)
    assert 0.05 < metrics["AP"] < 0.95  # neither trivial nor empty
    np.testing.assert_array_equal([metrics[m] for m in METRICS], expected[:9])
    per_class = [c["AP"] for c in metrics["per_class"]]
    np.testing.assert_allclose(per_class, expected_per_class, rtol=1e-12)
    written, _ = pycocotools_stats(gt_path, tmp_path / "results.json")
    np.testing.assert_array_equal(written, expected)
    assert metrics["num_images"] == len(ids)

    assert [c["category_id"] for c in metrics["per_class"]] == sorted(
        c["id"] for c in coco["categories"])
    assert metrics["per_class"][0]["name"] == "ellipse"
    np.testing.assert_allclose(np.mean([ap for ap in per_class if ap > -1]), metrics["AP"])
    assert "ellipse" in format_metrics(metrics)


def test_padding_and_duplicates_change_nothing(ground_truth):
    gt_path, coco = ground_truth
    ids, scores, labels, boxes = hand_made_predictions(coco, seed=4)
    plain = evaluate_detections(str(gt_path), to_coco_results(ids, scores, labels, boxes))
    accumulator = CocoAccumulator(coco)
    for batch in padded_batches(ids, scores, labels, boxes, 5, np.random.default_rng(2)):
        accumulator.add(*batch)
    rows = accumulator.gather()
    np.testing.assert_array_equal(np.sort(rows["image_ids"]), np.sort(ids))
    metrics = accumulator.evaluate()
    assert {m: metrics[m] for m in METRICS} == {m: plain[m] for m in METRICS}
    assert metrics["per_class"] == plain["per_class"]


def test_perfect_and_empty_predictions(ground_truth):
    gt_path, coco = ground_truth
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in coco["annotations"] if not a["iscrowd"]]
    metrics = evaluate_detections(str(gt_path), perfect)
    assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0
    assert all(c["AP"] == 1.0 for c in metrics["per_class"])
    empty = evaluate_detections(str(gt_path), [])
    assert empty["AP"] == 0.0 and empty["AR100"] == 0.0
    undefined = dict(empty, APl=-1.0)
    table = format_metrics(undefined).splitlines()
    assert table[1].split() == ["0.0"] * 5 + ["-"] + ["0.0"] * 3


def test_suppressed_detections_are_not_results(ground_truth):
    """Score 0 marks a detection NMS suppressed (postprocess): it is left out."""
    gt_path, coco = ground_truth
    ids, scores, labels, boxes = hand_made_predictions(coco, seed=5)
    suppressed = scores.copy()
    suppressed[:, 1::2] = 0.0
    results = to_coco_results(ids, suppressed, labels, boxes)
    assert len(results) == suppressed.size - suppressed.shape[0] * (K // 2)
    kept = to_coco_results(ids, scores[:, 0::2], labels[:, 0::2], boxes[:, 0::2])
    assert results == kept
    assert evaluate_detections(str(gt_path), results) == evaluate_detections(str(gt_path), kept)


def test_only_seen_images_are_evaluated(ground_truth):
    gt_path, coco = ground_truth
    ids, scores, labels, boxes = hand_made_predictions(coco, seed=5)
    accumulator = CocoAccumulator(str(gt_path))
    accumulator.add(ids[:4], scores[:4], labels[:4], boxes[:4], np.ones(4, bool))
    metrics = accumulator.evaluate()
    subset = evaluate_detections(str(gt_path), to_coco_results(ids[:4], scores[:4], labels[:4],
                                                               boxes[:4]), image_ids=ids[:4])
    assert metrics["AP"] == subset["AP"] and metrics["num_images"] == 4


class ThreadAllgather:
    """process_allgather for `size` simulated processes, one thread each."""

    def __init__(self, size):
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size

    def for_process(self, index):
        def allgather(tree):
            self.slots[index] = tree
            self.barrier.wait()
            out = jax.tree.map(lambda *xs: np.stack(xs), *self.slots)
            self.barrier.wait()
            return out
        return allgather


def test_two_processes_gather_and_agree(ground_truth):
    gt_path, coco = ground_truth
    ids, scores, labels, boxes = hand_made_predictions(coco, seed=6)
    single = evaluate_detections(str(gt_path), to_coco_results(ids, scores, labels, boxes))
    # process 0 holds images 0..6 and a copy of 7; process 1 holds 7..11 and padding
    shares = [np.arange(0, 8), np.arange(7, 12)]
    collectives = ThreadAllgather(2)
    results = [None, None]

    def run(p):
        acc = CocoAccumulator(coco, allgather=collectives.for_process(p), process_index=p)
        rows = shares[p]
        valid = np.ones(len(rows), bool)
        if p == 1:
            rows, valid = np.append(rows, 0), np.append(valid, False)
        acc.add(ids[rows], scores[rows], labels[rows], boxes[rows], valid)
        results[p] = acc.evaluate()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1]
    assert {m: results[0][m] for m in METRICS} == {m: single[m] for m in METRICS}
    assert results[0]["num_images"] == len(ids)


def test_gather_rows_and_first_occurrences():
    collectives = ThreadAllgather(3)
    local = [np.arange(n) + 10 * p for p, n in enumerate((2, 0, 3))]
    out = [None] * 3

    def run(p):
        out[p] = gather_rows({"x": local[p]}, collectives.for_process(p))["x"]

    threads = [threading.Thread(target=run, args=(p,)) for p in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rows in out:
        np.testing.assert_array_equal(rows, [0, 1, 20, 21, 22])
    np.testing.assert_array_equal(first_occurrences([5, 3, 5, 9, 3]), [0, 1, 3])


def test_bad_input_is_refused(ground_truth, tmp_path):
    gt_path, coco = ground_truth
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoAccumulator(str(tmp_path / "missing.json"))
    accumulator = CocoAccumulator(coco)
    with pytest.raises(ValueError, match="no batch"):
        accumulator.evaluate()
    with pytest.raises(ValueError, match="boxes_xyxy"):
        accumulator.add([1], np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2, 3)), [True])
    with pytest.raises(ValueError, match="example_valid"):
        accumulator.add([1], np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2, 4)), [True, True])
    accumulator.add([1], np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2, 4)), [False])
    with pytest.raises(ValueError, match="padding"):
        accumulator.evaluate()
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(coco, [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1],
                                    "score": 1.0}])
