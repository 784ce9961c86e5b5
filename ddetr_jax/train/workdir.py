"""Loading a model from a training workdir (train.py's --workdir).

    model, info = load_workdir_model("runs/quickstart")                # latest checkpoint
    model, info = load_workdir_model("runs/quickstart", which="best")  # best eval/AP
    model, info = load_workdir_model("runs/quickstart/checkpoints/450")

The model is built from WORKDIR/config.json and filled with the parameters
(and frozen batch-norm terms, if any) of the chosen checkpoint.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from flax import nnx

from ddetr_jax.convert import CheckpointMismatch, _restore_int_keys
from ddetr_jax.models import DeformableDETR, ModelConfig
from ddetr_jax.models.backbone import FrozenStat
from ddetr_jax.train.checkpoint import (Checkpoints, corrupt_checkpoint, restore_numpy,
                                        steps_on_disk)
from ddetr_jax.train.settings import model_config

WHICH = ("latest", "best")


def split_workdir_path(path) -> tuple[pathlib.Path, int | None] | None:
    """(workdir, step or None) if `path` is a workdir or one of its checkpoints, else None."""
    path = pathlib.Path(path).expanduser().absolute()
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return path, None
    if (path.parent.name == "checkpoints" and path.name.isdigit()
            and (path.parent.parent / "config.json").is_file()):
        return path.parent.parent, int(path.name)
    return None


def workdir_model_config(workdir) -> ModelConfig:
    config = ml_collections.ConfigDict(json.loads((pathlib.Path(workdir) / "config.json")
                                                  .read_text()))
    return model_config(config)


def _read(item_dir: pathlib.Path) -> dict:
    """restore_numpy(item_dir); CheckpointMismatch naming the damaged file if it fails."""
    try:
        return restore_numpy(item_dir)
    except Exception as error:  # orbax, tensorstore and json raise many types
        steps = steps_on_disk(item_dir.parent.parent)
        raise CheckpointMismatch(
            f"checkpoint damaged: {corrupt_checkpoint(item_dir, error)}; the run's "
            f"checkpoints are steps {steps} (pass another one as --checkpoint "
            f"{item_dir.parent.parent}/STEP)") from error


def _unwrap_values(tree):
    """An nnx.State as orbax stores it ({..., name: {'value': array}}) -> a pure dict."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree


def load_workdir_model(path, which: str = "latest") -> tuple[DeformableDETR, dict]:
    """(model, {'workdir', 'step', 'config'}) from a workdir (its `which`
    checkpoint: 'latest' or 'best' by eval/AP) or from WORKDIR/checkpoints/STEP."""
    found = split_workdir_path(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not a training workdir (config.json and "
                                "checkpoints/) nor one of its checkpoints/STEP folders")
    workdir, step = found
    if which not in WHICH:
        raise ValueError(f"which: expected one of {WHICH}, got {which!r}")
    if step is None:
        checkpoints = Checkpoints(workdir, keep=1, asynchronous=False)
        step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
        if step is None:
            raise CheckpointMismatch(f"{workdir}: no {'evaluated ' if which == 'best' else ''}"
                                     "checkpoint to load")
    directory = workdir / "checkpoints" / str(step)
    if not (directory / "state").is_dir():
        steps = steps_on_disk(workdir / "checkpoints")
        what = "no finished checkpoint" if directory.is_dir() else "no checkpoint"
        raise CheckpointMismatch(f"{directory}: {what} there; the run's checkpoints are "
                                 f"steps {steps or 'none'} (in {workdir / 'checkpoints'})")
    parts = [(nnx.Param, _unwrap_values(_read(directory / "state")["params"]))]
    if (directory / "frozen").is_dir():
        parts.append((FrozenStat, _read(directory / "frozen")))
    config = workdir_model_config(workdir)
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    for kind, values in parts:
        state = nnx.state(model, kind)
        try:
            nnx.replace_by_pure_dict(state, _restore_int_keys(nnx.to_pure_dict(state), values))
        except (KeyError, ValueError) as error:
            raise CheckpointMismatch(f"{directory}: does not match the model of "
                                     f"{workdir / 'config.json'}: {error}") from error
        nnx.update(model, state)
    return model, {"workdir": str(workdir), "step": step, "config": config}
