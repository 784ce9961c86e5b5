"""Test set-up: 8 simulated CPU devices for the multi-device tests.

Must run before JAX initialises its backends, hence the environment variable.
"""

import os

import pytest

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fast_compile():
    """Compile with most XLA optimisations off, for the modules that check behaviour,
    not speed (they request it with pytestmark)."""
    import jax
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
