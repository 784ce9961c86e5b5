"""ms_deform_attn against two oracles: a NumPy loop and PyTorch grid_sample."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec

from ddetr_jax.ops import ms_deform_attn
from tests.numpy_reference import ms_deform_attn_numpy
from tests.torch_reference import ms_deform_attn_torch

RTOL = 1e-5


def _rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-6)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale


def _random_inputs(rng, shapes, n, lq, m, d, p, locations=None):
    s = sum(h * w for h, w in shapes)
    value = rng.normal(size=(n, s, m, d)).astype(np.float32)
    if locations is None:
        locations = rng.uniform(-0.2, 1.2, size=(n, lq, m, len(shapes), p, 2))
    weights = rng.uniform(0.1, 1.0, size=(n, lq, m, len(shapes), p))
    grad = rng.normal(size=(n, lq, m * d))
    return (value, np.asarray(locations, np.float32), weights.astype(np.float32),
            grad.astype(np.float32))


def _edge_locations(rng, shapes, n, lq, m, p):
    """Pixel centres (k + 0.5) / W, pixel borders k / W, and the map edges 0 and 1.

    Map sizes are powers of two, so these values and the pixel coordinates
    derived from them are exact in float32 in every implementation.
    """
    loc = np.zeros((n, lq, m, len(shapes), p, 2), np.float32)
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            choices = np.concatenate([(np.arange(size) + 0.5) / size, np.arange(size + 1) / size])
            loc[:, :, :, level, :, axis] = rng.choice(choices, size=(n, lq, m, p))
    return loc


def _grid_locations(step):
    """Locations on multiples of `step` in [-2 step, 1 + 2 step]: over the level
    sizes below many pixel coordinates loc * size - 0.5 are integers, where
    bilinear interpolation has a kink and the location gradient must be
    grid_sample's one-sided derivative (the corner floor() picks)."""
    def make(rng, shapes, n, lq, m, p):
        ticks = np.arange(-2, round(1 / step) + 3) * step
        return rng.choice(ticks, size=(n, lq, m, len(shapes), p, 2)).astype(np.float32)
    return make


def _far_locations(rng, shapes, n, lq, m, p):
    """Half far outside the maps (both sides, huge values), half inside."""
    loc = rng.uniform(0, 1, size=(n, lq, m, len(shapes), p, 2))
    far = rng.choice([-1e3, -5.0, -0.6, 1.6, 7.0, 1e3], size=loc.shape)
    return np.where(rng.uniform(size=loc.shape) < 0.5, far, loc).astype(np.float32)


CASES = {
    "multi_level_batch2": (((6, 7), (3, 4), (2, 2)), 2, 5, 2, 3, 2, None),
    "single_level": (((5, 8),), 1, 6, 3, 4, 3, None),
    "height_or_width_one": (((1, 6), (7, 1), (1, 1)), 2, 4, 2, 3, 2, None),
    "pixel_centres_and_borders": (((4, 8), (2, 2), (1, 4)), 2, 6, 2, 3, 2, _edge_locations),
    "far_outside": (((5, 6), (3, 3)), 2, 5, 2, 3, 2, _far_locations),
    "eighth_grid_odd_even_unit_sides": (((23, 31), (12, 16), (1, 7), (6, 1)), 2, 12, 2, 3, 3,
                                        _grid_locations(1 / 8)),
    "sixteenth_grid_odd_even_unit_sides": (((7, 5), (4, 8), (1, 1), (3, 2)), 2, 12, 2, 3, 3,
                                           _grid_locations(1 / 16)),
}


def _case_inputs(name):
    shapes, n, lq, m, d, p, make_locations = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    locations = make_locations(rng, shapes, n, lq, m, p) if make_locations else None
    return shapes, _random_inputs(rng, shapes, n, lq, m, d, p, locations)


def _jax_forward_and_grads(shapes, value, loc, weights, grad):
    fn = jax.jit(lambda v, l, w: ms_deform_attn(v, shapes, l, w))
    out, vjp = jax.vjp(fn, value, loc, weights)
    return (out, *vjp(grad))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_loop(name):
    shapes, (value, loc, weights, grad) = _case_inputs(name)
    expected = ms_deform_attn_numpy(value, shapes, loc, weights, grad)
    actual = _jax_forward_and_grads(shapes, value, loc, weights, grad)
    for label, a, e in zip(("output", "d value", "d locations", "d weights"), actual, expected):
        assert a.shape == e.shape, label
        assert _rel_err(a, e) <= RTOL, (label, _rel_err(a, e))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_grid_sample(name):
    shapes, (value, loc, weights, grad) = _case_inputs(name)
    tensors = [torch.tensor(a, requires_grad=True) for a in (value, loc, weights)]
    out = ms_deform_attn_torch(tensors[0], shapes, tensors[1], tensors[2])
    out.backward(torch.tensor(grad))
    expected = [out.detach().numpy()] + [t.grad.numpy() for t in tensors]
    actual = _jax_forward_and_grads(shapes, value, loc, weights, grad)
    for label, a, e in zip(("output", "d value", "d locations", "d weights"), actual, expected):
        assert _rel_err(a, e) <= RTOL, (label, _rel_err(a, e))


