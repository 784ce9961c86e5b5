"""The authors' configs/r50_deformable_detr_single_scale.sh: single-scale Deformable DETR (R50, C5 only): 39.4 AP published.

    python train.py --config configs/r50_deformable_detr_single_scale.py --workdir runs/r50_deformable_detr_single_scale

COCO 2017 from TFDS (prepare it first, README: Data), global batch 32, 50
epochs, lr drop at epoch 40, the published optimizer and losses
(ddetr_jax/train/defaults.py). Set --config.backbone_weights to an
ImageNet ResNet-50 (torchvision .pth) as the authors do.
"""

from ddetr_jax.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.num_feature_levels = 1
    return c
