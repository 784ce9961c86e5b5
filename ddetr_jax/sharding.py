"""Data parallelism over a 1-D ('data',) device mesh: the mesh, the model split
into what is trained and what is not, a process's batch as global arrays and
its rows of the results, read one step behind the device."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_KEYS = ("images", "pad_mask", "boxes_cxcywh", "labels", "target_valid")


def data_mesh(devices=None) -> Mesh:
    """1-D ('data',) mesh over every device of every process."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def split_model(model: nnx.Module):
    """model -> (graphdef, params, rest): trainable-type parameters apart from
    everything else (frozen batch-norm terms, RNG state). params is a pure
    nested dict of arrays, no nnx.Variable in it: a jitted step that returns
    ~1,000 Variables (parameters and the optimizer's two moments) spends ~9 ms
    of host time a step rebuilding them. nnx.merge(graphdef, params, rest)
    rebuilds the model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def shard_batch(batch, mesh: Mesh):
    """Process-local numpy training batch -> global arrays sharded over ('data',).

    Each process passes only its own share (global batch / process count).
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in BATCH_KEYS}


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its leading axis, in
    order (the rows this process contributed with make_array_from_process_local_data)."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # a replicated axis would repeat rows
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)


class ReadBehind:
    """Holds the device's results of one step until the next step is queued, so
    reading them (a device to host copy, then host work) never leaves the device
    idle. hold(*item) records the item held so far (record(*item)), then holds
    this one; read() records what it holds, if anything."""

    def __init__(self, record):
        self._record, self._held = record, None

    def hold(self, *item) -> None:
        self.read()
        self._held = item

    def read(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._record(*held)
