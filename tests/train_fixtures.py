"""Small models and batches shared by the training tests."""

import numpy as np
from flax import nnx

from ddetr_jax.models import DeformableDETR, ModelConfig

TINY = dict(backbone_depth=18, dim=64, ffn_dim=128, heads=4, enc_layers=1, dec_layers=2,
            num_queries=12, num_classes=8, dropout=0.0)


def tiny_model(**overrides):
    return DeformableDETR(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(0))


def random_batch(seed=0, batch=8, size=64, max_targets=6,
                 counts=(3, 0, 1, 6, 2, 4, 1, 2), num_classes=8):
    """A batch in the pipeline's format; image 1 has no targets, image 3 is full."""
    rng = np.random.default_rng(seed)
    counts = np.resize(np.asarray(counts), batch)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    pad_mask = np.zeros((batch, size, size), bool)
    pad_mask[1::2, size * 3 // 4:, :] = True
    pad_mask[2::3, :, size // 2:] = True
    images[pad_mask] = 0
    centres = rng.uniform(0.25, 0.75, (batch, max_targets, 2))
    sizes = rng.uniform(0.1, 0.4, (batch, max_targets, 2))
    valid = np.arange(max_targets)[None] < counts[:, None]
    return {
        "images": images, "pad_mask": pad_mask,
        "boxes_cxcywh": np.concatenate([centres, sizes], -1).astype(np.float32),
        "labels": rng.integers(1, num_classes, (batch, max_targets)).astype(np.int32),
        "target_valid": valid,
    }
