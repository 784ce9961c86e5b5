"""Convolutions with 1x1 kernels as matrix products.

XLA:CPU computes a convolution's kernel gradient as another convolution whose
window is the whole feature map, at a few GFLOP/s. For a 1x1 kernel that is a
plain matrix product over every pixel: written as a dot, the forward pass and
both gradients run as GEMMs (a multi-scale ResNet-50 train step at 512x512
drops from 8.3 to 6.7 s on a 2-core CPU; docs/benchmarks.md). The same
per-tap rewrite of 3x3 kernel gradients was measured and not kept: the
transposes it needs cost more than the convolutions it replaces.
"""

from __future__ import annotations

import jax


def conv_or_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   preferred_element_type=None, out_sharding=None):
    """lax.conv_general_dilated, for nnx.Conv's `conv_general_dilated` argument.

    lhs: (B, H, W, C_in) (NHWC, as nnx.Conv lays it out); rhs: (kh, kw, C_in,
    C_out). An unpadded 1x1 kernel without input dilation or feature groups is
    lhs[:, ::stride_h, ::stride_w] @ rhs[0, 0] -> (B, H', W', C_out); anything
    else is lax.conv_general_dilated. Equal up to summation order.
    """
    pointwise = (lhs.ndim == 4 and rhs.shape[:2] == (1, 1) and feature_group_count == 1
                 and not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)
                 and set(lhs_dilation or (1,)) == {1})
    if not pointwise:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    rows, cols = window_strides
    return jax.lax.dot_general(lhs[:, ::rows, ::cols], rhs[0, 0], (((3,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=preferred_element_type)
