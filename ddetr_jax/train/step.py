"""The data-parallel train step: jax.jit + jax.shard_map over the ('data',) mesh.

Pure function (state, batch, rng) -> (state, metrics); parameters
replicated, every device takes its slice of the global batch, gradients and
metrics averaged with lax.pmean, num_boxes from lax.psum (DESIGN.md 2-3).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddetr_jax.losses import LossConfig, criterion
from ddetr_jax.ops.manual_axes import make_varying

log = logging.getLogger(__name__)

BATCH_KEYS = ("images", "pad_mask", "boxes_cxcywh", "labels", "target_valid")


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    opt_state: Any
    step: jax.Array  # () int32, counts applied updates


def data_mesh(devices=None) -> Mesh:
    """1-D ('data',) mesh over every device of every process."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def split_model(model: nnx.Module):
    """model -> (graphdef, params, rest): trainable-type parameters apart from
    everything else (frozen batch-norm terms, RNG state)."""
    return nnx.split(model, nnx.Param, ...)


def init_state(params, tx, mesh: Mesh) -> TrainState:
    """Fresh state, replicated over the mesh (the layout the step returns, so
    the second call reuses the first call's compilation)."""
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    # One buffer per leaf: leaves that are the same array object (optimizer
    # states may share constants) would otherwise be donated twice.
    state = jax.tree.map(lambda x: np.array(x, copy=True), state)
    return jax.device_put(state, NamedSharding(mesh, P()))


def _tree_norm(tree):
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def matching_solver(loss_config: LossConfig, mesh: Mesh) -> LossConfig:
    """loss_config, with solver 'optax' where 'scipy' would hang.

    The scipy solver runs in a host callback whose inputs JAX first copies to
    the first CPU device; with several CPU devices in one process
    (JAX_NUM_CPU_DEVICES > 1) that copy can deadlock XLA's CPU runtime while
    the other devices execute (seen: the quickstart on 2 CPU devices hung at
    its first step). Such meshes match on device instead (same optimal
    assignment), with a warning.
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if loss_config.solver != "scipy" or len(local) < 2 or local[0].platform != "cpu":
        return loss_config
    log.warning("matching with optax's Hungarian algorithm on device instead of scipy: "
                    "%d CPU devices in this process (a host callback can deadlock there)",
                    len(local))
    return dataclasses.replace(loss_config, solver="optax")


def make_train_step(graphdef, rest, tx, lr_schedule, mesh: Mesh,
                    loss_config: LossConfig = LossConfig(), compute_dtype=None,
                    remat: str = "none"):
    """Builds the jitted step.

    step(state, batch, rng) -> (state, metrics). batch: BATCH_KEYS arrays with
    the global batch on the leading axis (sharded or not); rng: a key. The
    state is donated. With compute_dtype=jnp.bfloat16 the backbone and
    transformer compute in bfloat16 on float32 parameters; sampling locations
    and losses stay float32. Non-finite loss or gradients: the update is
    skipped, the state returned unchanged, and metrics['nonfinite'] is 1
    (non-finite matching costs leave that image unmatched instead of raising,
    since its loss or gradients are then non-finite too and the step reports it).
    Several CPU devices in one process match with optax (matching_solver).
    remat: rematerialisation of each transformer layer (stack.REMAT_POLICIES).
    """
    loss_config = dataclasses.replace(matching_solver(loss_config, mesh),
                                      nonfinite_costs="unmatched")
    def per_device(state: TrainState, batch, rng):
        device_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                                        jax.lax.axis_index("data"))
        devices = jax.lax.psum(1, "data")
        num_boxes = jnp.maximum(
            jax.lax.psum(batch["target_valid"].sum(), "data").astype(jnp.float32) / devices, 1.0)

        def loss_fn(params):
            images = batch["images"]
            if compute_dtype is not None:
                params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
                images = images.astype(compute_dtype)
            model = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables: reseedable
            nnx.reseed(model, default=device_rng, policy="match_shape")  # a key per layer
            outputs = model(images, batch["pad_mask"], deterministic=False, remat=remat)
            outputs = jax.tree.map(lambda x: x.astype(jnp.float32), outputs)
            return criterion(outputs, batch, num_boxes, loss_config)

        # Per-device gradients (params marked varying), then their mean.
        local_params = jax.tree.map(lambda x: make_varying(x, ("data",)), state.params)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
        grads = jax.lax.pmean(grads, "data")
        loss = jax.lax.pmean(loss, "data")
        num_matched = jax.lax.psum(terms.pop("num_matched"), "data")
        terms = jax.lax.pmean(terms, "data")
        grad_norm = _tree_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                               state.step + finite.astype(jnp.int32))
        metrics = {
            "loss": loss, **terms, "grad_norm": grad_norm,
            "param_norm": _tree_norm(new_state.params), "lr": lr_schedule(state.step),
            "num_matched": num_matched, "num_boxes": num_boxes,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    batch_spec = {k: P("data") for k in BATCH_KEYS}
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), batch_spec, P()),
                            out_specs=(P(), P()))

    def step(state, batch, rng):
        return sharded(state, {k: batch[k] for k in BATCH_KEYS}, rng)

    return jax.jit(step, donate_argnums=(0,))


def shard_batch(batch, mesh: Mesh):
    """Process-local numpy batch -> global arrays sharded over ('data',).

    Each process passes only its own share (global batch / process count).
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in BATCH_KEYS}
