"""The authors' configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh: multi-scale Deformable DETR + iterative box refinement ++ two-stage: 46.9 AP published.

    python train.py --config configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.py --workdir runs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage

COCO 2017 from TFDS (prepare it first, README: Data), global batch 32, 50
epochs, lr drop at epoch 40, the published optimizer and losses
(ddetr_jax/train/defaults.py). Set --config.backbone_weights to an
ImageNet ResNet-50 (torchvision .pth) as the authors do.
"""

from ddetr_jax.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.with_box_refine = True
    c.model.two_stage = True
    return c
