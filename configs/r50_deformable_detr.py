"""The authors' configs/r50_deformable_detr.sh: multi-scale Deformable DETR (R50, 4 levels): 44.5 AP published.

    python train.py --config configs/r50_deformable_detr.py --workdir runs/r50_deformable_detr
"""

from ddetr_jax.config.defaults import base_config


def get_config():
    c = base_config()
    return c
