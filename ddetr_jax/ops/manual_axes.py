"""Varying / invariant manual axes inside shard_map, across JAX releases.

jax 0.10 names an array's varying mesh axes `manual_axis_type.varying` and
casts with `lax.pcast(..., to='varying')`; other releases use `vma` and
`lax.pvary`.
"""

from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
    """Mesh axes over which x varies inside shard_map (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def make_varying(x, axes):
    """Marks x as varying over `axes` (its transpose sums over them)."""
    axes = tuple(sorted(set(axes) - varying_axes(x)))
    if not axes:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)