def test_samples_off_the_map_contribute_nothing():
    shapes = ((3, 4),)
    value = np.ones((1, 12, 1, 2), np.float32)
    loc = np.array([-0.5, 2.0, -1e6, 1e6], np.float32)
    loc = np.stack(np.meshgrid(loc, loc), -1).reshape(1, 16, 1, 1, 1, 2)
    weights = np.ones((1, 16, 1, 1, 1), np.float32)
    out, d_value, d_loc, d_weights = _jax_forward_and_grads(
        shapes, value, loc, weights, np.ones((1, 16, 2), np.float32))
    for arr in (out, d_value, d_loc, d_weights):
        assert not np.any(np.asarray(arr))


def test_check_grads_float64():
    shapes = ((3, 4), (2, 3))
    rng = np.random.default_rng(7)
    # Pixel coordinates x = loc * W - 0.5 at k + 0.5 (mid-way between pixel
    # centres): far from the kinks of bilinear interpolation at integers.
    loc = np.zeros((1, 3, 2, 2, 2, 2))
    for level, (h, w) in enumerate(shapes):
        loc[..., level, :, 0] = (rng.integers(-1, w, size=(1, 3, 2, 2)) + 1.0) / w
        loc[..., level, :, 1] = (rng.integers(-1, h, size=(1, 3, 2, 2)) + 1.0) / h
    with jax.enable_x64(True):
        value = jnp.asarray(rng.normal(size=(1, 18, 2, 3)))
        weights = jnp.asarray(rng.uniform(size=(1, 3, 2, 2, 2)))
        fn = functools.partial(ms_deform_attn, spatial_shapes=shapes)
        jax.test_util.check_grads(
            lambda v, l, w: fn(v, sampling_locations=l, attention_weights=w),
            (value, jnp.asarray(loc), weights), order=1, modes=("rev",), eps=1e-4)


def test_bfloat16_matches_float32():
    """bf16 inputs give the float32 result on the same (bf16-rounded) inputs,
    up to the rounding of the bf16 outputs (8-bit mantissa: 2^-9 relative)."""
    shapes, arrays = _case_inputs("multi_level_batch2")
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in arrays]
    out16, *grads16 = _jax_forward_and_grads(shapes, *bf16)
    out32, *grads32 = _jax_forward_and_grads(shapes, *(a.astype(jnp.float32) for a in bf16))
    assert out16.dtype == jnp.bfloat16
    assert [g.dtype for g in grads16] == [jnp.bfloat16] * 3
    for a16, a32 in zip((out16, *grads16), (out32, *grads32)):
        np.testing.assert_allclose(np.asarray(a16, np.float32), a32,
                                   rtol=2 ** -8, atol=2 ** -8 * float(jnp.abs(a32).max()))


def test_bfloat16_value_accumulates_in_float32():
    """Summing many equal bf16 terms must not lose precision in the sum."""
    shapes = ((1, 1),)
    p = 64
    value = jnp.full((1, 1, 1, 1), 1.0 + 2.0 ** -7, jnp.bfloat16)
    loc = jnp.full((1, 1, 1, 1, p, 2), 0.5, jnp.float32)
    weights = jnp.full((1, 1, 1, 1, p), 1.0 / p, jnp.float32)
    out = ms_deform_attn(value, shapes, loc, weights)
    assert float(out[0, 0, 0]) == pytest.approx(1.0 + 2.0 ** -7, rel=1e-3)


def test_vmap_equals_loop():
    shapes, (value, loc, weights, _) = _case_inputs("multi_level_batch2")
    stacked = [np.stack([a, a[::-1]]) for a in (value, loc, weights)]
    batched = jax.vmap(lambda v, l, w: ms_deform_attn(v, shapes, l, w))(*stacked)
    for i in range(2):
        single = ms_deform_attn(stacked[0][i], shapes, stacked[1][i], stacked[2][i])
        np.testing.assert_allclose(batched[i], single, rtol=1e-6, atol=1e-6)


