"""The published recipe as an ml_collections ConfigDict: the base of configs/*.py.

The authors' main.py defaults and configs/r50_deformable_detr.sh: global
batch 32 (2 images on each of 16 GPUs), 50 epochs, lr drop at epoch 40,
AdamW 2e-4 / backbone 2e-5 / sampling offsets and reference points x0.1,
weight decay 1e-4, clipping 0.1, losses 2 / 5 / 2, COCO 2017 from TFDS
(prepare it first, README: Data). Set --config.backbone_weights to an ImageNet
ResNet-50 (torchvision .pth) as the authors do.
The model, optimizer and loss sections are the fields of ModelConfig,
OptimizerConfig, LossConfig and MatchWeights with their defaults (written
once, in those dataclasses), so every field is settable as --config.SECTION.FIELD.
"""

import dataclasses

import ml_collections

from ddetr_jax.data.buckets import PUBLISHED_BUCKETS, PUBLISHED_EVAL_BUCKETS
from ddetr_jax.data.transforms import TransformConfig
from ddetr_jax.losses import LossConfig
from ddetr_jax.matcher import MatchWeights
from ddetr_jax.models import ModelConfig
from ddetr_jax.optimizer import OptimizerConfig

# Fields a config does not set: resolved from the epochs (optimizer), a training-step
# setting (loss), or a section of its own (the matcher's fields sit beside the loss's).
NOT_IN_CONFIG = {OptimizerConfig: ("lr_drop_step", "total_steps"),
                 LossConfig: ("matcher", "nonfinite_costs")}

def base_config() -> ml_collections.ConfigDict:
    t = TransformConfig()
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.global_batch_size = 32
    c.eval_batch_size = 0  # 0: the global batch size
    c.num_epochs = 50
    c.lr_drop_epochs = 40
    c.total_steps = 0  # > 0 overrides num_epochs
    c.lr_drop_step = 0  # > 0 overrides lr_drop_epochs
    c.log_every_steps = 50
    c.eval_every_steps = -1  # -1: every epoch; 0: only at the end
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3  # the latest k, plus the best by eval/AP
    c.max_consecutive_nonfinite = 20
    c.compute_dtype = "float32"  # or "bfloat16" (float32 parameters)
    c.remat = "auto"  # recompute in each transformer layer's backward: "none", "dots", "full";
    # "auto": "dots" on a CPU (faster there), "none" on a GPU / TPU
    c.eval_nms_iou = 0.0  # > 0: class-wise NMS at this IoU in evaluation (0: published, none)
    c.backbone_weights = ""  # ImageNet ResNet (torchvision state dict) to start from

    c.data = ml_collections.ConfigDict()
    c.data.name = "coco/2017"  # a TFDS dataset under data_dir (see README: Data)
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # empty: no synthetic data; else {name, train_images, val_images, seed}: the synthetic
    # dataset made when data.name is that name (see quickstart.py, data/catalog.py)
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.buckets = PUBLISHED_BUCKETS
    c.data.eval_buckets = PUBLISHED_EVAL_BUCKETS  # empty: the training buckets
    c.data.max_targets = 100
    c.data.scales = t.scales
    c.data.max_size = t.max_size
    c.data.crop_resize_scales = t.crop_resize_scales
    c.data.crop_size = t.crop_size
    c.data.val_scale = t.val_scale
    c.data.flip_prob = t.flip_prob
    c.data.resize_only_prob = t.resize_only_prob  # else resize-crop-resize
    c.data.num_workers = 4
    c.data.num_threads = 8
    c.data.prefetch = 2

    c.model = ml_collections.ConfigDict(config_fields(ModelConfig))
    c.optimizer = ml_collections.ConfigDict(config_fields(OptimizerConfig))
    c.loss = ml_collections.ConfigDict({**config_fields(LossConfig),
                                        **config_fields(MatchWeights)})
    return c


def config_fields(cls) -> dict:
    """{field: default} of a config dataclass, less NOT_IN_CONFIG."""
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)
            if f.name not in NOT_IN_CONFIG.get(cls, ())}
