"""The authors' configs/r50_deformable_detr_plus_iterative_bbox_refinement.sh: multi-scale Deformable DETR + iterative box refinement: 46.2 AP published.

    python train.py --config configs/r50_deformable_detr_plus_iterative_bbox_refinement.py --workdir runs/r50_deformable_detr_plus_iterative_bbox_refinement
"""

from ddetr_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.with_box_refine = True
    return c
