"""A model from any checkpoint path: the one place that tells checkpoint kinds apart.

    model = load_model("runs/quickstart")                   # a training workdir: latest
    model = load_model("runs/quickstart", which="best")     # ... or its best by eval/AP
    model = load_model("runs/quickstart/checkpoints/450")   # one of its steps
    model = load_model("converted/r50")                     # python -m ddetr_jax.convert
    model = load_model("checkpoint0049.pth")                # authors' or HF PyTorch weights

KINDS lists what is read; the first kind that matches a path loads it. A
training workdir builds its model from WORKDIR/config.json; a converted
directory from its model_config.json; PyTorch weights through convert.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from ddetr_jax.checkpoints.store import (Checkpoints, corrupt_checkpoint, restore_numpy,
                                         steps_on_disk)
from ddetr_jax.config import run_config
from ddetr_jax.config.settings import model_config
from ddetr_jax.convert import NOT_IN_WEIGHTS, WEIGHTS, CheckpointMismatch, load_torch_checkpoint
from ddetr_jax.models import DeformableDETR, ModelConfig
from ddetr_jax.models.backbone import FrozenStat

WHICH = ("latest", "best")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Fields that do not change what a trained model computes at evaluation.
IGNORED_FIELDS = ("dropout",)


# ----------------------------------------------------------------------------- JAX trees

def restore_int_keys(template, restored):
    """orbax stores list indices as strings; follow the template's key types.

    Checkpoints written before the layers were stacked hold one subtree per
    layer ('0', '1', ...) where the model has one stacked subtree: those are
    stacked on load.
    """
    if isinstance(template, Mapping):
        if _per_layer(template, restored):
            restored = jax.tree.map(lambda *xs: np.stack(xs),
                                    *(restored[str(i)] for i in range(len(restored))))
        return {k: restore_int_keys(v, restored[str(k)] if str(k) in restored else restored[k])
                for k, v in template.items()}
    return restored


def _per_layer(template: Mapping, restored) -> bool:
    """True where the model has one stacked subtree and the checkpoint one per layer."""
    if not isinstance(restored, Mapping) or not restored or any(
            str(k).isdigit() for k in template):
        return False
    return set(map(str, restored)) == {str(i) for i in range(len(restored))}


def _fill(model: DeformableDETR, kind, values, where: str) -> None:
    """Writes `values` (a pure dict as orbax restored it) into the model's `kind`
    variables; CheckpointMismatch naming `where` if the trees differ."""
    state = nnx.state(model, kind)
    try:
        nnx.replace_by_pure_dict(state, restore_int_keys(nnx.to_pure_dict(state), values))
    except (KeyError, ValueError) as error:
        raise CheckpointMismatch(f"{where}: {error}") from error
    nnx.update(model, state)


# ----------------------------------------------------------------------------- converted

def _is_converted_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, "model_config.json"))


def load_converted(path) -> tuple[DeformableDETR, ModelConfig]:
    """(model, config) from what convert.save_converted wrote: model_config.json, state/."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "state")):
        raise CheckpointMismatch(f"{path}: has model_config.json but no state/ directory")
    with open(os.path.join(path, "model_config.json")) as f:
        config = ModelConfig(**json.load(f))
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    restored = restore_numpy(os.path.join(path, "state"))  # not onto the writer's devices
    _fill(model, WEIGHTS, restored, f"{path}: does not match its model_config.json")
    return model, config


# ----------------------------------------------------------------------------- workdirs

def split_workdir_path(path) -> tuple[pathlib.Path, int | None] | None:
    """(workdir, step or None) if `path` is a workdir or one of its checkpoints, else None."""
    path = pathlib.Path(path).expanduser().absolute()
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return path, None
    if (path.parent.name == "checkpoints" and path.name.isdigit()
            and (path.parent.parent / "config.json").is_file()):
        return path.parent.parent, int(path.name)
    return None


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


def _chosen_step(workdir: pathlib.Path, which: str) -> int:
    if which not in WHICH:
        raise ValueError(f"which: expected one of {WHICH}, got {which!r}")
    checkpoints = Checkpoints(workdir, keep=1, asynchronous=False)
    step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
    if step is None:
        raise CheckpointMismatch(f"{workdir}: no {'evaluated ' if which == 'best' else ''}"
                                 "checkpoint to load")
    return step


