"""Benchmark: how long the train step takes to compile, per published variant.

For every published config (and the quickstart's model) at one bucket (batch
2 at 256x256 on one device, the config's loss and optimizer), the seconds to
trace and lower the jitted train step and the seconds XLA takes to compile it,
with the persistent compilation cache off. For the ++two-stage variant it also
compiles 1 + 1 layers and prints the 6+6 / 1+1 ratio: with the layers scanned
that ratio stays near 1.

    python benchmarks/compile.py [--variants two_stage quickstart] [--no-ratio]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import make_batch  # noqa: E402

from flax import nnx  # noqa: E402

from ddetr_jax.models import DeformableDETR  # noqa: E402
from ddetr_jax.optimizer import make_optimizer  # noqa: E402
from ddetr_jax.config.settings import resolve  # noqa: E402
from ddetr_jax.sharding import data_mesh, shard_batch, split_model  # noqa: E402
from ddetr_jax.train.step import init_state, make_train_step  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
COCO_TRAIN_IMAGES = 118_287  # sets only the epoch length, which compiling does not see
VARIANTS = {
    "single_scale": "r50_deformable_detr_single_scale.py",
    "single_scale_dc5": "r50_deformable_detr_single_scale_dc5.py",
    "multi_scale": "r50_deformable_detr.py",
    "box_refine": "r50_deformable_detr_plus_iterative_bbox_refinement.py",
    "two_stage": "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.py",
    "quickstart": "quickstart.py",
}


def load_config(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, VARIANTS[name]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def compile_seconds(config, size: int, **model_overrides) -> tuple[float, float]:
    """(trace + lower seconds, XLA compile seconds) of the config's train step
    (with scipy's matcher both programs of the HostMatchedStep)."""
    settings = resolve(config, num_train_examples=COCO_TRAIN_IMAGES)
    mc = dataclasses.replace(settings.model, **model_overrides)
    graphdef, params, rest = split_model(DeformableDETR(mc, rngs=nnx.Rngs(0)))
    tx, lr = make_optimizer(params, settings.optimizer)
    mesh = data_mesh(jax.devices()[:1])
    step = make_train_step(graphdef, rest, tx, lr, mesh, settings.loss)
    args = (init_state(params, tx, mesh), shard_batch(make_batch(size), mesh), jax.random.key(0))
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def breakdown(config, size: int) -> None:
    """Compile seconds of the train step's parts, each jitted alone (one device)."""
    import jax.numpy as jnp
    import optax

    from ddetr_jax.losses import criterion

    settings = resolve(config, num_train_examples=COCO_TRAIN_IMAGES)
    model = DeformableDETR(settings.model, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    data = {k: jnp.asarray(v) for k, v in make_batch(size).items()}
    tx, _ = make_optimizer(params, settings.optimizer)

    def forward(p):
        return nnx.merge(graphdef, p, rest, copy=True)(data["images"], data["pad_mask"])

    def backbone_loss(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        return sum(f.sum() for f in m.backbone(data["images"]))

    def model_loss(p):
        return sum(x.sum() for x in jax.tree.leaves(forward(p)))

    outputs = jax.eval_shape(forward, params)
    loss_config = dataclasses.replace(settings.loss, solver="optax")
    parts = {
        "backbone fwd+bwd": (jax.grad(backbone_loss), params),
        "model fwd": (forward, params),
        "model fwd+bwd (sum of outputs)": (jax.grad(model_loss), params),
        "matching + losses fwd+bwd (optax)": (
            jax.grad(lambda o: criterion(o, data, 1.0, loss_config)[0]),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), outputs)),
        "optimizer update": (lambda p, o: optax.apply_updates(p, tx.update(p, o, p)[0]),
                             params, tx.init(params)),
    }
    for name, (fn, *fn_args) in parts.items():
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*fn_args)
        t1 = time.perf_counter()
        lowered.compile()
        print(f"  {name:36s} lower {t1 - t0:6.1f} s  compile {time.perf_counter() - t1:6.1f} s",
              flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--solver", choices=("config", "scipy", "optax"), default="config",
                        help="the matcher (default: the config's)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also compile the parts of each variant's step alone")
    parser.add_argument("--no-ratio", action="store_true",
                        help="skip the 1 + 1 layer compile of the two-stage variant")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, batch 2 at "
          f"{args.size}x{args.size}, one device")
    print(f"{'variant':18s} {'layers':>7s} {'lower s':>8s} {'compile s':>10s} {'total s':>8s}")
    totals = {}
    for name in args.variants:
        config = load_config(name)
        if args.solver != "config":
            config.loss.solver = args.solver
        runs = [(config.model.enc_layers, config.model.dec_layers)]
        if name == "two_stage" and not args.no_ratio:
            runs.append((1, 1))
        for enc, dec in runs:
            lower, comp = compile_seconds(config, args.size, enc_layers=enc, dec_layers=dec)
            totals[(name, enc, dec)] = lower + comp
            print(f"{name:18s} {f'{enc}+{dec}':>7s} {lower:8.1f} {comp:10.1f} "
                  f"{lower + comp:8.1f}", flush=True)
        if args.breakdown:
            breakdown(config, args.size)
    if ("two_stage", 6, 6) in totals and ("two_stage", 1, 1) in totals:
        print(f"two_stage compile(6+6) / compile(1+1): "
              f"{totals[('two_stage', 6, 6)] / totals[('two_stage', 1, 1)]:.2f}")


if __name__ == "__main__":
    main()
