"""Training checkpoints: orbax CheckpointManager, async, the latest k plus the best by AP.

Async saves keep the step loop running while orbax writes. A checkpoint
(WORKDIR/checkpoints/<iteration>/) holds
  state   the TrainState (parameters, optimizer state, applied-update count)
  extra   JSON: the data iterator's state and the run's counters
  frozen  the frozen batch-norm terms (FrozenStat), when the model has them
          (from ImageNet weights), so the checkpoint alone rebuilds the model
and, when the checkpoint was taken right after an evaluation, its metrics
(used to keep the best by "eval/AP"). <iteration> counts the batches
consumed. The dropout RNG needs no saving: the step folds the seed with the
update count. The run's config is WORKDIR/config.json (see loop.py).
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "eval/AP"


def _best_metric(metrics) -> float:
    return float(metrics[BEST_METRIC])


class Checkpoints:
    """WORKDIR/checkpoints as an orbax CheckpointManager (see the module doc)."""

    def __init__(self, workdir, keep: int, asynchronous: bool = True):
        self.directory = pathlib.Path(workdir).expanduser().absolute() / "checkpoints"
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=_best_metric, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=preservation,
                                               best_fn=_best_metric,
                                               enable_async_checkpointing=asynchronous)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "extra", "frozen"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept checkpoint with the highest eval/AP (None if none was evaluated)."""
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, iteration: int, state, extra: dict, metrics: dict | None = None,
             frozen=None) -> None:
        """Starts an asynchronous save (returns once the state is copied off the
        devices). frozen: a pytree of the frozen terms, or None / empty for none."""
        metrics = None if metrics is None else {BEST_METRIC: float(metrics[BEST_METRIC])}
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if frozen is not None and jax.tree.leaves(frozen):
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.manager.save(iteration, args=ocp.args.Composite(**items), metrics=metrics,
                          force=True)

    def restore(self, iteration: int, target_state):
        """(state, extra) of checkpoint `iteration`, state laid out like `target_state`
        (same tree, shapes, dtypes and shardings)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self.manager.restore(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return restored.state, restored.extra

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
