"""The authors' PyTorch reference, as an oracle for tests and benchmarks.

Mirrors `ms_deform_attn_core_pytorch` (fundamentalvision/Deformable-DETR,
models/ops/functions/ms_deform_attn_func.py): grid_sample per level.
"""

import torch
import torch.nn.functional as F


def ms_deform_attn_torch(value, spatial_shapes, sampling_locations, attention_weights):
    """value: (N, S, M, D), sampling_locations: (N, Lq, M, L, P, 2),
    attention_weights: (N, Lq, M, L, P) -> (N, Lq, M * D)."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        v = value_list[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()
