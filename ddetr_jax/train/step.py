"""The data-parallel train step: jax.jit + jax.shard_map over the ('data',) mesh.

(state, batch, rng) -> (state, metrics); parameters replicated, every device
takes its slice of the global batch, gradients and metrics averaged with
lax.pmean, num_boxes (the loss normaliser, as the authors' num_boxes) from
lax.psum. With scipy's matcher the step is two compiled programs with the
matching on the host between them (HostMatchedStep).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddetr_jax.losses import LossConfig, criterion, matching_costs
from ddetr_jax.matcher import scipy_assign
from ddetr_jax.ops.manual_axes import make_varying
from ddetr_jax.sharding import BATCH_KEYS, local_rows


class TrainState(NamedTuple):
    params: Any  # nested dict of arrays (sharding.split_model)
    opt_state: Any
    step: jax.Array  # () int32, counts applied updates


def init_state(params, tx, mesh: Mesh) -> TrainState:
    """Fresh state, replicated over the mesh (the layout the step returns, so
    the second call reuses the first call's compilation)."""
    # tx.init as one program: eagerly it compiles a zeros program per parameter shape.
    state = TrainState(params, jax.jit(tx.init)(params), np.zeros((), np.int32))
    # One buffer per leaf: leaves that are the same array object (optimizer
    # states may share constants) would otherwise be donated twice.
    state = jax.tree.map(lambda x: np.array(x, copy=True), state)
    return jax.device_put(state, NamedSharding(mesh, P()))


def _tree_norm(tree):
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _device_rng(rng, step):
    return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index("data"))


def _num_boxes(batch):
    """The mean number of real targets per device, at least 1 (the loss normaliser)."""
    devices = jax.lax.psum(1, "data")
    return jnp.maximum(
        jax.lax.psum(batch["target_valid"].sum(), "data").astype(jnp.float32) / devices, 1.0)


def _forward_fn(graphdef, rest, batch, device_rng, compute_dtype, remat: str):
    """params -> the model's outputs on this device's images, in float32 (dropout on)."""
    def forward(params):
        images = batch["images"]
        if compute_dtype is not None:
            params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
            images = images.astype(compute_dtype)
        model = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables: reseedable
        nnx.reseed(model, default=device_rng, policy="match_shape")  # a key per layer
        outputs = model(images, batch["pad_mask"], deterministic=False, remat=remat)
        return jax.tree.map(lambda x: x.astype(jnp.float32), outputs)
    return forward


def _varying_params(state: TrainState):
    """The parameters marked varying: their gradients are this device's own."""
    return jax.tree.map(lambda x: make_varying(x, ("data",)), state.params)


def _apply_gradients(state: TrainState, grads, loss, terms, num_boxes, tx, lr_schedule):
    """Averages this device's loss and gradients over the mesh and updates the state.

    Non-finite loss or gradients: the state is returned unchanged and
    metrics['nonfinite'] is 1.
    """
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


BATCH_SPEC = {k: P("data") for k in BATCH_KEYS}


def make_train_step(graphdef, rest, tx, lr_schedule, mesh: Mesh,
                    loss_config: LossConfig = LossConfig(), compute_dtype=None,
                    remat: str = "none"):
    """Builds the step.

    step(state, batch, rng) -> (state, metrics). batch: BATCH_KEYS arrays with
    the global batch on the leading axis (sharded or not); rng: a key. The
    state is donated. With compute_dtype=jnp.bfloat16 the backbone and
    transformer compute in bfloat16 on float32 parameters; sampling locations
    and losses stay float32. Non-finite loss or gradients: the update is
    skipped, the state returned unchanged, and metrics['nonfinite'] is 1
    (non-finite matching costs leave that image unmatched instead of raising,
    since its loss or gradients are then non-finite too and the step reports it).
    remat: rematerialisation of each transformer layer (stack.REMAT_POLICIES).

    solver 'scipy' (the default): a HostMatchedStep, two compiled programs
    with scipy's Hungarian algorithm between them on the host; no host
    callback inside a program, so JAX's persistent cache keeps both. solver
    'optax': one jitted program that matches on device.
    """
    loss_config = dataclasses.replace(loss_config, nonfinite_costs="unmatched")
    if loss_config.solver == "scipy":
        return HostMatchedStep(graphdef, rest, tx, lr_schedule, mesh, loss_config,
                               compute_dtype, remat)

    def per_device(state: TrainState, batch, rng):
        num_boxes = _num_boxes(batch)
        forward = _forward_fn(graphdef, rest, batch, _device_rng(rng, state.step), compute_dtype,
                              remat)

        def loss_fn(params):
            return criterion(forward(params), batch, num_boxes, loss_config)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(_varying_params(state))
        return _apply_gradients(state, grads, loss, terms, num_boxes, tx, lr_schedule)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), BATCH_SPEC, P()),
                            out_specs=(P(), P()))

    def step(state, batch, rng):
        return sharded(state, {k: batch[k] for k in BATCH_KEYS}, rng)

    return jax.jit(step, donate_argnums=(0,))


