"""A training config (ml_collections ConfigDict, configs/*.py) -> typed settings.

The ConfigDict is converted once, here, and everything below takes the typed
values: a misspelt or mistyped field fails at start-up with its name, not
deep inside a traced function. The fields of a config (see train/defaults.py
for the defaults and their meaning):

    seed, global_batch_size, num_epochs, lr_drop_epochs, total_steps,
    lr_drop_step, log_every_steps, eval_every_steps, checkpoint_every_steps,
    keep_checkpoints, max_consecutive_nonfinite, compute_dtype, remat, eval_batch_size,
    eval_nms_iou, backbone_weights
    data.{name, data_dir, train_split, eval_split, synthetic, buckets, eval_buckets,
          max_targets, scales, max_size, crop_resize_scales, crop_size,
          val_scale, flip_prob, resize_only_prob, num_workers, num_threads,
          prefetch}
    model.{every ModelConfig field}
    optimizer.{every OptimizerConfig field but lr_drop_step, total_steps}
    loss.{class_weight, bbox_weight, giou_weight, focal_alpha, focal_gamma,
          solver, class_cost, bbox_cost, giou_cost}
"""

from __future__ import annotations

import dataclasses
import functools

from ddetr_jax.data import buckets as buckets_lib
from ddetr_jax.data.buckets import BatchConfig
from ddetr_jax.data.synthetic import SYNTHETIC_FIELDS
from ddetr_jax.data.transforms import TransformConfig
from ddetr_jax.losses import LossConfig
from ddetr_jax.matcher import MatchWeights
from ddetr_jax.models import ModelConfig
from ddetr_jax.models.stack import check_remat
from ddetr_jax.optimizer import OptimizerConfig
from ddetr_jax.postprocess import check_nms_iou

COMPUTE_DTYPES = ("float32", "bfloat16")
MATCHER_FIELDS = {f.name for f in dataclasses.fields(MatchWeights)}


