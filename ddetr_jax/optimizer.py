"""AdamW with the published parameter groups, clipping and step schedule.

Mirrors the authors' main.py: lr 2e-4, backbone 2e-5, parameters whose names
contain sampling_offsets or reference_points at lr * 0.1, weight decay 1e-4
on everything trained, global-norm clipping 0.1, lr * 0.1 at the drop step
(schedule='step'; 'cosine' decays to zero over total_steps instead, for short
runs such as the quickstart).
Frozen parameters (stem, layer1, when the backbone uses frozen batch norm:
freeze_stem) get no update and no optimizer state.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")
SCHEDULES = ("step", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop_step: int = 40
    warmup_steps: int = 0
    schedule: str = "step"  # or "cosine": base_lr -> 0 over total_steps, after the warmup
    total_steps: int = 0  # the cosine's end; set by the training settings
    freeze_stem: bool = True  # False for ModelConfig(backbone_norm="group_norm")

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule: expected one of {SCHEDULES}, "
                             f"got {self.schedule!r}")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"schedule 'cosine': total_steps ({self.total_steps}) must "
                             f"exceed warmup_steps ({self.warmup_steps})")
        if self.schedule == "step" and 0 < self.warmup_steps and (
                self.lr_drop_step <= self.warmup_steps):
            raise ValueError(f"schedule 'step': lr_drop_step ({self.lr_drop_step}) must "
                             f"exceed warmup_steps ({self.warmup_steps})")


def param_group(path: tuple, freeze_stem: bool = True) -> str:
    """'frozen', 'backbone', 'linear_proj' or 'default' for a module path.

    path: the parameter's path in the model's state, e.g.
    ('backbone', 'layers', 0, 1, 'conv1', 'conv', 'kernel').
    """
    names = [str(p) for p in path]
    if names[0] == "backbone":
        if freeze_stem and (names[1] == "stem" or names[1:3] == ["layers", "0"]):
            return "frozen"
        return "backbone"
    if any(proj in name for name in names for proj in LINEAR_PROJ_NAMES):
        return "linear_proj"
    return "default"


def schedule(base_lr: float, config: OptimizerConfig) -> optax.Schedule:
    """Optional linear warmup, then either base_lr and base_lr * 0.1 from
    lr_drop_step ('step'), or a cosine from base_lr at the end of the warmup
    to 0 at total_steps ('cosine'). Steps count from the start of training:
    join_schedules hands the second schedule the steps since the warmup."""
    after_warmup = max(config.warmup_steps, 0)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(base_lr, config.total_steps - after_warmup)
    else:
        decay = optax.piecewise_constant_schedule(
            base_lr, {config.lr_drop_step - after_warmup: 0.1})
    if config.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def group_labels(params, freeze_stem: bool = True):
    """The param_group of every leaf of the parameters (split_model's dict of arrays,
    or an nnx.State of Params), as a matching pytree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_group(tuple(getattr(k, "key", getattr(k, "idx", k))
                                          for k in path), freeze_stem), params)


def make_optimizer(params, config: OptimizerConfig = OptimizerConfig()):
    """Returns (optax transformation, default-group schedule) for the parameters
    (split_model's dict of arrays, or an nnx.State of Params)."""
    def adamw(lr):
        return optax.adamw(schedule(lr, config), weight_decay=config.weight_decay)

    groups = {
        "default": adamw(config.lr),
        "backbone": adamw(config.lr_backbone),
        "linear_proj": adamw(config.lr * config.lr_linear_proj_mult),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.chain(optax.clip_by_global_norm(config.clip_max_norm),
                     optax.multi_transform(groups, group_labels(params, config.freeze_stem)))
    return tx, schedule(config.lr, config)
