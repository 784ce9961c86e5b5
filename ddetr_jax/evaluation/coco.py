"""COCO box evaluation (faster-coco-eval), across devices and processes.

Mirrors the authors' datasets/coco_eval.py (CocoEvaluator): detections are
collected per image, gathered from every process, and evaluated once with
COCOeval('bbox') restricted to the images that were seen.

The evaluator is faster-coco-eval's COCOeval_faster (C++ evaluateImg and
accumulate): on 2,000 images with 200,000 detections it gave the same stats
and per-class AP as pycocotools to the last bit, about 6x faster (3.5 s vs
21 s on 2 CPU cores); tests/test_coco_eval.py checks it against pycocotools.

    accumulator = CocoAccumulator("annotations/instances_validation.json")
    for batch in ...:                       # on every process
        out = postprocess(logits, boxes, orig_size)
        accumulator.add(image_ids, out["scores"], out["labels"], out["boxes_xyxy"],
                        example_valid)
    metrics = accumulator.evaluate(results_path="results.json")   # on every process
    print(format_metrics(metrics))

Metrics are fractions in [0, 1] as pycocotools reports them; -1 means
undefined (no ground truth of that kind), as in pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from faster_coco_eval import COCO, COCOeval_faster

# Names of pycocotools' COCOeval.stats[0:9], in order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def load_ground_truth(annotations) -> COCO:
    """A COCO ground truth from a JSON path, a COCO-format dict or a COCO object."""
    if isinstance(annotations, COCO):
        return annotations
    coco = COCO()
    if isinstance(annotations, (str, os.PathLike)):
        if not os.path.exists(annotations):
            raise FileNotFoundError(f"annotations: {annotations} does not exist")
        with open(annotations) as f:
            annotations = json.load(f)
    missing = {"images", "annotations", "categories"} - set(annotations)
    if missing:
        raise ValueError(f"annotations: not COCO format, missing {sorted(missing)}")
    coco.dataset = annotations
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_coco_results(image_ids, scores, labels, boxes_xyxy) -> list[dict]:
    """Detections -> COCO results entries.

    image_ids: (N,); scores, labels: (N, K); boxes_xyxy: (N, K, 4) pixels.
    Returns [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}], one
    per detection with a score above 0 (0: suppressed by NMS, see postprocess);
    the label is the category id.
    """
    image_ids = np.asarray(image_ids)
    n, k = np.shape(scores)
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(n * k, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)  # (N*K, 4)
    ids = np.repeat(image_ids, k).tolist()
    cats = np.asarray(labels).reshape(-1).tolist()
    confidences = np.asarray(scores, np.float64).reshape(-1).tolist()
    return [{"image_id": int(i), "category_id": int(c), "bbox": b, "score": s}
            for i, c, b, s in zip(ids, cats, xywh.tolist(), confidences) if s > 0]


def write_results(results: list[dict], path) -> None:
    """Writes COCO results entries as the JSON list pycocotools' loadRes reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f)


def evaluate_detections(ground_truth, results: list[dict], image_ids=None) -> dict:
    """COCOeval_faster('bbox') of `results` on `ground_truth` (a COCO or what load_ground_truth takes).

    image_ids: evaluate only these images (default: every ground-truth image).
    Returns {name: float for name in METRICS, 'per_class': [{'category_id',
    'name', 'AP'}]} with per-class AP over IoU 0.50:0.95, all areas, 100
    detections (-1 for a class without ground truth).
    """
    gt = load_ground_truth(ground_truth)
    known = set(gt.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if image_ids is not None:
        unknown |= set(int(i) for i in image_ids) - known
    if unknown:
        raise ValueError(f"image ids not in the ground truth: {sorted(unknown)[:10]}")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])
        coco_eval = COCOeval_faster(gt, dt, "bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {name: float(v) for name, v in zip(METRICS, coco_eval.stats)}
    precision = coco_eval.eval["precision"]  # (iou T, recall R, class K, area A, max dets M)
    per_class = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]  # area 'all', 100 detections
        p = p[p > -1]
        per_class.append({"category_id": int(cat_id), "name": gt.cats[cat_id]["name"],
                          "AP": float(p.mean()) if p.size else -1.0})
    metrics["per_class"] = per_class
    return metrics


def format_metrics(metrics: dict) -> str:
    """The metrics as a text table (headline numbers, then per class), in percent; '-' where
    undefined."""
    def percent(value):
        return f"{100 * value:6.1f}" if value >= 0 else f"{'-':>6}"

    lines = ["  ".join(f"{name:>6}" for name in METRICS),
             "  ".join(percent(metrics[name]) for name in METRICS), "",
             f"{'id':>4}  {'class':<24} {'AP':>6}"]
    for entry in metrics["per_class"]:
        lines.append(f"{entry['category_id']:>4}  {entry['name']:<24} {percent(entry['AP'])}")
    return "\n".join(lines)


