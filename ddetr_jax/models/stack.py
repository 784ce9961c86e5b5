"""Layers compiled once: modules of one kind stacked on a leading axis, run with lax.scan.

A stack is one module of its kind whose every variable has a leading layer
axis (L, ...). Running it with `scan` traces and compiles one layer body for
the whole depth, so compile time does not grow with the number of layers.
`layer(stack, i)` gives layer i as an ordinary module (a copy) for inspection.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx

# Rematerialisation per layer (jax.checkpoint policies): what a layer's
# backward pass may keep from its forward pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every residual kept (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer inputs kept
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs kept
}


def check_remat(remat: str, platform: str | None = None) -> str:
    """A config's remat as a REMAT_POLICIES key. 'auto': 'dots' on a CPU, where
    recomputing each layer's elementwise work is faster than writing it out and reading
    it back (multi-scale step, batch 2 at 512x512: 9.0 -> 6.6 s; the quickstart's step
    0.59 -> 0.52 s; docs/benchmarks.md), 'none' on a GPU or TPU (not measured there).
    platform: jax.default_backend() unless given."""
    if remat == "auto":
        return "dots" if (platform or jax.default_backend()) == "cpu" else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: expected 'auto' or one of {tuple(REMAT_POLICIES)}, "
                         f"got {remat!r}")
    return remat


def _stack(*arrays):
    """Stacked on a new leading axis; on the host (no program to compile) but for RNG
    keys and traced arrays (a stack built under jit or eval_shape)."""
    if (jax.dtypes.issubdtype(arrays[0].dtype, jax.dtypes.prng_key)
            or isinstance(arrays[0], jax.core.Tracer)):
        return jax.numpy.stack(arrays)
    return jax.device_put(np.stack(arrays))


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Modules of one kind -> one module whose variables are theirs stacked (L, ...).

    Built from separately initialised modules, so a stack starts with exactly
    the weights the same modules built one after another would have.
    """
    state = jax.tree.map(_stack, *(nnx.state(m) for m in modules))
    stack = modules[0]
    nnx.update(stack, state)
    return stack


def stack_size(stack: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(stack))[0].shape[0]


def layer(stack: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of a stack as an ordinary module (a copy: writing to it
    leaves the stack unchanged)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))


def scan(stacks: tuple[nnx.Module, ...], body: Callable, carry, xs=None, *,
         layers: slice = slice(None), remat: str = "none"):
    """lax.scan of body(modules, carry, x) -> (carry, y) over the layers of stacks.

    stacks: stacks scanned together (a layer and its heads); body gets one
    layer of each as a tuple of modules. layers: which layers (every stack
    must have them). xs: a pytree with a leading axis of that many layers, or
    None. Returns (carry, ys), ys stacked on a leading axis. remat: a
    REMAT_POLICIES name.
    """
    split = [nnx.split(s) for s in stacks]
    graphdefs = [g for g, _ in split]
    states = [jax.tree.map(lambda x: x[layers], state) for _, state in split]

    def step(c, inputs):
        layer_states, x = inputs
        modules = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, layer_states))
        return body(modules, c, x)

    if check_remat(remat) != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(step, carry, (states, xs))
