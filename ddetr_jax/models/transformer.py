"""Deformable encoder and decoder stacks, reference points, valid ratios, proposals.

Mirrors the authors' models/deformable_transformer.py (DeformableTransformer,
DeformableTransformerEncoderLayer / DecoderLayer, get_reference_points,
get_valid_ratio, gen_encoder_output_proposals). Post-norm layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddetr_jax.models.attention import MSDeformAttn, MultiHeadAttention, linear


def layer_norm(dim: int, *, rngs):
    return nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)


class FeedForward(nnx.Module):
    """Linear -> ReLU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float, *, rngs):
        self.linear1 = linear(dim, hidden, rngs=rngs)
        self.linear2 = linear(hidden, dim, rngs=rngs)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, *, deterministic: bool):
        y = self.dropout1(jax.nn.relu(self.linear1(x)), deterministic=deterministic)
        return self.dropout2(self.linear2(y), deterministic=deterministic)


class EncoderLayer(nnx.Module):
    def __init__(self, dim, hidden, dropout, levels, heads, points, *, rngs):
        self.self_attn = MSDeformAttn(dim, levels, heads, points, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.ffn = FeedForward(dim, hidden, dropout, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs)

    def __call__(self, x, pos, reference_points, spatial_shapes, pad_mask, *, deterministic):
        """x, pos: (B, S, D); reference_points: (B, S, L, 2); pad_mask: (B, S)."""
        attn = self.self_attn(x + pos, reference_points, x, spatial_shapes, pad_mask)
        x = self.norm1(x + self.dropout(attn, deterministic=deterministic))
        return self.norm2(x + self.ffn(x, deterministic=deterministic))


class DecoderLayer(nnx.Module):
    """Self-attention -> norm2; deformable cross-attention -> norm1; FFN -> norm3
    (norm names follow the published checkpoints)."""

    def __init__(self, dim, hidden, dropout, levels, heads, points, *, rngs):
        self.self_attn = MultiHeadAttention(dim, heads, dropout, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.cross_attn = MSDeformAttn(dim, levels, heads, points, rngs=rngs)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.ffn = FeedForward(dim, hidden, dropout, rngs=rngs)
        self.norm3 = layer_norm(dim, rngs=rngs)

    def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, pad_mask, *,
                 deterministic):
        """tgt, query_pos: (B, Q, D); reference_points: (B, Q, L, 2|4); memory: (B, S, D)."""
        qk = tgt + query_pos
        attn = self.self_attn(qk, qk, tgt, deterministic=deterministic)
        tgt = self.norm2(tgt + self.dropout2(attn, deterministic=deterministic))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, pad_mask)
        tgt = self.norm1(tgt + self.dropout1(attn, deterministic=deterministic))
        return self.norm3(tgt + self.ffn(tgt, deterministic=deterministic))


def valid_ratios(level_masks):
    """[(B, H_l, W_l) pad masks] -> (B, L, 2) valid (width / W, height / H) per level."""
    ratios = []
    for mask in level_masks:
        valid = ~mask
        h = valid[:, :, 0].sum(1).astype(jnp.float32) / mask.shape[1]
        w = valid[:, 0, :].sum(1).astype(jnp.float32) / mask.shape[2]
        ratios.append(jnp.stack([w, h], -1))
    return jnp.stack(ratios, 1)


def encoder_reference_points(spatial_shapes, ratios):
    """Pixel centres of every level, in valid-area units, for every level.

    spatial_shapes: ((H_l, W_l), ...); ratios: (B, L, 2) -> (B, S, L, 2).
    """
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                              jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
        y = ys.reshape(-1)[None] / (ratios[:, None, level, 1] * h)  # (B, H*W)
        x = xs.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(jnp.stack([x, y], -1))
    ref = jnp.concatenate(points, 1)  # (B, S, 2)
    return ref[:, :, None] * ratios[:, None]  # (B, S, L, 2)