class HostMatchedStep:
    """The train step with scipy's Hungarian matching on the host, between two programs.

    forward (jitted): the model's outputs, the matching cost of every
        prediction set of every image (losses.matching_costs) and the
        backward pass's residuals (the pytree jax.vjp returns, one slot per
        device);
    host: scipy.optimize.linear_sum_assignment on this process's images, all
        sets of all images in one round trip;
    update (jitted): the losses under that matching, the backward pass from
        the residuals, the gradient mean and the optimizer update.
    Neither program holds a host callback, so JAX's persistent compilation
    cache keeps both (it refuses programs with callbacks), and nothing waits
    on the host inside a program (a callback can deadlock several CPU devices
    in one process). Same results as matching inside the step.
    """

    def __init__(self, graphdef, rest, tx, lr_schedule, mesh: Mesh, loss_config: LossConfig,
                 compute_dtype=None, remat: str = "none"):
        self.mesh = mesh
        self._residual_tree = None  # the vjp function's pytree structure, set when traced

        def forward(state: TrainState, batch, rng):
            fn = _forward_fn(graphdef, rest, batch, _device_rng(rng, state.step), compute_dtype,
                             remat)
            outputs, vjp_fn = jax.vjp(fn, _varying_params(state))
            residuals, self._residual_tree = jax.tree.flatten(vjp_fn)
            costs = matching_costs(outputs, batch, loss_config)
            slots = [make_varying(r, ("data",))[None] for r in residuals]  # (1, ...) per device
            return outputs, costs, slots

        def update(state: TrainState, batch, outputs, slots, matches):
            num_boxes = _num_boxes(batch)
            vjp_fn = jax.tree.unflatten(self._residual_tree, [r[0] for r in slots])
            (loss, terms), d_outputs = jax.value_and_grad(
                lambda o: criterion(o, batch, num_boxes, loss_config, matches),
                has_aux=True)(outputs)
            (grads,) = vjp_fn(d_outputs)
            return _apply_gradients(state, grads, loss, terms, num_boxes, tx, lr_schedule)

        data = P("data")
        self.forward = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), BATCH_SPEC, P()),
                                             out_specs=(data, data, data)))
        self.update = jax.jit(
            jax.shard_map(update, mesh=mesh, in_specs=(P(), BATCH_SPEC, data, data, data),
                          out_specs=(P(), P())), donate_argnums=(0,))

    def match(self, costs, batch, num_classes: int) -> list:
        """Host: [(B, Q_set, T) global costs] -> [(B, T) global int32 matches].

        Raises ValueError if a valid target's label is outside [0, num_classes):
        the model cannot predict it, so it would never be matched."""
        valid = local_rows(batch["target_valid"])
        labels = local_rows(batch["labels"])[valid]
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if outside.size:
            raise ValueError(f"label {int(outside[0])} in the batch lies outside [0, "
                             f"model.num_classes={num_classes}); its object would never be "
                             "matched")
        sharding = NamedSharding(self.mesh, P("data"))
        return [jax.make_array_from_process_local_data(
                    sharding, scipy_assign(local_rows(cost), valid, raise_on_nonfinite=False))
                for cost in costs]

    def lower(self, state: TrainState, batch, rng) -> "LoweredPair":
        """Both programs lowered for these arguments (compile-time measurements)."""
        batch = {k: batch[k] for k in BATCH_KEYS}
        forward = self.forward.lower(state, batch, rng)
        outputs, costs, slots = jax.eval_shape(self.forward, state, batch, rng)
        matches = [jax.ShapeDtypeStruct(c.shape[:1] + c.shape[2:], jnp.int32) for c in costs]
        return LoweredPair(forward, self.update.lower(state, batch, outputs, slots, matches))

    def __call__(self, state: TrainState, batch, rng):
        batch = {k: batch[k] for k in BATCH_KEYS}
        if not all(isinstance(v, jax.Array) for v in batch.values()):
            batch = jax.device_put(batch, NamedSharding(self.mesh, P("data")))
        outputs, costs, slots = self.forward(state, batch, rng)
        matches = self.match(costs, batch, outputs["pred_logits"].shape[-1])
        return self.update(state, batch, outputs, slots, matches)


class LoweredPair(NamedTuple):
    """HostMatchedStep's two programs, lowered; compile() compiles both."""

    forward: Any
    update: Any

    def compile(self):
        return self.forward.compile(), self.update.compile()