def test_grad_under_vmap_equals_loop():
    shapes, (value, loc, weights, _) = _case_inputs("single_level")
    loss = lambda v, l, w: jnp.sum(ms_deform_attn(v, shapes, l, w) ** 2)  # noqa: E731
    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    stacked = [np.stack([a, 2 * a]) for a in (value, loc, weights)]
    batched = jax.jit(jax.vmap(grad_fn))(*stacked)
    for i in range(2):
        single = grad_fn(stacked[0][i], stacked[1][i], stacked[2][i])
        for b, s in zip(batched, single):
            np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-5)


def test_inside_shard_map_equals_unsharded():
    devices = np.array(jax.devices()[:4])
    assert devices.size == 4, "conftest asks for 8 CPU devices"
    mesh = Mesh(devices, ("data",))
    shapes = ((4, 5), (2, 3))
    rng = np.random.default_rng(3)
    value, loc, weights, grad = _random_inputs(rng, shapes, 8, 6, 2, 4, 2)

    def loss(v, l, w, g):
        return jnp.sum(ms_deform_attn(v, shapes, l, w) * g)

    def sharded_grads(v, l, w, g):
        grads = jax.grad(loss, argnums=(0, 1, 2))(v, l, w, g)
        return grads, jax.lax.psum(loss(v, l, w, g), "data")

    spec = PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(sharded_grads, mesh=mesh, in_specs=(spec,) * 4,
                                    out_specs=((spec, spec, spec), PartitionSpec())))
    grads, total = sharded(value, loc, weights, grad)
    ref_grads = jax.grad(loss, argnums=(0, 1, 2))(value, loc, weights, grad)
    np.testing.assert_allclose(total, loss(value, loc, weights, grad), rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_replicated_value_sharded_queries_inside_shard_map():
    """An invariant (replicated) input beside sharded ones: its gradient is summed."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    shapes = ((3, 4),)
    rng = np.random.default_rng(5)
    value, loc, weights, grad = _random_inputs(rng, shapes, 1, 8, 2, 3, 2)

    def loss(v, l, w, g):
        return jnp.sum(ms_deform_attn(v, shapes, l, w) * g)

    def sharded(v, l, w, g):
        grad_v = jax.grad(loss)(v, l, w, g)
        return grad_v

    spec = PartitionSpec(None, "data")
    fn = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(PartitionSpec(), spec, spec, spec),
                               out_specs=PartitionSpec()))
    np.testing.assert_allclose(fn(value, loc, weights, grad),
                               jax.grad(loss)(value, loc, weights, grad), rtol=1e-5, atol=1e-6)


def _ok_inputs():
    shapes = ((4, 5), (2, 3))
    rng = np.random.default_rng(0)
    value, loc, weights, _ = _random_inputs(rng, shapes, 2, 3, 2, 4, 2)
    return shapes, value, loc, weights


@pytest.mark.parametrize("mutate, argument, expected", [
    (lambda s, v, l, w: (s, v[0], l, w), "value", "(N, S, M, D)"),
    (lambda s, v, l, w: (s, v[:, :-1], l, w), "value", "S = sum of H_l * W_l = 26"),
    (lambda s, v, l, w: (s + ((1, 1),), v, l, w), "value", "S = sum of H_l * W_l = 27"),
    (lambda s, v, l, w: (s, v, l[..., :1], w), "sampling_locations", "(N, Lq, M, L, P, 2)"),
    (lambda s, v, l, w: (s, v, l[:, :, :, :1], w), "sampling_locations", "(2, 3, 2, 2, 2, 2)"),
    (lambda s, v, l, w: (s, v, l[:, :, :1], w), "sampling_locations", "(2, 3, 2, 2, 2, 2)"),
    (lambda s, v, l, w: (s, v, l, w[..., :1]), "attention_weights", "(2, 3, 2, 2, 2)"),
    (lambda s, v, l, w: (s, v, l, w[:1]), "attention_weights", "(2, 3, 2, 2, 2)"),
    (lambda s, v, l, w: (((4, 5), (2, 0)), v, l, w), "spatial_shapes", "positive"),
    (lambda s, v, l, w: ("ab", v, l, w), "spatial_shapes", "Python ints"),
    (lambda s, v, l, w: (s, v.astype(np.int32), l, w), "value", "floating"),
])
def test_bad_shapes_raise_at_trace_time(mutate, argument, expected):
    args = mutate(*_ok_inputs())
    traced = jax.jit(lambda v, l, w: ms_deform_attn(v, args[0], l, w))
    with pytest.raises(ValueError) as info:
        traced.trace(*args[1:])
    assert str(info.value).startswith(argument + ":")
    assert expected in str(info.value)
