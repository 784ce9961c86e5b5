"""JAX's persistent compilation cache: each program compiles once per machine, not once per run.

train.py and evaluate.py turn it on. Every program they compile is cacheable:
the train step holds no host callback (JAX refuses to cache those; scipy's
matching runs between the step's two programs, train/step.py).
"""

import os

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "ddetr_jax", "jax_compilation_cache")
# Every program, however quick to compile (JAX's default skips those under 1 s):
# building a model runs its parameter initialisers as ~85 small programs of
# ~0.1 s each, 10 s per start on a 2-core CPU; cached (under 1 MB), 2 s.
MIN_COMPILE_SECONDS = 0.0


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turns the cache on in `directory` (default $DDETR_JAX_CACHE or DEFAULT_DIR);
    returns the directory. Every program is cached (MIN_COMPILE_SECONDS), unless
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
    directory = os.path.expanduser(directory or os.environ.get("DDETR_JAX_CACHE", DEFAULT_DIR))
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
