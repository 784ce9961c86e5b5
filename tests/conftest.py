"""Test set-up: 8 simulated CPU devices for the multi-device tests, and one
persistent compilation cache for the whole run.

Must run before JAX initialises its backends, hence the environment variables.
Many tests build the same programs (a model's parameter initialisers, a tiny
run of the quickstart config started, resumed and restarted, in-process and as
train.py): with one cache for every test, shared by the pytest-xdist workers
(they inherit this process's environment) and their subprocesses, and every
program cached as train.py caches it, each compiles once per run. The
cache is new for every run and removed after it, so no run depends on an
earlier one; tests/test_compile_cache.py uses a fresh directory of its own.
"""

import importlib.metadata
import os
import shutil
import tempfile

import pytest

RUN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(
    prefix="ddetr-jax-tests-cache-")
if RUN_CACHE is not None:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = RUN_CACHE
os.environ.setdefault("DDETR_JAX_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # as train.py
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")


def _jaxlib_before(major: int, minor: int) -> bool:
    version = importlib.metadata.version("jaxlib").split(".")
    return (int(version[0]), int(version[1])) < (major, minor)


# XLA:CPU's older elemental emitters for fusions: with most optimisations off (the
# tests that check behaviour, not speed) they compile ~40% faster (a tiny two-stage
# step on 8 devices: 13.6 -> 8.5 s); at the default optimisation they compile no faster
# and run that step slower (1.48 vs 1.24 s), so train.py does not use them. jaxlib 0.11
# removed the flag, and XLA aborts the process on a flag it does not know.
if _jaxlib_before(0, 11):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_fusion_emitters=false"]).strip()
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


def pytest_unconfigure(config):
    """The process that made the run's cache removes it, after its workers ended."""
    if RUN_CACHE is not None:
        shutil.rmtree(RUN_CACHE, ignore_errors=True)
