"""The authors' configs/r50_deformable_detr_plus_iterative_bbox_refinement.sh: multi-scale Deformable DETR + iterative box refinement: 46.2 AP published.

    python train.py --config configs/r50_deformable_detr_plus_iterative_bbox_refinement.py --workdir runs/r50_deformable_detr_plus_iterative_bbox_refinement

COCO 2017 from TFDS (prepare it first, README: Data), global batch 32, 50
epochs, lr drop at epoch 40, the published optimizer and losses
(ddetr_jax/train/defaults.py). Set --config.backbone_weights to an
ImageNet ResNet-50 (torchvision .pth) as the authors do.
"""

from ddetr_jax.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.with_box_refine = True
    return c
