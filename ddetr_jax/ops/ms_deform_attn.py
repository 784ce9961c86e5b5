"""Multi-scale deformable attention sampling, in pure JAX.

Mirrors `ms_deform_attn_core_pytorch` of the authors' code
(fundamentalvision/Deformable-DETR, models/ops/functions/ms_deform_attn_func.py):
per level, torch `grid_sample(mode='bilinear', padding_mode='zeros',
align_corners=False)` at every sampling location, weighted by the attention
weights and summed over levels and points.

How it is computed (shapes per level; K = P * 4 corners per query and head):
  * geometry: every sample's four corner rows in the flat value table
    (N * S * M rows of D) and their bilinear weights, zero for a corner off the
    map (its row index is clamped, so every gather stays in bounds).
  * forward: one row gather per corner, each consumed by a single
    multiply-add, so XLA fuses all 16 gathers of a level into one loop that
    writes only the (N, Lq, M, D) output.
  * backward (custom VJP, nothing saved but the inputs):
      - <grad, corner value> for every corner (at the encoder shape by D scalar
        gathers from the transposed value (D, N * S * M), fused into one loop
        that writes only the (N, Lq, M, P, 4) result); these give the
        attention-weight and location gradients in closed form;
      - the value gradient scatter-adds one weighted row per corner, one point
        at a time (lax.scan over P), so the largest update is 4x the output.
  Index and weight arrays are materialised once per level
  (lax.optimization_barrier) so the fused loops do not recompute them per
  element of D. Pixel coordinates are rounded as grid_sample rounds them and
  materialised once, so every fusion floors the same coordinate the same way
  and the location gradient at integer pixel coordinates is grid_sample's
  (see _pixel_coordinates).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from ddetr_jax.ops.manual_axes import make_varying, varying_axes

SpatialShapes = tuple[tuple[int, int], ...]


def _normalize_shapes(spatial_shapes: Sequence[Sequence[int]]) -> SpatialShapes:
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "spatial_shapes: expected a static sequence of (H_l, W_l) Python ints, "
            f"got {spatial_shapes!r}") from err
    if not shapes or any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(
            f"spatial_shapes: expected a non-empty sequence of positive (H_l, W_l), got {shapes}")
    return shapes


def _check_inputs(value, shapes: SpatialShapes, sampling_locations, attention_weights):
    """Raises ValueError naming the argument whose shape or dtype is wrong."""
    if value.ndim != 4:
        raise ValueError(f"value: expected rank 4 (N, S, M, D), got shape {value.shape}")
    n, s, m, _ = value.shape
    expected_s = sum(h * w for h, w in shapes)
    if s != expected_s:
        raise ValueError(
            f"value: expected S = sum of H_l * W_l = {expected_s} for spatial_shapes "
            f"{shapes}, got shape {value.shape}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations: expected shape (N, Lq, M, L, P, 2), got "
            f"{sampling_locations.shape}")
    _, lq, _, _, p, _ = sampling_locations.shape
    expected_loc = (n, lq, m, len(shapes), p, 2)
    if sampling_locations.shape != expected_loc:
        raise ValueError(
            f"sampling_locations: expected shape (N, Lq, M, L, P, 2) = {expected_loc} "
            f"(N, M from value, L = len(spatial_shapes)), got {sampling_locations.shape}")
    expected_w = (n, lq, m, len(shapes), p)
    if attention_weights.shape != expected_w:
        raise ValueError(
            f"attention_weights: expected shape (N, Lq, M, L, P) = {expected_w}, "
            f"got {attention_weights.shape}")
    for name, arr in (("value", value), ("sampling_locations", sampling_locations),
                      ("attention_weights", attention_weights)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {arr.dtype}")


def _compute_dtype(*arrays):
    """float32 for float32 and narrower inputs (bfloat16, float16), else float64."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _pixel_coordinates(loc, height: int, width: int):
    """Pixel coordinates (x, y) of normalised locations, rounded as grid_sample rounds them.

    loc: (..., 2) normalised (x, y) -> x, y: (...). grid_sample
    (align_corners=False) unnormalises the grid g = 2 * loc - 1 as
    (g + 1) * (size / 2) - 0.5; the same operations in the same order give the
    same float32 coordinate, so a location on a pixel centre or an integer
    offset from one (as at initialisation) floors to the same corner, and the
    location gradient is the same one-sided derivative.

    FMA safety: XLA copies cheap elementwise producers into every fusion that
    consumes them, and LLVM may contract a * b + c into an FMA in one copy and
    not in another, so two copies could floor differently (corner rows from
    one, bilinear weights from the other: wrong pixels, seen on CPU with AVX2).
    The locations pass once through an exact identity dot (a dot is never
    copied into its consumers), the only multiply that feeds an add is
    2 * loc, which is exact; the
    scaled grid is materialised (an optimization barrier) before the - 0.5, so
    every consumer reads one rounding of it. Clipping first keeps the
    coordinates finite and changes nothing: beyond [-1, 2] every corner is off
    the map, for any map size.
    """
    loc = jnp.clip(loc, -2.0, 3.0)
    eye = jnp.eye(loc.shape[-1], dtype=loc.dtype)  # an exact dot: one copy of loc for all
    loc = jnp.einsum("...i,ij->...j", loc, eye, precision=jax.lax.Precision.HIGHEST)
    grid = loc * 2 - 1
    half_size = jnp.asarray([width / 2, height / 2], loc.dtype)
    scaled = jax.lax.optimization_barrier((grid + 1) * half_size)
    return scaled[..., 0] - 0.5, scaled[..., 1] - 0.5