def load_workdir_model(path, which: str = "latest") -> tuple[DeformableDETR, dict]:
    """(model, {'workdir', 'step', 'config'}) from a workdir (its `which`
    checkpoint: 'latest' or 'best' by eval/AP) or from WORKDIR/checkpoints/STEP."""
    found = split_workdir_path(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not a training workdir (config.json and "
                                "checkpoints/) nor one of its checkpoints/STEP folders")
    workdir, step = found
    step = _chosen_step(workdir, which) if step is None else step
    directory = workdir / "checkpoints" / str(step)
    if not (directory / "state").is_dir():
        steps = steps_on_disk(workdir / "checkpoints")
        what = "no finished checkpoint" if directory.is_dir() else "no checkpoint"
        raise CheckpointMismatch(f"{directory}: {what} there; the run's checkpoints are "
                                 f"steps {steps or 'none'} (in {workdir / 'checkpoints'})")
    config = model_config(run_config.load(workdir))
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    where = f"{directory}: does not match the model of {workdir / 'config.json'}"
    _fill(model, nnx.Param, _unwrap_values(_read(directory / "state")["params"]), where)
    if (directory / "frozen").is_dir():
        _fill(model, FrozenStat, _read(directory / "frozen"), where)
    return model, {"workdir": str(workdir), "step": step, "config": config}


# ----------------------------------------------------------------------------- any path

def _hf_weight_file(path: str) -> str | None:
    found = [os.path.join(path, f) for f in HF_WEIGHT_FILES
             if os.path.isfile(os.path.join(path, f))]
    return found[0] if found else None


def _fixed_config(kind: str, load):
    """A loader for a kind that fixes its model config: model overrides are refused."""
    def loader(path, which, defaults, **model_overrides):
        if model_overrides:
            raise ValueError(f"{path}: {kind} fixes its model config; model overrides "
                             f"{sorted(model_overrides)} are not accepted")
        return load(path, which)
    return loader


def _torch_loader(weight_file):
    def loader(path, which, defaults, **model_overrides):
        return load_torch_checkpoint(weight_file(path), defaults, **model_overrides)[0]
    return loader


# (what it is, does `path` look like one, loader(path, which, defaults, **overrides) -> model);
# the first match loads.
KINDS = (
    ("a training workdir (config.json and checkpoints/, from train.py) or one of its "
     "checkpoints/STEP folders", lambda p: split_workdir_path(p) is not None,
     _fixed_config("a training workdir (config.json)",
                   lambda p, which: load_workdir_model(p, which)[0])),
    ("a converted checkpoint directory (model_config.json and state/, from "
     "python -m ddetr_jax.convert)", _is_converted_dir,
     _fixed_config("a converted checkpoint", lambda p, which: load_converted(p)[0])),
    ("a HuggingFace model directory (model.safetensors or pytorch_model.bin)",
     lambda p: os.path.isdir(p) and _hf_weight_file(p) is not None,
     _torch_loader(_hf_weight_file)),
    ("an authors' or HuggingFace weights file (.pth, .pt, .bin, .safetensors)",
     lambda p: os.path.isfile(p) and p.endswith(TORCH_SUFFIXES), _torch_loader(str)),
)


def load_model(path, defaults: Mapping | None = None, *, which: str = "latest",
               **model_overrides) -> DeformableDETR:
    """A DeformableDETR from any kind in KINDS.

    which: a training workdir's 'latest' or 'best' (by eval/AP) checkpoint.
    PyTorch checkpoints only: defaults are ModelConfig fields used where
    neither the weights nor the authors' args tell (convert.NOT_IN_WEIGHTS);
    model_overrides win over the args.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    for _, matches, load in KINDS:
        if matches(path):
            return load(path, which, defaults, **model_overrides)
    kinds = "\n  ".join(kind for kind, _, _ in KINDS)
    raise CheckpointMismatch(f"checkpoint: {path} is none of the kinds this package reads:"
                             f"\n  {kinds}")


def load_for_config(checkpoint, expected: ModelConfig, which: str = "latest"):
    """(model, step or None) from any checkpoint kind; CheckpointMismatch listing every
    ModelConfig field where the checkpoint's model differs from `expected` (which
    also supplies what PyTorch weights cannot tell)."""
    found = split_workdir_path(checkpoint)
    if found is not None:
        model, info = load_workdir_model(checkpoint, which)
    else:
        model = load_model(checkpoint, {k: getattr(expected, k) for k in NOT_IN_WEIGHTS})
    got = model.config
    diffs = [f"model.{f.name}: checkpoint {getattr(got, f.name)!r}, config "
             f"{getattr(expected, f.name)!r}" for f in dataclasses.fields(ModelConfig)
             if f.name not in IGNORED_FIELDS and getattr(got, f.name) != getattr(expected, f.name)]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {checkpoint} does not match the config:\n  "
                                 + "\n  ".join(diffs))
    return model, info["step"] if found is not None else None
