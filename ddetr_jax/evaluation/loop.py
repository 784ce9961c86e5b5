"""Evaluating a model on a dataset split, data-parallel: shared by train.py and evaluate.py.

    predict = make_predict_fn(graphdef, mesh, fixed=(rest,))
    metrics = evaluate_model(predict, (params,), batches, ground_truth_from_source(source), mesh)

The forward pass and post-processing run under jit + shard_map over the
('data',) mesh (each device its slice of the global batch, parameters
replicated); each process adds its own examples to a CocoAccumulator, which
gathers every process's detections and evaluates once.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddetr_jax.evaluation.coco import CocoAccumulator
from ddetr_jax.postprocess import NUM_TOP, postprocess
from ddetr_jax.sharding import ReadBehind, local_rows

EVAL_KEYS = ("images", "pad_mask", "orig_size")


def ground_truth_from_source(source) -> dict:
    """A COCO-format dict (images, annotations, categories) of every example of
    a DetectionSource, for COCO evaluation without the original JSON.

    Boxes are [x, y, w, h] in original pixels, area and iscrowd as stored.
    """
    images, annotations = [], []
    for index in range(len(source)):
        element = source[index]
        height, width = (int(v) for v in element["orig_size"])
        images.append({"id": int(element["image_id"]), "height": height, "width": width})
        for box, label, crowd, area in zip(element["boxes_xyxy"], element["labels"],
                                           element["is_crowd"], element["area"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": int(element["image_id"]),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area),
                                "iscrowd": int(crowd), "category_id": int(label)})
    return {"images": images, "annotations": annotations,
            "categories": [dict(c) for c in source.categories]}


def make_predict_fn(graphdef, mesh: Mesh, num_top: int = NUM_TOP, fixed: tuple = (),
                    nms_iou: float = 0.0):
    """jit(shard_map) of forward + postprocess.

    predict(states, batch) -> {'scores', 'labels', 'boxes_xyxy', 'queries'} of
    shape (B, num_top[, 4]), sharded over 'data' like the batch. states: a
    tuple of nnx.States, replicated global arrays (e.g. (params,)); fixed: the
    States that complete the model with graphdef after them, closed over as
    constants (e.g. the RNG and frozen terms, (rest,) from sharding.split_model);
    nms_iou: > 0 adds class-wise NMS (postprocess.postprocess);
    batch: EVAL_KEYS arrays, the global batch sharded over 'data'.
    """
    def per_device(states, batch):
        model = nnx.merge(graphdef, *states, *fixed)
        out = model(batch["images"], batch["pad_mask"], deterministic=True)
        return postprocess(out["pred_logits"], out["pred_boxes"], batch["orig_size"], num_top,
                           nms_iou)

    batch_spec = {k: P("data") for k in EVAL_KEYS}
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), batch_spec),
                                 out_specs=P("data")))


def evaluate_model(predict, states, batches, ground_truth, mesh: Mesh, *,
                   results_path=None, on_batch=None) -> dict:
    """COCO metrics of the model over `batches` (this process's eval batches).

    Collective: every process calls it with its own batches (eval_dataset
    gives every process the same number). on_batch(batch, detections) is
    called with this process's numpy batch and detections (e.g. to draw
    them). Returns CocoAccumulator.evaluate's dict plus 'eval_seconds'.
    """
    start = time.perf_counter()
    accumulator = CocoAccumulator(ground_truth)
    sharding = NamedSharding(mesh, P("data"))

    def add(batch, predicted):
        detections = {k: local_rows(v) for k, v in predicted.items()}
        accumulator.add(batch["image_id"], detections["scores"], detections["labels"],
                        detections["boxes_xyxy"], batch["example_valid"])
        if on_batch is not None:
            on_batch(batch, detections)

    # Batch i's detections are read after batch i+1 is loaded and queued, so the
    # host's loading and accumulating overlap the device's forward pass.
    unread = ReadBehind(add)
    for batch in batches:
        inputs = {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
                  for k in EVAL_KEYS}
        unread.hold(batch, predict(states, inputs))
    unread.read()
    metrics = accumulator.evaluate(results_path=results_path)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics
