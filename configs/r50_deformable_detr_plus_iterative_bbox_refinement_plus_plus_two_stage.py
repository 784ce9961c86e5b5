"""The authors' configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh: multi-scale Deformable DETR + iterative box refinement ++ two-stage: 46.9 AP published.

    python train.py --config configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.py --workdir runs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage
"""

from ddetr_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.with_box_refine = True
    c.model.two_stage = True
    return c