@dataclasses.dataclass(frozen=True)
class DataSettings:
    name: str
    data_dir: str
    train_split: str
    eval_split: str
    synthetic: dict | None  # {name, train_images, val_images, seed}: made when name == .name
    num_workers: int
    num_threads: int
    prefetch: int


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a training run needs, typed; steps resolved from epochs."""

    seed: int
    model: ModelConfig
    optimizer: OptimizerConfig  # lr_drop_step, total_steps resolved
    loss: LossConfig
    data: DataSettings
    train_batch: BatchConfig
    eval_batch: BatchConfig
    total_steps: int
    steps_per_epoch: int
    log_every_steps: int
    eval_every_steps: int  # 0: evaluate only at the end
    checkpoint_every_steps: int
    keep_checkpoints: int
    max_consecutive_nonfinite: int
    compute_dtype: str
    remat: str  # models/stack.py REMAT_POLICIES
    eval_nms_iou: float  # 0: the published post-processing; > 0: class-wise NMS
    backbone_weights: str  # "" or a torchvision ResNet state dict


def _fields(cls, values: dict, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"config.{where}: unknown fields {sorted(unknown)}; "
                         f"{cls.__name__} has {sorted(known)}")
    return values


def _at_least(minimum: int, name: str, value) -> int:
    if int(value) < minimum:
        raise ValueError(f"config.{name} must be >= {minimum}, got {value}")
    return int(value)


_positive = functools.partial(_at_least, 1)


def model_config(config) -> ModelConfig:
    return ModelConfig(**_fields(ModelConfig, dict(config.model), "model"))


def transform_config(data) -> TransformConfig:
    return TransformConfig(scales=tuple(data.scales), max_size=int(data.max_size),
                           crop_resize_scales=tuple(data.crop_resize_scales),
                           crop_size=tuple(data.crop_size), val_scale=int(data.val_scale),
                           flip_prob=float(data.flip_prob),
                           resize_only_prob=float(data.resize_only_prob))


def loss_config(loss) -> LossConfig:
    values = dict(loss)
    matcher = {k: values.pop(k) for k in list(values) if k in MATCHER_FIELDS}
    return LossConfig(matcher=MatchWeights(**matcher), **_fields(LossConfig, values, "loss"))


def batch_configs(config, process_count: int) -> tuple[BatchConfig, BatchConfig]:
    buckets = tuple(tuple(int(v) for v in b) for b in config.data.buckets)
    eval_buckets = tuple(tuple(int(v) for v in b)
                         for b in (config.data.get("eval_buckets") or config.data.buckets))
    transform = transform_config(config.data)
    batch = _positive("global_batch_size", config.global_batch_size)
    eval_batch = _positive("eval_batch_size", config.get("eval_batch_size") or batch)
    for name, value in (("global_batch_size", batch), ("eval_batch_size", eval_batch)):
        if value % process_count:
            raise ValueError(f"config.{name}={value} cannot be split evenly over "
                             f"{process_count} processes")
    max_targets = _positive("data.max_targets", config.data.max_targets)
    num_classes = _positive("model.num_classes", config.model.num_classes)
    return (BatchConfig(batch, buckets, max_targets, transform, num_classes),
            BatchConfig(eval_batch, eval_buckets, max_targets, transform, num_classes))


def synthetic_settings(data) -> dict | None:
    """config.data.synthetic checked: None (empty) or {name, train_images, val_images, seed}."""
    if not data.get("synthetic"):
        return None
    values = dict(data.synthetic)
    fields = ("name", *SYNTHETIC_FIELDS)
    if set(values) != set(fields):
        raise ValueError(f"config.data.synthetic: expected the fields {list(fields)} (name: the "
                         f"data.name under which it is made), got {sorted(values)}")
    return {"name": str(values["name"]), **{k: int(values[k]) for k in SYNTHETIC_FIELDS}}


def data_settings(config) -> DataSettings:
    d = config.data
    synthetic = synthetic_settings(d)
    return DataSettings(str(d.name), str(d.data_dir), str(d.train_split), str(d.eval_split),
                        synthetic, *(_at_least(0, f"data.{name}", d[name])
                                     for name in ("num_workers", "num_threads", "prefetch")))


def eval_nms_iou(config) -> float:
    """config.eval_nms_iou, checked: 0 (no NMS) or an IoU in (0, 1)."""
    return check_nms_iou(config.get("eval_nms_iou", 0.0), "config.eval_nms_iou")


def check_devices(batch_size: int, num_devices: int, name: str) -> None:
    if batch_size % num_devices:
        raise ValueError(f"config.{name}={batch_size} cannot be split evenly over "
                         f"{num_devices} devices; use a multiple of {num_devices}")


def resolve(config, num_train_examples: int, process_count: int = 1) -> Settings:
    """The typed settings of `config` for a training split of `num_train_examples`
    (its steps per epoch: buckets.steps_per_epoch). total_steps > 0 overrides
    num_epochs; lr_drop_step > 0 overrides lr_drop_epochs; with total_steps set and no lr_drop_step the
    drop comes at the same fraction of training (lr_drop_epochs / num_epochs)."""
    train_batch, eval_batch = batch_configs(config, process_count)
    steps_per_epoch = buckets_lib.steps_per_epoch(num_train_examples, train_batch)
    num_epochs = _positive("num_epochs", config.num_epochs)
    total = int(config.total_steps) if config.total_steps > 0 else num_epochs * steps_per_epoch
    if config.lr_drop_step > 0:
        lr_drop = int(config.lr_drop_step)
    elif config.total_steps > 0:
        lr_drop = int(round(total * config.lr_drop_epochs / num_epochs))
    else:
        lr_drop = int(config.lr_drop_epochs) * steps_per_epoch
    model = model_config(config)
    optimizer = OptimizerConfig(**_fields(OptimizerConfig, dict(config.optimizer), "optimizer"),
                                lr_drop_step=lr_drop, total_steps=total)
    if optimizer.freeze_stem != (model.backbone_norm == "frozen_batch_norm"):
        raise ValueError(
            f"config.optimizer.freeze_stem={optimizer.freeze_stem} contradicts "
            f"config.model.backbone_norm={model.backbone_norm!r}: the stem and layer1 are "
            "frozen exactly when the backbone uses frozen batch norm")
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype: expected one of {COMPUTE_DTYPES}, "
                         f"got {config.compute_dtype!r}")
    data = data_settings(config)
    return Settings(
        seed=int(config.seed), model=model, optimizer=optimizer,
        loss=loss_config(config.loss), data=data, train_batch=train_batch,
        eval_batch=eval_batch, total_steps=_positive("total_steps", total),
        steps_per_epoch=steps_per_epoch,
        log_every_steps=_positive("log_every_steps", config.log_every_steps),
        eval_every_steps=(int(config.eval_every_steps) if config.eval_every_steps >= 0
                          else steps_per_epoch),
        checkpoint_every_steps=_positive("checkpoint_every_steps",
                                         config.checkpoint_every_steps),
        keep_checkpoints=_positive("keep_checkpoints", config.keep_checkpoints),
        max_consecutive_nonfinite=_positive("max_consecutive_nonfinite",
                                            config.max_consecutive_nonfinite),
        compute_dtype=str(config.compute_dtype),
        remat=check_remat(str(config.get("remat", "auto"))),
        eval_nms_iou=eval_nms_iou(config),
        backbone_weights=str(config.get("backbone_weights", "")))