class Encoder(nnx.Module):
    def __init__(self, num_layers, dim, hidden, dropout, levels, heads, points, *, rngs):
        self.layers = nnx.List([EncoderLayer(dim, hidden, dropout, levels, heads, points,
                                             rngs=rngs) for _ in range(num_layers)])

    def __call__(self, x, pos, spatial_shapes, ratios, pad_mask, *, deterministic):
        """x, pos: (B, S, D); ratios: (B, L, 2); pad_mask: (B, S) -> memory (B, S, D)."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes, pad_mask,
                      deterministic=deterministic)
        return x


def inverse_sigmoid(x, eps: float = 1e-5):
    x = jnp.clip(x, 0, 1)
    return jnp.log(jnp.clip(x, eps) / jnp.clip(1 - x, eps))


class Decoder(nnx.Module):
    def __init__(self, num_layers, dim, hidden, dropout, levels, heads, points, *, rngs):
        self.layers = nnx.List([DecoderLayer(dim, hidden, dropout, levels, heads, points,
                                             rngs=rngs) for _ in range(num_layers)])

    def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, ratios,
                 pad_mask, box_heads=None, *, deterministic):
        """Runs every layer; with box_heads (one per layer) refines the reference.

        tgt, query_pos: (B, Q, D); reference_points: (B, Q, 2|4) normalised;
        memory: (B, S, D); ratios: (B, L, 2).
        Returns hidden states (layers, B, Q, D) and the reference fed to each
        layer (a list, since a 2-d reference becomes 4-d after refinement).
        """
        states, references = [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scale = jnp.concatenate([ratios, ratios], -1)[:, None]  # (B, 1, L, 4)
            else:
                scale = ratios[:, None]  # (B, 1, L, 2)
            ref_input = reference_points[:, :, None] * scale  # (B, Q, L, 2|4)
            references.append(reference_points)
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, pad_mask,
                        deterministic=deterministic)
            states.append(tgt)
            if box_heads is not None:
                delta = box_heads[index](tgt)  # (B, Q, 4)
                coords = reference_points.shape[-1]
                logits = delta.at[..., :coords].add(inverse_sigmoid(reference_points))
                reference_points = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
        return jnp.stack(states), references


def encoder_proposals(memory, pad_mask, spatial_shapes):
    """Every encoder pixel as a box proposal (two-stage).

    memory: (B, S, D); pad_mask: (B, S) True on padding.
    Returns memory with padded / invalid positions zeroed (B, S, D) and the
    proposals in inverse-sigmoid space (B, S, 4), +inf where invalid.
    """
    b = memory.shape[0]
    proposals, start = [], 0
    for level, (h, w) in enumerate(spatial_shapes):
        mask = pad_mask[:, start:start + h * w].reshape(b, h, w)
        valid_h = (~mask[:, :, 0]).sum(1).astype(jnp.float32)  # (B,)
        valid_w = (~mask[:, 0, :]).sum(1).astype(jnp.float32)
        ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
        grid = jnp.stack([xs, ys], -1)[None]  # (1, H, W, 2)
        scale = jnp.stack([valid_w, valid_h], -1)[:, None, None]  # (B, 1, 1, 2)
        centre = (grid + 0.5) / scale
        size = jnp.full_like(centre, 0.05 * (2.0 ** level))
        proposals.append(jnp.concatenate([centre, size], -1).reshape(b, h * w, 4))
        start += h * w
    proposals = jnp.concatenate(proposals, 1)  # (B, S, 4)
    valid = jnp.all((proposals > 0.01) & (proposals < 0.99), -1, keepdims=True)
    logits = jnp.log(proposals / (1 - proposals))
    logits = jnp.where(pad_mask[..., None] | ~valid, jnp.inf, logits)
    memory = jnp.where(pad_mask[..., None] | ~valid, 0.0, memory)
    return memory, logits