def gather_rows(arrays: dict, allgather: Callable) -> dict:
    """Concatenates every process's rows, process 0 first.

    arrays: {name: (N_p, ...) numpy}, N_p rows on process p (may differ).
    allgather: a collective like multihost_utils.process_allgather: a pytree
    of same-shaped arrays -> the pytree stacked over processes (P, ...).
    """
    count = next(iter(arrays.values())).shape[0]
    counts = np.asarray(allgather(np.asarray(count, np.int64))).reshape(-1)  # (P,)
    most = int(counts.max())
    padded = {k: np.concatenate([v, np.zeros((most - count,) + v.shape[1:], v.dtype)])
              for k, v in arrays.items()}  # (max N_p, ...)
    stacked = allgather(padded)  # {name: (P, max N_p, ...)}
    return {k: np.concatenate([np.asarray(v)[p, :n] for p, n in enumerate(counts)])
            for k, v in stacked.items()}


def first_occurrences(image_ids) -> np.ndarray:
    """(N,) image ids -> sorted indices of the first row of every distinct id."""
    _, first = np.unique(np.asarray(image_ids), return_index=True)
    return np.sort(first)


class CocoAccumulator:
    """Collects per-batch detections on every process and evaluates them once.

    ground_truth: an annotations JSON path, a COCO-format dict or a COCO.
    allgather / process_index: the collectives (defaults: JAX's, across every
    process of the job); injectable to test the multi-process path.
    """

    def __init__(self, ground_truth, *, allgather: Callable = multihost_utils.process_allgather,
                 process_index: int | None = None):
        self.ground_truth = load_ground_truth(ground_truth)
        self.allgather = allgather
        self.process_index = jax.process_index() if process_index is None else process_index
        self._batches: list[dict] = []

    def add(self, image_ids, scores, labels, boxes_xyxy, example_valid) -> None:
        """One batch of this process's examples (numpy or addressable jax arrays).

        image_ids, example_valid: (B,); scores, labels: (B, K); boxes_xyxy:
        (B, K, 4) pixels of the original image. Rows with example_valid False
        (padding examples) are dropped.
        """
        batch = {"image_ids": np.asarray(image_ids, np.int64), "scores": np.asarray(scores),
                 "labels": np.asarray(labels), "boxes_xyxy": np.asarray(boxes_xyxy)}
        valid = np.asarray(example_valid, bool)
        b, k = batch["scores"].shape
        expected = {"image_ids": (b,), "labels": (b, k), "boxes_xyxy": (b, k, 4)}
        for name, shape in expected.items():
            if batch[name].shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {batch[name].shape}")
        if valid.shape != (b,):
            raise ValueError(f"example_valid: expected shape {(b,)}, got {valid.shape}")
        self._batches.append({name: v[valid] for name, v in batch.items()})

    def gather(self) -> dict:
        """Every process's valid rows, one row per image id (first occurrence kept).

        Collective: call on every process. Returns {'image_ids': (N,),
        'scores': (N, K), 'labels': (N, K), 'boxes_xyxy': (N, K, 4)}.
        """
        if not self._batches:
            raise ValueError("CocoAccumulator: no batch was added")
        local = {k: np.concatenate([b[k] for b in self._batches]) for k in self._batches[0]}
        rows = gather_rows(local, self.allgather)
        keep = first_occurrences(rows["image_ids"])
        return {k: v[keep] for k, v in rows.items()}

    def evaluate(self, results_path=None) -> dict:
        """Gathers, evaluates on process 0 and shares the metrics with every process.

        Collective: call on every process. results_path: where process 0 writes
        the COCO results JSON (optional). Returns the evaluate_detections dict
        (identical on every process) plus 'num_images'.
        """
        rows = self.gather()
        if rows["image_ids"].size == 0:
            raise ValueError("CocoAccumulator: every added example was padding (example_valid "
                             "False); nothing to evaluate")
        cat_ids = sorted(self.ground_truth.getCatIds())
        values = np.zeros(len(METRICS) + len(cat_ids), np.float64)
        if self.process_index == 0:
            results = to_coco_results(rows["image_ids"], rows["scores"], rows["labels"],
                                      rows["boxes_xyxy"])
            if results_path is not None:
                write_results(results, results_path)
            metrics = evaluate_detections(self.ground_truth, results, rows["image_ids"])
            values[:len(METRICS)] = [metrics[name] for name in METRICS]
            values[len(METRICS):] = [entry["AP"] for entry in metrics["per_class"]]
        values = np.asarray(self.allgather(values))[0]  # process 0's numbers, everywhere
        metrics = {name: float(v) for name, v in zip(METRICS, values)}
        metrics["per_class"] = [
            {"category_id": int(c), "name": self.ground_truth.cats[c]["name"], "AP": float(ap)}
            for c, ap in zip(cat_ids, values[len(METRICS):])]
        metrics["num_images"] = int(rows["image_ids"].shape[0])
        return metrics
