"""Parameter initialisers that compile once per distribution, not once per shape.

The same values as jax.nn.initializers (flax's), bit for bit. Those draw
`jax.random.normal(key, shape)` eagerly, and JAX compiles one small program
per shape (and one more per shape for the scaling, the zeros and the layer
stacking): building the quickstart model compiled 84 programs, 6.5 s of its
7.6 s on a 2-core CPU, at every start with a cold cache and in every fresh
notebook (now 13 programs, 1.2-1.6 s). These draw a block of at least
MIN_BLOCK values with the same key and keep its first prod(shape): with JAX's
partitionable threefry (its default) value i depends only on the key and i,
so the prefix is the array the eager draw gives. Normal draws are scaled by JAX's own initialiser (on
the block), uniform ones on the host by the same float32 operation as
JAX's; zeros and constants are made on the host.

init(key, shape, dtype) -> (shape) array in dtype, as nnx layers call it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MIN_BLOCK = 1 << 20  # one draw program for every parameter up to 1M values (4 ms a draw)


def _draw(sample, key, shape):
    """sample(key, (n,)) -> (n,) drawn as one block; its first prod(shape) values, shaped,
    on the host. Traced (the model built under jit or eval_shape) or with partitionable
    threefry off (prefixes would differ): sample(key, shape), as flax draws."""
    if isinstance(key, jax.core.Tracer) or not jax.config.jax_threefry_partitionable:
        return sample(key, tuple(shape))
    size = math.prod(shape)
    block = max(MIN_BLOCK, 1 << (size - 1).bit_length())
    return np.asarray(sample(key, (block,)))[:size].reshape(shape)


def constant(value: float):
    return lambda key, shape, dtype=jnp.float32: jax.device_put(np.full(shape, value, dtype))


zeros, ones = constant(0.0), constant(1.0)


def normal(stddev: float = 1.0):
    """N(0, stddev^2): jax.nn.initializers.normal(stddev) on the block (JAX's own scaling,
    which differs between JAX versions)."""
    reference = jax.nn.initializers.normal(stddev)

    def init(key, shape, dtype=jnp.float32):
        return jax.device_put(_draw(lambda k, s: reference(k, s, dtype), key, shape))
    return init


def uniform(low: float, high: float):
    """U(low, high), as jax.random.uniform(key, shape, dtype, low, high)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.device_put(_draw(lambda k, s: jax.random.uniform(k, s, dtype, low, high), key,
                                 shape))
    return init


def variance_scaling(scale: float, mode: str, distribution: str):
    """jax.nn.initializers.variance_scaling for kernels (..., in, out): distribution
    'normal' or 'uniform', mode 'fan_in', 'fan_out' or 'fan_avg'."""
    if distribution not in ("normal", "uniform") or mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"variance_scaling: unsupported {mode!r} / {distribution!r}")

    def init(key, shape, dtype=jnp.float32):
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        denominator = {"fan_in": fan_in, "fan_out": fan_out,
                       "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = np.asarray(scale / denominator, dtype)
        if distribution == "normal":  # normal(stddev) with the float32 stddev JAX computes
            return normal(float(np.sqrt(variance)))(key, shape, dtype)
        drawn = _draw(lambda k, s: jax.random.uniform(k, s, dtype, -1), key, shape)
        return jax.device_put(drawn * np.sqrt(3 * variance))
    return init


def xavier_uniform():
    return variance_scaling(1.0, "fan_avg", "uniform")
