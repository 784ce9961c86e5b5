"""JAX's persistent compilation cache (DESIGN.md decision 4): each bucket compiles once
per machine, not once per run."""

import os

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "ddetr_jax", "jax_compilation_cache")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turns the cache on in `directory` (default $DDETR_JAX_CACHE or DEFAULT_DIR);
    returns the directory. Programs compiling in under a second are not cached."""
    directory = os.path.expanduser(directory or os.environ.get("DDETR_JAX_CACHE", DEFAULT_DIR))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory
