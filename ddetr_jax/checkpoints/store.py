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

Faults: a save that fails (full disk, lost mount), in the call or in the
background, raises SaveFailed naming the folder, the reason and the free
space; orbax deletes older checkpoints only after a save succeeded, so those
stay intact. A checkpoint that does not restore completely raises
CorruptCheckpoint naming the file and the error; set_aside moves it to
WORKDIR/checkpoints_corrupt/ (kept, never deleted).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "eval/AP"
CORRUPT_DIR = "checkpoints_corrupt"


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; the run must stop (earlier ones are intact)."""


class CorruptCheckpoint(ValueError):
    """A checkpoint that does not restore completely; the message names the file."""


def _best_metric(metrics) -> float:
    return float(metrics[BEST_METRIC])


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message', without tensorstore's long spec dump."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _first_unparsable_json(directory: pathlib.Path) -> pathlib.Path | None:
    """The first of orbax's JSON metadata files in `directory` (the files without a
    suffix) that does not parse: the file behind a JSONDecodeError, which does not
    name it."""
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.suffix:
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                return path
    return None


def corrupt_checkpoint(item_dir: pathlib.Path, error: Exception) -> CorruptCheckpoint:
    """CorruptCheckpoint naming the file behind `error` (else the item folder)."""
    if str(item_dir) in str(error):  # the error names it already
        return CorruptCheckpoint(describe_error(error))
    where = item_dir
    if isinstance(error, json.JSONDecodeError):
        where = _first_unparsable_json(item_dir) or item_dir
    return CorruptCheckpoint(f"{where}: {describe_error(error)}")


def _free_space(path: pathlib.Path) -> str:
    """Free space on the disk holding `path` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    return f"{free / 1e9:.2f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"


def steps_on_disk(directory) -> list[int]:
    """The steps of the checkpoint folders in `directory` (WORKDIR/checkpoints), sorted."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _tree_structure(checkpointer, directory):
    """The tree (of leaf metadata) of an orbax PyTree checkpoint, from its _METADATA."""
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not jax.tree.leaves(tree):
        raise FileNotFoundError(f"{pathlib.Path(directory) / '_METADATA'}: no tree structure "
                                "there (the file is missing or unreadable)")
    return tree


def _read_structure(directory):
    with ocp.PyTreeCheckpointer() as checkpointer:
        return _tree_structure(checkpointer, directory)


def _path_name(path) -> str:
    """'opt_state/1/mu/layers/0/kernel': dict keys, attribute names and indices alike
    (orbax names a NamedTuple's fields as dict keys)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _as_stored(abstract, item_dir: pathlib.Path):
    """`abstract` with each leaf that the checkpoint in item_dir stores as
    {'value': array} wrapped the same way. Checkpoints written while the state held
    nnx.Variables (before sharding.split_model returned pure dicts) store every
    parameter and optimizer moment so; later ones store the arrays themselves.
    An unreadable structure leaves `abstract` as it is (the restore names the damage)."""
    try:
        stored_tree = _read_structure(item_dir)
    except Exception:  # orbax, tensorstore and json raise many types
        return abstract
    # orbax stores an empty node (optax's MaskedNode) as None: kept as a leaf here
    stored = {_path_name(path) for path, _ in
              jax.tree_util.tree_flatten_with_path(stored_tree, is_leaf=lambda x: x is None)[0]}

    def empty(node):  # a node without children (MaskedNode), not a subtree of them
        structure = jax.tree.structure(node)
        return structure.num_leaves == 0 and structure.num_nodes == 1

    def wrap(path, leaf):
        name = _path_name(path)
        return {"value": leaf} if name not in stored and f"{name}/value" in stored else leaf
    return jax.tree_util.tree_map_with_path(wrap, abstract, is_leaf=empty)


def _check_readable(item_dir: pathlib.Path, read) -> None:
    """CorruptCheckpoint naming the file unless read(item_dir) succeeds."""
    try:
        read(item_dir)
    except Exception as error:  # orbax, tensorstore and json raise many types
        raise corrupt_checkpoint(item_dir, error) from error


def restore_numpy(directory) -> dict:
    """An orbax PyTree checkpoint as numpy arrays, whatever devices and processes
    wrote it (a run on 8 GPUs loads on one CPU)."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            _tree_structure(checkpointer, directory))
        return checkpointer.restore(directory, restore_args=args)


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
        self._saving = None  # the iteration of the last save started

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
        devices). frozen: a pytree of the frozen terms, or None / empty for none.
        Raises SaveFailed if this save, or the previous one, failed."""
        metrics = None if metrics is None else {BEST_METRIC: float(metrics[BEST_METRIC])}
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if frozen is not None and jax.tree.leaves(frozen):
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.wait()  # the previous save's failure, if any, is reported as its own
        self._saving = iteration
        try:
            self.manager.save(iteration, args=ocp.args.Composite(**items), metrics=metrics,
                              force=True)
        except Exception as error:  # any failure to write: disk full, permissions, lost mount
            raise self._save_failed(error) from error

    def check_saves(self) -> None:
        """Raises SaveFailed if a background save has failed; never blocks on one
        still running (call it every step)."""
        if not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until every started save is on disk; SaveFailed if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # raised by orbax's background thread, whatever it was
            raise self._save_failed(error) from error

    def _save_failed(self, error: Exception) -> SaveFailed:
        intact = steps_on_disk(self.directory)
        resume = (f"rerun the same command to resume from step {intact[-1]}" if intact
                  else "rerun the same command to start again")
        return SaveFailed(
            f"could not write the checkpoint of step {self._saving} to "
            f"{self.directory / str(self._saving)}: {describe_error(error)} "
            f"({_free_space(self.directory)} free there). Training stopped; the checkpoints "
            f"already written are intact (steps {intact or 'none'}). Free some space (or "
            f"fix the folder), then {resume}.")

    def restore(self, iteration: int, target_state):
        """(state, extra) of checkpoint `iteration`, state laid out like `target_state`
        (same tree, shapes, dtypes and shardings). CorruptCheckpoint (naming the file)
        unless every item restores and reads back as evaluate.py reads it."""
        directory = self.directory / str(iteration)
        for item in ("state", "extra"):
            if not (directory / item).is_dir():
                raise CorruptCheckpoint(f"{directory / item}: missing")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        state = self._restore_item(iteration, "state", ocp.args.StandardRestore(
            _as_stored(abstract, directory / "state")))
        state = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(state))
        extra = self._restore_item(iteration, "extra", ocp.args.JsonRestore())
        _check_readable(directory / "state", _read_structure)  # what evaluate.py reads
        if (directory / "frozen").is_dir():
            _check_readable(directory / "frozen", restore_numpy)
        return state, extra

    def _restore_item(self, iteration: int, item: str, args):
        try:
            return self.manager.restore(iteration, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as error:  # orbax, tensorstore and json raise many types
            raise corrupt_checkpoint(self.directory / str(iteration) / item, error) from error

    def set_aside(self, iteration: int) -> pathlib.Path:
        """Moves checkpoint `iteration` to WORKDIR/checkpoints_corrupt/ (one process
        only; then reload() on every process). Returns where it went."""
        aside = self.directory.parent / CORRUPT_DIR
        aside.mkdir(exist_ok=True)
        target, n = aside / str(iteration), 1
        while target.exists():
            target, n = aside / f"{iteration}.{n}", n + 1
        (self.directory / str(iteration)).rename(target)
        return target

    def reload(self) -> None:
        """Rereads the steps on disk (after set_aside)."""
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
