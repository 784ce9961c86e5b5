"""The authors' configs/r50_deformable_detr_single_scale.sh: single-scale Deformable DETR (R50, C5 only): 39.4 AP published.

    python train.py --config configs/r50_deformable_detr_single_scale.py --workdir runs/r50_deformable_detr_single_scale
"""

from ddetr_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.num_feature_levels = 1
    return c
