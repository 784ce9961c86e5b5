"""DeformableDETR: backbone, input projections, transformer, heads, refinement, two-stage.

Mirrors the authors' models/deformable_detr.py (DeformableDETR) and the
set-up part of models/deformable_transformer.py, without monkeypatching: the
detector hands the box heads to the decoder explicitly.

Output contract of `DeformableDETR.__call__` (B images, Q queries, C classes):
  'pred_logits': (B, Q, C) class logits of the last decoder layer (sigmoid
                 classification, no background logit)
  'pred_boxes':  (B, Q, 4) normalised (cx, cy, w, h) of the last decoder layer
  'aux_outputs': list of {'pred_logits', 'pred_boxes'}, one per earlier layer
  'enc_outputs': two-stage only, {'pred_logits': (B, S, C), 'pred_boxes':
                 (B, S, 4)}: the encoder proposals scored by the last heads
  'decoder_attention': with_attention=True only, {'sampling_locations':
                 (layers, B, Q, M, L, P, 2), 'attention_weights': (layers, B, Q,
                 M, L, P)}: where every decoder layer's cross-attention looked

With box refinement the per-layer heads are stacks (models/stack.py): one
module whose weights have a leading axis of dec_layers (+ 1 with two-stage,
the last scoring the encoder proposals); `stack.layer(model.class_embed, i)`
is head i.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ddetr_jax.models import initializers, stack
from ddetr_jax.models.attention import linear
from ddetr_jax.models.backbone import ResNet, resize_mask
from ddetr_jax.models.conv import conv_or_matmul
from ddetr_jax.models.position import box_sine_embedding, sine_position_embedding
from ddetr_jax.models.transformer import (Decoder, Encoder, encoder_proposals, layer_norm,
                                          refine_logits, valid_ratios)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every constructor argument of DeformableDETR; the published defaults."""

    num_classes: int = 91
    backbone_depth: int = 50
    dilation: bool = False
    backbone_norm: str = "frozen_batch_norm"  # or "group_norm" (from scratch, see backbone.py)
    backbone_width: int = 64  # stem / layer1 channels; 64 in the published ResNets
    num_feature_levels: int = 4
    dim: int = 256
    ffn_dim: int = 1024
    heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    enc_points: int = 4
    dec_points: int = 4
    num_queries: int = 300
    dropout: float = 0.1
    with_box_refine: bool = False
    two_stage: bool = False


def _torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return initializers.uniform(-bound, bound)


