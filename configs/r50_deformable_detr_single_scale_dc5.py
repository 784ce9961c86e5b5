"""The authors' configs/r50_deformable_detr_single_scale_dc5.sh: single-scale DC5 Deformable DETR (R50, dilated C5): 41.5 AP published.

    python train.py --config configs/r50_deformable_detr_single_scale_dc5.py --workdir runs/r50_deformable_detr_single_scale_dc5
"""

from ddetr_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.num_feature_levels = 1
    c.model.dilation = True
    return c
