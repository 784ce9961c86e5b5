"""Attention modules: multi-scale deformable attention and standard multi-head attention.

MSDeformAttn mirrors the authors' models/ops/modules/ms_deform_attn.py
(projections, the published initialisation, 2-d and 4-d reference rules).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddetr_jax.models import initializers
from ddetr_jax.models.dropout import Dropout
from ddetr_jax.ops import ms_deform_attn

xavier = initializers.xavier_uniform()
zeros = initializers.zeros


def linear(in_features: int, out_features: int, *, rngs, kernel_init=xavier, bias_init=zeros):
    """Linear layer with the transformer's default init: xavier_uniform weight, zero bias."""
    return nnx.Linear(in_features, out_features, kernel_init=kernel_init, bias_init=bias_init,
                      rngs=rngs)


def sampling_offset_bias(heads: int, levels: int, points: int) -> np.ndarray:
    """(heads * levels * points * 2,) fixed direction grid of the published init.

    theta_h = 2 pi h / heads; direction (cos, sin) / max(|cos|, |sin|),
    repeated over levels, times (point index + 1).
    """
    thetas = np.arange(heads, dtype=np.float32) * (2.0 * math.pi / heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)  # (heads, 2)
    grid = np.tile(grid[:, None, None, :], (1, levels, points, 1))  # (heads, levels, points, 2)
    grid = grid * (np.arange(points, dtype=np.float32) + 1)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable attention (one layer's sampling module)."""

    def __init__(self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4, *,
                 rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.levels, self.heads, self.points = levels, heads, points
        bias = jnp.asarray(sampling_offset_bias(heads, levels, points))
        self.sampling_offsets = linear(dim, heads * levels * points * 2, rngs=rngs,
                                       kernel_init=zeros, bias_init=lambda *_: bias)
        self.attention_weights = linear(dim, heads * levels * points, rngs=rngs,
                                        kernel_init=zeros)
        self.value_proj = linear(dim, dim, rngs=rngs)
        self.output_proj = linear(dim, dim, rngs=rngs)

    def sample(self, query, reference_points, value_input, spatial_shapes, pad_mask):
        """Returns the output and where and how much it looked.

        query: (B, Q, D); reference_points: (B, Q, L, 2) normalised (x, y) or
        (B, Q, L, 4) boxes (cx, cy, w, h); value_input: (B, S, D); spatial_shapes:
        static ((H_l, W_l), ...); pad_mask: (B, S) True on padding.
        -> output (B, Q, D), sampling_locations (B, Q, M, L, P, 2),
        attention_weights (B, Q, M, L, P).
        """
        b, q, _ = query.shape
        s = value_input.shape[1]
        m, lv, p = self.heads, self.levels, self.points
        value = self.value_proj(value_input)
        value = jnp.where(pad_mask[..., None], 0, value).reshape(b, s, m, -1)  # (B, S, M, D/M)
        offsets = self.sampling_offsets(query).reshape(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).reshape(b, q, m, lv * p)
        weights = jax.nn.softmax(weights, axis=-1).reshape(b, q, m, lv, p)
        ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2|4)
        offsets = offsets.astype(jnp.float32)
        if reference_points.shape[-1] == 2:
            normaliser = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)  # (L, 2)
            locations = ref + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        else:
            raise ValueError(
                f"reference_points: expected last dimension 2 or 4, got {reference_points.shape}")
        out = ms_deform_attn(value, spatial_shapes, locations, weights)  # (B, Q, D)
        return self.output_proj(out), locations, weights

    def __call__(self, query, reference_points, value_input, spatial_shapes, pad_mask):
        """See `sample`; returns only the output (B, Q, D)."""
        return self.sample(query, reference_points, value_input, spatial_shapes, pad_mask)[0]


class MultiHeadAttention(nnx.Module):
    """Standard multi-head attention (torch nn.MultiheadAttention, batch first).

    Separate q/k/v projections; the authors' fused in_proj_weight is split
    into them on conversion.
    """

    def __init__(self, dim: int = 256, heads: int = 8, dropout: float = 0.1, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = linear(dim, dim, rngs=rngs)
        self.k_proj = linear(dim, dim, rngs=rngs)
        self.v_proj = linear(dim, dim, rngs=rngs)
        self.out_proj = linear(dim, dim, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)

    def __call__(self, query, key, value, *, deterministic: bool):
        """query: (B, Q, D), key/value: (B, K, D) -> (B, Q, D)."""
        b, q, d = query.shape
        m = self.heads
        qh = self.q_proj(query).reshape(b, q, m, d // m)
        kh = self.k_proj(key).reshape(b, key.shape[1], m, d // m)
        vh = self.v_proj(value).reshape(b, value.shape[1], m, d // m)
        logits = jnp.einsum("bqmc,bkmc->bmqk", qh, kh) / math.sqrt(d // m)  # (B, M, Q, K)
        attn = self.dropout(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
        out = jnp.einsum("bmqk,bkmc->bqmc", attn, vh).reshape(b, q, d)  # (B, Q, D)
        return self.out_proj(out)