class BoxHead(nnx.Module):
    """MLP dim -> dim -> dim -> 4 with ReLU; the last layer starts at zero."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        init = _torch_linear_init(dim)
        self.layers = nnx.List([
            nnx.Linear(dim, dim, kernel_init=init, bias_init=init, rngs=rngs),
            nnx.Linear(dim, dim, kernel_init=init, bias_init=init, rngs=rngs),
            nnx.Linear(dim, 4, kernel_init=initializers.zeros, bias_init=initializers.zeros,
                       rngs=rngs),
        ])

    def __call__(self, x):
        x = jax.nn.relu(self.layers[0](x))
        x = jax.nn.relu(self.layers[1](x))
        return self.layers[2](x)


def _class_head(dim: int, num_classes: int, *, rngs):
    prior = -math.log((1 - 0.01) / 0.01)
    return nnx.Linear(dim, num_classes, kernel_init=_torch_linear_init(dim),
                      bias_init=initializers.constant(prior), rngs=rngs)


class InputProjection(nnx.Module):
    """Conv (1x1, or 3x3 stride 2 for the extra levels) + GroupNorm(32)."""

    def __init__(self, in_features: int, dim: int, extra: bool, *, rngs):
        kernel, stride, pad = (3, 2, 1) if extra else (1, 1, 0)
        self.conv = nnx.Conv(in_features, dim, (kernel, kernel), strides=stride,
                             padding=((pad, pad), (pad, pad)),
                             kernel_init=initializers.xavier_uniform(),
                             bias_init=initializers.zeros,
                             conv_general_dilated=conv_or_matmul, rngs=rngs)
        self.norm = nnx.GroupNorm(dim, num_groups=32, epsilon=1e-5, scale_init=initializers.ones,
                                  bias_init=initializers.zeros, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.conv(x))


class DeformableDETR(nnx.Module):
    """Deformable DETR; the variant is chosen by the constructor arguments.

    single-scale: num_feature_levels=1; DC5: plus dilation=True;
    multi-scale: num_feature_levels=4; + with_box_refine=True; ++ two_stage=True.
    """

    def __init__(self, config: ModelConfig = ModelConfig(), *, rngs: nnx.Rngs):
        c = config
        if c.two_stage and not c.with_box_refine:
            raise ValueError("two_stage=True needs with_box_refine=True (as published)")
        if c.num_feature_levels == 2:
            raise ValueError("num_feature_levels: expected 1 (single-scale) or >= 3 "
                             "(C3-C5 plus extra stride-2 levels), got 2")
        self.config = c
        self.backbone = ResNet(c.backbone_depth, c.dilation, c.backbone_norm, c.backbone_width,
                               rngs=rngs)
        in_channels = self.backbone.channels if c.num_feature_levels > 1 else (
            self.backbone.channels[-1],)
        projections = [InputProjection(ch, c.dim, False, rngs=rngs) for ch in in_channels]
        for level in range(len(in_channels), c.num_feature_levels):
            source = in_channels[-1] if level == len(in_channels) else c.dim
            projections.append(InputProjection(source, c.dim, True, rngs=rngs))
        self.input_proj = nnx.List(projections)
        self.level_embed = nnx.Param(
            initializers.normal(1.0)(rngs.params(), (c.num_feature_levels, c.dim)))
        args = (c.dim, c.ffn_dim, c.dropout, c.num_feature_levels, c.heads)
        self.encoder = Encoder(c.enc_layers, *args, c.enc_points, rngs=rngs)
        self.decoder = Decoder(c.dec_layers, *args, c.dec_points, rngs=rngs)
        if c.two_stage:
            self.enc_output = linear(c.dim, c.dim, rngs=rngs)
            self.enc_output_norm = layer_norm(c.dim, rngs=rngs)
            self.pos_trans = linear(2 * c.dim, 2 * c.dim, rngs=rngs)
            self.pos_trans_norm = layer_norm(2 * c.dim, rngs=rngs)
        else:
            self.query_embed = nnx.Embed(c.num_queries, 2 * c.dim,
                                         embedding_init=initializers.normal(1.0), rngs=rngs)
            self.reference_points = linear(c.dim, 2, rngs=rngs)
        class_head = _class_head(c.dim, c.num_classes, rngs=rngs)
        box_head = BoxHead(c.dim, rngs=rngs)
        # The authors' -2.0 rule: the (w, h) bias of the box head that refines point
        # references (the shared head; with refinement only copy 0) starts at -2.0, so the
        # first boxes are sigmoid(-2) ~ 0.12 of the image wide and high; the other copies
        # start at 0 and keep the box they refine. Two-stage sets none: proposals have sizes.
        if c.with_box_refine:
            # Clones with identical initial weights, as the authors' _get_clones.
            count = c.dec_layers + (1 if c.two_stage else 0)
            self.class_embed = stack.stack_modules([nnx.clone(class_head) for _ in range(count)])
            self.bbox_embed = stack.stack_modules([nnx.clone(box_head) for _ in range(count)])
            if not c.two_stage:
                bias = self.bbox_embed.layers[2].bias  # (count, 4)
                bias[...] = bias[...].at[0, 2:].set(-2.0)
        else:
            self.class_embed = class_head
            self.bbox_embed = box_head
            bias = box_head.layers[2].bias
            bias[...] = bias[...].at[2:].set(-2.0)

    def features(self, images, pad_mask):
        """Multi-level inputs of the encoder.

        images: (B, H, W, 3); pad_mask: (B, H, W) True on padding.
        Returns sources [(B, H_l, W_l, D)], masks [(B, H_l, W_l)], positions
        [(B, H_l, W_l, D)] (sine encoding of each level's own mask).
        """
        feats = self.backbone(images)
        if self.config.num_feature_levels == 1:
            feats = feats[-1:]
        sources = []
        for level, proj in enumerate(self.input_proj):
            if level < len(feats):
                sources.append(proj(feats[level]))
            else:
                sources.append(proj(feats[-1] if level == len(feats) else sources[-1]))
        masks = [resize_mask(pad_mask, s.shape[1], s.shape[2]) for s in sources]
        positions = [sine_position_embedding(m, self.config.dim // 2) for m in masks]
        return sources, masks, positions

    def learned_queries(self, batch: int):
        """tgt, query_pos (B, Q, D): the learned embeddings (Q, 2D) split; reference (B, Q, 2):
        a linear map of query_pos. Mirrors the authors' DeformableTransformer (one-stage)."""
        c = self.config
        embed = self.query_embed.embedding[...]  # (Q, 2D)
        query_pos = jnp.broadcast_to(embed[None, :, :c.dim], (batch, c.num_queries, c.dim))
        tgt = jnp.broadcast_to(embed[None, :, c.dim:], (batch, c.num_queries, c.dim))
        return tgt, query_pos, jax.nn.sigmoid(self.reference_points(query_pos))

    def two_stage_queries(self, memory, mask, shapes):
        """Queries from the Q encoder proposals the last heads score best (class 0's logit).

        memory: (B, S, D); mask: (B, S) True on padding. Returns tgt, query_pos
        (B, Q, D) (the proposals' sine embedding), reference (B, Q, 4) (gradient
        stopped) and enc_outputs {'pred_logits': (B, S, C), 'pred_boxes': (B, S, 4)}.
        Mirrors the two_stage branch of the authors' DeformableTransformer.
        """
        c = self.config
        if memory.shape[1] < c.num_queries:
            raise ValueError(
                f"two_stage: the image gives {memory.shape[1]} encoder tokens (levels "
                f"{tuple(shapes)}), fewer than the model.num_queries={c.num_queries} "
                "proposals it selects; use larger images or fewer queries")
        proposal_memory, proposals = encoder_proposals(memory, mask, shapes)
        proposal_memory = self.enc_output_norm(self.enc_output(proposal_memory))
        enc_logits = stack.layer(self.class_embed, c.dec_layers)(proposal_memory)  # (B, S, C)
        box_head = stack.layer(self.bbox_embed, c.dec_layers)
        enc_coords = refine_logits(proposals, box_head(proposal_memory))  # (B, S, 4)
        _, top = jax.lax.top_k(enc_logits[..., 0], c.num_queries)  # (B, Q)
        top_coords = jax.lax.stop_gradient(
            jnp.take_along_axis(enc_coords, top[..., None], axis=1))  # (B, Q, 4)
        query = self.pos_trans_norm(self.pos_trans(box_sine_embedding(top_coords, c.dim // 2)))
        enc_outputs = {"pred_logits": enc_logits, "pred_boxes": jax.nn.sigmoid(enc_coords)}
        return query[..., c.dim:], query[..., :c.dim], jax.nn.sigmoid(top_coords), enc_outputs

    def __call__(self, images, pad_mask, *, deterministic: bool = True, remat: str = "none",
                 with_attention: bool = False):
        """images: (B, H, W, 3) normalised; pad_mask: (B, H, W) True on padding.

        remat: rematerialisation of each encoder and decoder layer in the
        backward pass (stack.REMAT_POLICIES: 'none', 'full', 'dots'); less
        memory, same results. Returns the dict described in the module docstring.
        """
        c = self.config
        sources, masks, positions = self.features(images, pad_mask)
        b = images.shape[0]
        shapes = tuple((s.shape[1], s.shape[2]) for s in sources)
        src = jnp.concatenate([s.reshape(b, -1, c.dim) for s in sources], 1)  # (B, S, D)
        pos = jnp.concatenate([p.reshape(b, -1, c.dim) + self.level_embed[level]
                               for level, p in enumerate(positions)], 1).astype(src.dtype)
        mask = jnp.concatenate([m.reshape(b, -1) for m in masks], 1)  # (B, S)
        ratios = valid_ratios(masks)  # (B, L, 2)
        memory = self.encoder(src, pos, shapes, ratios, mask, deterministic=deterministic,
                              remat=remat)

        if c.two_stage:
            tgt, query_pos, reference, enc_outputs = self.two_stage_queries(memory, mask, shapes)
            out = {"enc_outputs": enc_outputs}
        else:
            tgt, query_pos, reference = self.learned_queries(b)
            out = {}
        decoded = self.decoder(tgt, query_pos, reference, memory, shapes, ratios, mask,
                               self.class_embed, self.bbox_embed, c.with_box_refine,
                               deterministic=deterministic, remat=remat)
        predictions = [{"pred_logits": decoded["pred_logits"][layer],
                        "pred_boxes": decoded["pred_boxes"][layer]}
                       for layer in range(c.dec_layers)]
        out.update(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        if with_attention:
            out["decoder_attention"] = {k: decoded[k] for k in ("sampling_locations",
                                                                "attention_weights")}
        return out


def count_parameters(model: nnx.Module) -> int:
    """Number of trainable-type parameters (nnx.Param), frozen BN statistics excluded."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
