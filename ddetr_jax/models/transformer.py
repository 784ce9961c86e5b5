"""Deformable encoder and decoder stacks, reference points, valid ratios, proposals.

Mirrors the authors' models/deformable_transformer.py (DeformableTransformer,
DeformableTransformerEncoderLayer / DecoderLayer, get_reference_points,
get_valid_ratio, gen_encoder_output_proposals). Post-norm layers.

The layers of each stack (and, with box refinement, the per-layer heads) are
stacked and run with lax.scan (models/stack.py): one layer is compiled
whatever the depth. Layer i of a stack: `encoder.layer(i)`, `decoder.layer(i)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddetr_jax.models import initializers, stack
from ddetr_jax.models.attention import MSDeformAttn, MultiHeadAttention, linear
from ddetr_jax.models.dropout import Dropout
from ddetr_jax.ops.manual_axes import make_varying, varying_axes


def layer_norm(dim: int, *, rngs):
    return nnx.LayerNorm(dim, epsilon=1e-5, scale_init=initializers.ones,
                         bias_init=initializers.zeros, rngs=rngs)


class FeedForward(nnx.Module):
    """Linear -> ReLU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float, *, rngs):
        self.linear1 = linear(dim, hidden, rngs=rngs)
        self.linear2 = linear(hidden, dim, rngs=rngs)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.dropout2 = Dropout(dropout, rngs=rngs)

    def __call__(self, x, *, deterministic: bool):
        y = self.dropout1(jax.nn.relu(self.linear1(x)), deterministic=deterministic)
        return self.dropout2(self.linear2(y), deterministic=deterministic)


