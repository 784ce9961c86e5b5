"""Dropout whose mask comes from a counter hash instead of threefry.

nnx.Dropout draws one threefry number per element: on a CPU that is ~10 ns an
element, ~1 s of every multi-scale train step (the encoder's FFN alone masks
8.4M elements per image and layer). Here one key per call gives two 32-bit
seeds (threefry on two numbers), and each element's bits are a two-round
integer hash of its flat index and the seeds: ~1 ns an element, fused by XLA
into the op that applies the mask. Same key, same mask, so runs stay
reproducible and resumes bit-exact; the rng stream (and what a checkpoint
holds) is nnx.Dropout's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _mix(h):
    """A bijective 32-bit integer hash (xor-shift-multiply, "lowbias32"): uint32 -> uint32."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def keep_mask(key, shape, rate: float):
    """(shape) bool, each element True with probability 1 - rate (to 2**-32).

    rate: in [0, 1). Indices wrap past 2**32 elements (masks repeat there).
    """
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = _mix(_mix(index + seeds[0]) ^ seeds[1])
    return bits >= jnp.uint32(round(rate * 2**32))


class Dropout(nnx.Dropout):
    """nnx.Dropout (same arguments, same rng stream) with hashed masks (keep_mask)."""

    def __call__(self, inputs, *, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep = keep_mask(self.rngs(), inputs.shape, self.rate)
        return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))
