"""Evaluating a checkpoint on a dataset split: the library behind evaluate.py.

    metrics = evaluate_checkpoint(config, "runs/quickstart", "eval/quickstart")

A training workdir brings its config (config_for_checkpoint): config None
evaluates with it, and a config that contradicts its data section is refused.
Writes OUTPUT/metrics.json ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
"AR10", "AR100", "per_class", plus "num_images", "checkpoint", "step",
"dataset" (the name), "dataset_dir" (the version folder read), "split"),
OUTPUT/results.json (COCO results format) and, if asked,
OUTPUT/images/<image_id>.png with the detections drawn.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddetr_jax.checkpoints.loading import load_for_config, split_workdir_path
from ddetr_jax.config import run_config
from ddetr_jax.config import settings as settings_lib
from ddetr_jax.data import pipeline
from ddetr_jax.data.catalog import open_split
from ddetr_jax.drawing import drawn_batch_image
from ddetr_jax.evaluation.coco import METRICS, format_metrics
from ddetr_jax.evaluation.loop import evaluate_model, ground_truth_from_source, make_predict_fn
from ddetr_jax.postprocess import num_top_for
from ddetr_jax.sharding import data_mesh, split_model


def config_for_checkpoint(config, checkpoint):
    """The config to evaluate `checkpoint` with.

    A training workdir (or one of its checkpoints/STEP folders) brings its own,
    WORKDIR/config.json: returned when `config` is None; a `config` whose data
    section contradicts it (another dataset, split, synthetic parameters,
    resize...; not data_dir or loading fields) raises ConfigMismatch listing each
    field. Its model section is checked against the checkpoint by
    checkpoints.loading.load_for_config.
    """
    found = split_workdir_path(checkpoint)
    if found is None:
        if config is None:
            raise ValueError(f"checkpoint {checkpoint} is not a training workdir, which "
                             "would bring its config: give --config (model and dataset)")
        return config
    saved = run_config.load(found[0])
    if config is None:
        return saved
    diffs = run_config.data_differences(config, saved)
    if diffs:
        raise run_config.ConfigMismatch(
            f"the config contradicts the data of the run it evaluates "
            f"({found[0] / 'config.json'}):\n  " + "\n  ".join(diffs) +
            "\nLeave out --config to evaluate with the run's own config, or pass its values.")
    return config


def evaluate_checkpoint(config, checkpoint, output, *, split: str | None = None,
                        which: str = "latest", num_draw: int = 0,
                        score_threshold: float = 0.5) -> dict:
    """COCO metrics of `checkpoint` on `split` (default config.data.eval_split) of
    the config's dataset (config None: a training workdir's own, see
    config_for_checkpoint); writes OUTPUT (see the module doc). Returns the metrics."""
    config = config_for_checkpoint(config, checkpoint)
    expected = settings_lib.model_config(config)
    data = settings_lib.data_settings(config)
    _, eval_batch = settings_lib.batch_configs(config, jax.process_count())
    mesh = data_mesh()
    settings_lib.check_devices(eval_batch.global_batch_size, mesh.size, "eval_batch_size")
    model, step = load_for_config(checkpoint, expected, which)
    source = open_split(data.data_dir, data.name, split or data.eval_split, data.synthetic)
    graphdef, params, rest = split_model(model)
    params = jax.device_put(jax.tree.map(np.asarray, params), NamedSharding(mesh, P()))
    predict = make_predict_fn(graphdef, mesh, fixed=(rest,),
                              num_top=num_top_for(expected.num_queries, expected.num_classes),
                              nms_iou=settings_lib.eval_nms_iou(config))
    output = pathlib.Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in source.categories}
    drawn = []

    def draw(batch, detections):
        for row in range(len(batch["image_id"])):
            if len(drawn) < num_draw and batch["example_valid"][row]:
                image = drawn_batch_image(batch, row, detections, names, score_threshold)
                path = output / "images" / f"{int(batch['image_id'][row])}.png"
                path.parent.mkdir(exist_ok=True)
                image.save(path)
                drawn.append(path)

    batches = pipeline.eval_dataset(source, eval_batch, process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    num_threads=data.num_threads, prefetch=data.prefetch)
    metrics = evaluate_model(predict, (params,), batches, ground_truth_from_source(source), mesh,
                             results_path=output / "results.json",
                             on_batch=draw if num_draw > 0 and jax.process_index() == 0
                             else None)
    record = {k: metrics[k] for k in METRICS}
    record.update(per_class=metrics["per_class"], num_images=metrics["num_images"],
                  checkpoint=str(checkpoint), step=step, dataset=data.name,
                  dataset_dir=source.dataset_dir, split=source.split)
    if jax.process_index() == 0:
        (output / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        print(format_metrics(metrics), flush=True)
    return record
