"""Benchmark: seconds to build a model (initialise its parameters), cold and warm.

For every published variant and the quickstart model, a fresh process builds
the model twice over one new persistent compilation cache: first with the
cache empty (a new machine, a new notebook), then with it filled (a restart).
Prints the build's seconds, its programs and their XLA seconds (compiling, or
reading from the cache).

    python benchmarks/model_build.py [--variants two_stage quickstart]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from compile import VARIANTS, load_config  # noqa: E402


def build_once(variant: str) -> None:
    """In this process: builds the variant's model; prints seconds and compilations."""
    import jax
    from flax import nnx

    from ddetr_jax.compile_cache import enable_compilation_cache
    from ddetr_jax.config.settings import resolve
    from ddetr_jax.models import DeformableDETR

    enable_compilation_cache()
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiled.append(seconds)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    config = resolve(load_config(variant), num_train_examples=1000).model
    start = time.perf_counter()
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    print(f"{time.perf_counter() - start:.2f} {len(compiled)} {sum(compiled):.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--build-once", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_once:
        return build_once(args.build_once)
    print(f"{'variant':18s} {'cache':>6s} {'build s':>8s} {'programs':>9s} {'XLA s':>10s}")
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as cache:
            for state in ("empty", "filled"):
                out = subprocess.run(
                    [sys.executable, __file__, "--build-once", variant], check=True,
                    capture_output=True, text=True, env={**os.environ, "DDETR_JAX_CACHE": cache})
                seconds, programs, compile_seconds = out.stdout.split()[-3:]
                print(f"{variant:18s} {state:>6s} {float(seconds):8.2f} {int(programs):9d} "
                      f"{float(compile_seconds):10.2f}", flush=True)


if __name__ == "__main__":
    main()