class EncoderLayer(nnx.Module):
    def __init__(self, dim, hidden, dropout, levels, heads, points, *, rngs):
        self.self_attn = MSDeformAttn(dim, levels, heads, points, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
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
        self.dropout2 = Dropout(dropout, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.cross_attn = MSDeformAttn(dim, levels, heads, points, rngs=rngs)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.ffn = FeedForward(dim, hidden, dropout, rngs=rngs)
        self.norm3 = layer_norm(dim, rngs=rngs)

    def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, pad_mask, *,
                 deterministic):
        """tgt, query_pos: (B, Q, D); reference_points: (B, Q, L, 2|4); memory: (B, S, D).

        Returns the new tgt (B, Q, D) and where the cross-attention looked:
        (sampling locations (B, Q, M, L, P, 2), attention weights (B, Q, M, L, P)).
        """
        qk = tgt + query_pos
        attn = self.self_attn(qk, qk, tgt, deterministic=deterministic)
        tgt = self.norm2(tgt + self.dropout2(attn, deterministic=deterministic))
        attn, locations, weights = self.cross_attn.sample(tgt + query_pos, reference_points,
                                                          memory, spatial_shapes, pad_mask)
        tgt = self.norm1(tgt + self.dropout1(attn, deterministic=deterministic))
        tgt = self.norm3(tgt + self.ffn(tgt, deterministic=deterministic))
        return tgt, (locations, weights)


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
        self.layers = stack.stack_modules([
            EncoderLayer(dim, hidden, dropout, levels, heads, points, rngs=rngs)
            for _ in range(num_layers)])  # one EncoderLayer, variables (num_layers, ...)

    def layer(self, index: int) -> EncoderLayer:
        """Layer `index` as an ordinary module (a copy of its weights)."""
        return stack.layer(self.layers, index)

    def __call__(self, x, pos, spatial_shapes, ratios, pad_mask, *, deterministic,
                 remat: str = "none"):
        """x, pos: (B, S, D); ratios: (B, L, 2); pad_mask: (B, S) -> memory (B, S, D)."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)

        def body(modules, x, _):
            (layer,) = modules
            return layer(x, pos, reference_points, spatial_shapes, pad_mask,
                         deterministic=deterministic), None

        return stack.scan((self.layers,), body, x, remat=remat)[0]


def inverse_sigmoid(x, eps: float = 1e-5):
    x = jnp.clip(x, 0, 1)
    return jnp.log(jnp.clip(x, eps) / jnp.clip(1 - x, eps))


def refine_logits(reference_logits, delta):
    """Box refinement: a head's delta added to its reference in inverse-sigmoid space.

    reference_logits: (..., 2|4) inverse sigmoid of normalised (cx, cy[, w, h]);
    delta: (..., 4) -> (..., 4) box logits; their sigmoid is the boxes (with box
    refinement the next layer's reference, gradient stopped). In the wider of
    the two dtypes (a bfloat16 delta on a float32 reference: float32).
    """
    delta = delta.astype(jnp.promote_types(delta.dtype, reference_logits.dtype))
    return delta.at[..., :reference_logits.shape[-1]].add(reference_logits)


class Decoder(nnx.Module):
    def __init__(self, num_layers, dim, hidden, dropout, levels, heads, points, *, rngs):
        self.layers = stack.stack_modules([
            DecoderLayer(dim, hidden, dropout, levels, heads, points, rngs=rngs)
            for _ in range(num_layers)])  # one DecoderLayer, variables (num_layers, ...)

    def layer(self, index: int) -> DecoderLayer:
        """Layer `index` as an ordinary module (a copy of its weights)."""
        return stack.layer(self.layers, index)

    def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, ratios,
                 pad_mask, class_head, box_head, refine: bool, *, deterministic,
                 remat: str = "none"):
        """Runs every layer and its prediction heads.

        tgt, query_pos: (B, Q, D); reference_points: (B, Q, 2|4) normalised;
        memory: (B, S, D); ratios: (B, L, 2). class_head, box_head: one head
        shared by every layer, or with refine=True stacks with a head per layer
        (at least as many as layers); then each layer's boxes are the next
        layer's reference. Returns {'pred_logits': (layers, B, Q, C),
        'pred_boxes': (layers, B, Q, 4), 'sampling_locations': (layers, B, Q,
        M, L, P, 2), 'attention_weights': (layers, B, Q, M, L, P)} (the
        cross-attention of every layer; unused outputs cost nothing under jit).
        """
        # Inside shard_map the scan's carry must vary over the mesh axes its output
        # varies over: those of the memory (the queries alone may be replicated).
        axes = varying_axes(memory)
        # References stay float32 under bfloat16 compute, as the refined boxes each layer
        # returns (the scan's carry keeps one dtype; the sampling locations are float32).
        reference_points = reference_points.astype(jnp.float32)
        tgt, reference_points = (make_varying(x, axes) for x in (tgt, reference_points))

        def run_layer(layer, tgt, reference):
            scale = ratios if reference.shape[-1] == 2 else jnp.concatenate([ratios, ratios], -1)
            ref_input = reference[:, :, None] * scale[:, None]  # (B, Q, L, 2|4)
            return layer(tgt, query_pos, ref_input, memory, spatial_shapes, pad_mask,
                         deterministic=deterministic)

        if not refine:
            def body(modules, tgt, _):
                tgt, sampling = run_layer(modules[0], tgt, reference_points)
                return tgt, (tgt, sampling)

            _, (states, sampling) = stack.scan((self.layers,), body, tgt, remat=remat)
            logits = refine_logits(inverse_sigmoid(reference_points), box_head(states))
            return _decoder_outputs(class_head(states), jax.nn.sigmoid(logits), sampling)

        def refined(modules, carry, _):
            layer, layer_class_head, layer_box_head = modules
            tgt, reference = carry
            tgt, sampling = run_layer(layer, tgt, reference)
            boxes = jax.nn.sigmoid(refine_logits(inverse_sigmoid(reference), layer_box_head(tgt)))
            return (tgt, jax.lax.stop_gradient(boxes)), (layer_class_head(tgt), boxes, sampling)

        stacks = (self.layers, class_head, box_head)
        num_layers = stack.stack_size(self.layers)
        first = []
        carry = (tgt, reference_points)
        if reference_points.shape[-1] == 2:
            # The first layer samples around points, the rest around boxes: that one
            # runs outside the scan (a carry keeps one shape).
            carry, y = refined(tuple(stack.layer(s, 0) for s in stacks), carry, None)
            first = [jax.tree.map(lambda x: x[None], y)]
        start = len(first)
        _, ys = stack.scan(stacks, refined, carry, layers=slice(start, num_layers), remat=remat)
        logits, boxes, sampling = jax.tree.map(lambda *xs: jnp.concatenate(xs), *first, ys)
        return _decoder_outputs(logits, boxes, sampling)


def _decoder_outputs(logits, boxes, sampling):
    return {"pred_logits": logits, "pred_boxes": boxes, "sampling_locations": sampling[0],
            "attention_weights": sampling[1]}


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
