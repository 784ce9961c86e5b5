"""Sine position encodings (no parameters).

Mirrors the authors' models/position_encoding.py: PositionEmbeddingSine with
normalize=True and the Deformable-DETR-specific -0.5 offset, and
DeformableTransformer.get_proposal_pos_embed for two-stage queries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _frequencies(num_features: int, temperature: float):
    """(num_features,) temperature ** (2 * floor(i / 2) / num_features)."""
    i = jnp.arange(num_features, dtype=jnp.float32)
    return temperature ** (2 * jnp.floor(i / 2) / num_features)


def _interleave_sin_cos(angles):
    """angles: (..., F) -> (..., F) with sin at even and cos at odd features."""
    stacked = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
    return stacked.reshape(angles.shape)  # (..., F/2, 2) -> (..., F)


def sine_position_embedding(pad_mask, num_features: int = 128, temperature: float = 10000.0):
    """pad_mask: (B, H, W) bool, True on padding -> (B, H, W, 2 * num_features).

    Features are (y encodings, x encodings); coordinates are
    (cumsum of valid pixels - 0.5) / (valid extent + 1e-6) * 2 pi.
    """
    valid = (~pad_mask).astype(jnp.float32)
    y = jnp.cumsum(valid, axis=1)
    x = jnp.cumsum(valid, axis=2)
    scale = 2 * math.pi
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * scale
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * scale
    freqs = _frequencies(num_features, temperature)
    pos_y = _interleave_sin_cos(y[..., None] / freqs)  # (B, H, W, F)
    pos_x = _interleave_sin_cos(x[..., None] / freqs)
    return jnp.concatenate([pos_y, pos_x], axis=-1)


def box_sine_embedding(boxes_logit, num_features: int = 128, temperature: float = 10000.0):
    """boxes_logit: (B, Q, 4) inverse-sigmoid boxes -> (B, Q, 4 * num_features).

    sigmoid(box) * 2 pi per coordinate, each encoded with interleaved sin/cos.
    """
    boxes = jax.nn.sigmoid(boxes_logit.astype(jnp.float32)) * (2 * math.pi)
    angles = boxes[..., None] / _frequencies(num_features, temperature)  # (B, Q, 4, F)
    pos = _interleave_sin_cos(angles)
    return pos.reshape(*boxes.shape[:-1], 4 * num_features)