def _level_corners(loc, height: int, width: int, start: int, num_tokens: int):
    """Corner rows and bilinear weights of one level's samples.

    loc: (N, Lq, M, P, 2) normalised (x, y) of one level.
    Returns rows: (N, Lq, M, P, 4) int32 into the (N * S * M) rows of value,
    corners ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1); bilinear,
    d_dx, d_dy: (N, Lq, M, P, 4) in the compute dtype, the corner weights and their
    derivatives with respect to the pixel coordinates, zero for corners off the
    map.
    """
    n, _, m = loc.shape[:3]
    loc = loc.astype(_compute_dtype(loc))
    x, y = _pixel_coordinates(loc, height, width)  # (N, Lq, M, P)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    # Integer corner coordinates; far-away samples are clipped first so the
    # conversion never overflows (they are off the map either way).
    x0 = jnp.clip(x0, -2, width + 1).astype(jnp.int32)
    y0 = jnp.clip(y0, -2, height + 1).astype(jnp.int32)
    xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)  # (N, Lq, M, P, 4)
    ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
    on_map = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    pixel = jnp.clip(ys, 0, height - 1) * width + jnp.clip(xs, 0, width - 1)
    batch = jnp.arange(n, dtype=jnp.int32)[:, None, None, None, None]
    head = jnp.arange(m, dtype=jnp.int32)[None, None, :, None, None]
    rows = (batch * num_tokens + start + pixel) * m + head
    one = jnp.ones_like(fx)
    wx = jnp.stack([1 - fx, fx, 1 - fx, fx], axis=-1)
    wy = jnp.stack([1 - fy, 1 - fy, fy, fy], axis=-1)
    dwx = jnp.stack([-one, one, -one, one], axis=-1)
    dwy = jnp.stack([-one, -one, one, one], axis=-1)
    mask = on_map.astype(loc.dtype)
    return rows, wx * wy * mask, dwx * wy * mask, wx * dwy * mask


def _levels(shapes: SpatialShapes):
    """Yields (level, H, W, first token) for every level."""
    start = 0
    for level, (h, w) in enumerate(shapes):
        yield level, h, w, start
        start += h * w


def _forward(value, sampling_locations, attention_weights, shapes: SpatialShapes):
    n, s, m, d = value.shape
    lq, _, _, p = sampling_locations.shape[1:5]
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    table = value.astype(dtype).reshape(n * s * m, d)  # (N*S*M, D)
    out = jnp.zeros((n, lq, m, d), dtype)
    for level, h, w, start in _levels(shapes):
        rows, bilinear, _, _ = _level_corners(sampling_locations[:, :, :, level], h, w, start, s)
        weights = bilinear.astype(dtype) * attention_weights[:, :, :, level, :, None].astype(dtype)
        rows, weights = jax.lax.optimization_barrier((rows, weights))  # (N, Lq, M, P, 4)
        for point in range(p):
            for corner in range(4):
                out = out + weights[..., point, corner, None] * jnp.take(
                    table, rows[..., point, corner], axis=0, mode="clip")  # (N, Lq, M, D)
    return out.reshape(n, lq, m * d).astype(value.dtype)


def _corner_dots(table, planes, rows, grad):
    """<grad, value row> for every corner.

    table: (N*S*M, D) value rows; planes: (D, N*S*M) the same, transposed;
    rows: (N, Lq, M, P, 4); grad: (N, Lq, M, D) -> (N, Lq, M, P, 4).
    With fewer corners than value rows (the decoder), the gathered rows are
    small and contracted directly; otherwise (the encoder) D scalar gathers
    from the planes fuse into one loop with no gathered temporary.
    """
    if rows.size <= table.shape[0]:
        corners = jnp.take(table, rows, axis=0, mode="clip")  # (N, Lq, M, P, 4, D)
        return jnp.einsum("nqmd,nqmpcd->nqmpc", grad, corners,
                          precision=jax.lax.Precision.HIGHEST)
    total = jnp.zeros(rows.shape, table.dtype)
    for channel in range(planes.shape[0]):
        total = total + grad[..., channel, None, None] * jnp.take(
            planes[channel], rows, axis=0, mode="clip")
    return total


