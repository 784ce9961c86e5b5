"""The authors' configs/r50_deformable_detr.sh: multi-scale Deformable DETR (R50, 4 levels): 44.5 AP published.

    python train.py --config configs/r50_deformable_detr.py --workdir runs/r50_deformable_detr

COCO 2017 from TFDS (prepare it first, README: Data), global batch 32, 50
epochs, lr drop at epoch 40, the published optimizer and losses
(ddetr_jax/train/defaults.py). Set --config.backbone_weights to an
ImageNet ResNet-50 (torchvision .pth) as the authors do.
"""

from ddetr_jax.train.defaults import base_config


def get_config():
    c = base_config()
    return c
