"""WORKDIR/config.json: the config a run was started with, checked on every resume.

A resumed run must train what the checkpoints were trained with. Fields that
change only how the run is observed or fed (MAY_CHANGE) may differ; any
other difference is a ConfigMismatch listing every field, unless the caller
overrides it (train.py --override_config), in which case the old file is kept
as config.<n>.json beside the new one. A field the saved file lacks (added to
the library after that run started) counts as its default, which that run used.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from flax import traverse_util

MAY_CHANGE = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "max_consecutive_nonfinite", "eval_batch_size", "data.num_workers", "data.num_threads",
    "data.prefetch", "data.data_dir", "remat"})


class ConfigMismatch(ValueError):
    """The workdir's saved config contradicts the new one."""


def flatten(tree: dict) -> dict:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1, "c": {}}."""
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True, sep=".")
    return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items()}


def differences(saved: dict, new: dict) -> list[str]:
    """'field: saved X, now Y' for every field outside MAY_CHANGE that differs."""
    old, cur = flatten(saved), flatten(new)
    out = []
    for key in sorted(set(old) | set(cur)):
        if key not in MAY_CHANGE and old.get(key, "<absent>") != cur.get(key, "<absent>"):
            out.append(f"{key}: saved {old.get(key, '<absent>')!r}, now "
                       f"{cur.get(key, '<absent>')!r}")
    return out


def load(workdir):
    """WORKDIR/config.json as a ConfigDict (tuples read back as lists)."""
    path = pathlib.Path(workdir) / "config.json"
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the run's config: {error}") from error


def data_differences(config, saved) -> list[str]:
    """differences() of the data sections only: what would make an evaluation read
    another dataset, or the same one otherwise, than the run's."""
    return differences({"data": as_json(saved)["data"]}, {"data": as_json(config)["data"]})


def as_json(config) -> dict:
    """A ConfigDict as plain JSON values (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def _with_defaults(saved: dict, new: dict) -> dict:
    """The saved config (flat), plus the fields of `new` it lacks at base_config()'s
    defaults."""
    from ddetr_jax.config.defaults import base_config
    base, old = flatten(as_json(base_config())), flatten(saved)
    return {**{k: base[k] for k in flatten(new) if k not in old and k in base}, **old}


def check_and_save(config, workdir, *, override: bool = False, write: bool = True) -> None:
    """Raises ConfigMismatch if WORKDIR/config.json contradicts `config` (unless
    override); writes `config` there (write: on one process only)."""
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    new = as_json(config)
    if path.exists():
        diffs = differences(_with_defaults(json.loads(path.read_text()), new), new)
        if diffs and not override:
            raise ConfigMismatch(
                f"{path} was saved by a run with a different config; resuming would mix "
                "them:\n  " + "\n  ".join(diffs) +
                "\nUse a new --workdir, or pass --override_config to continue with the new "
                "values.")
        if diffs and write:
            n = 1
            while (workdir / f"config.{n}.json").exists():
                n += 1
            path.rename(workdir / f"config.{n}.json")
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(new, indent=2) + "\n")