def _scatter_corners(grad_table, rows, weights, grad):
    """grad_table: (N*S*M, D) += weights * grad at rows, one point at a time.

    rows, weights: (N, Lq, M, P, 4); grad: (N, Lq, M, D).
    """
    d = grad.shape[-1]

    def add_point(acc, point):
        point_rows, point_weights = point  # (N, Lq, M, 4)
        updates = point_weights[..., None] * grad[:, :, :, None, :]  # (N, Lq, M, 4, D)
        acc = acc.at[point_rows.reshape(-1)].add(updates.reshape(-1, d), mode="drop")
        return acc, None

    grad_table, _ = jax.lax.scan(
        add_point, grad_table, (jnp.moveaxis(rows, 3, 0), jnp.moveaxis(weights, 3, 0)))
    return grad_table


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ms_deform_attn(value, sampling_locations, attention_weights, shapes):
    return _forward(value, sampling_locations, attention_weights, shapes)


def _ms_deform_attn_fwd(value, sampling_locations, attention_weights, shapes):
    out = _forward(value, sampling_locations, attention_weights, shapes)
    return out, (value, sampling_locations, attention_weights)


def _ms_deform_attn_bwd(shapes, residuals, grad_out):
    value, sampling_locations, attention_weights = residuals
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    dtype = _compute_dtype(value, sampling_locations, attention_weights, grad_out)
    table = value.astype(dtype).reshape(n * s * m, d)
    planes = table.T  # (D, N*S*M); dropped by XLA when no level uses it
    grad = grad_out.reshape(n, lq, m, d).astype(dtype)  # (N, Lq, M, D)
    grad_table = jnp.zeros_like(table)
    grad_locations, grad_weights = [], []
    for level, h, w, start in _levels(shapes):
        rows, bilinear, d_dx, d_dy = _level_corners(
            sampling_locations[:, :, :, level], h, w, start, s)
        bilinear, d_dx, d_dy = (a.astype(dtype) for a in (bilinear, d_dx, d_dy))
        attn = attention_weights[:, :, :, level].astype(dtype)  # (N, Lq, M, P)
        rows, bilinear = jax.lax.optimization_barrier((rows, bilinear))
        dots = _corner_dots(table, planes, rows, grad)  # (N, Lq, M, P, 4)
        grad_weights.append((bilinear * dots).sum(-1))
        grad_x = attn * (d_dx * dots).sum(-1) * w  # d x / d loc_x = W
        grad_y = attn * (d_dy * dots).sum(-1) * h
        grad_locations.append(jnp.stack([grad_x, grad_y], axis=-1))  # (N, Lq, M, P, 2)
        grad_table = _scatter_corners(grad_table, rows, bilinear * attn[..., None], grad)
    return (grad_table.reshape(value.shape).astype(value.dtype),
            jnp.stack(grad_locations, axis=3).astype(sampling_locations.dtype),
            jnp.stack(grad_weights, axis=3).astype(attention_weights.dtype))


_ms_deform_attn.defvjp(_ms_deform_attn_fwd, _ms_deform_attn_bwd)


def _vary_alike(*arrays):
    """Inside shard_map (check_vma): every input varies over the union of the
    inputs' varying mesh axes, so that the custom VJP's cotangents, which vary
    wherever any input does, have their primals' types. The transpose of this
    cast sums the cotangent of an invariant input over those axes."""
    axes = frozenset().union(*(varying_axes(a) for a in arrays))
    return [make_varying(a, axes) for a in arrays]


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Multi-scale deformable attention sampling.

    Args:
      value: (N, S, M, D), S = sum of H_l * W_l, levels concatenated in order,
        each level flattened row-major (y, then x).
      spatial_shapes: static sequence of (H_l, W_l) Python ints, length L.
      sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); 0 and 1 are the
        outer edges of the map (grid_sample with align_corners=False).
      attention_weights: (N, Lq, M, L, P).

    Returns:
      (N, Lq, M * D) in value's dtype, accumulated in float32 for float32 and
      narrower inputs (bfloat16 in, bfloat16 out), in float64 for float64.
      Samples and corners outside a map contribute zero. Differentiable with
      respect to all three arrays (custom VJP).

    Raises:
      ValueError at trace time, naming the argument, when ranks or shapes are
      inconsistent.
    """
    shapes = _normalize_shapes(spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    value, sampling_locations, attention_weights = _vary_alike(
        value, sampling_locations, attention_weights)
    return _ms_deform_attn(value, sampling_locations, attention_weights, shapes)
