"""A second start compiles nothing: train.py and evaluate.py twice on one fresh cache.

Counted from JAX's own cache log (JAX_EXPLAIN_CACHE_MISSES logs every
persistent-cache miss by program name, and every program it refuses to
write), not from wall time.
"""

import pathlib
import re
import subprocess
import sys

import pytest

from tests.train_fixtures import train_py_setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'")
NOT_WRITTEN = re.compile(r"Not writing persistent cache entry for '([^']+)' because (.*)")

CONFIG = """
import sys
sys.path.insert(0, {root!r})
from tests.train_fixtures import load_config, make_tiny


def get_config():
    config = make_tiny(load_config({root!r} + "/configs/quickstart.py"), {data_dir!r},
                       batch=2, total_steps=2)
    config.model.dropout = 0.1
    return config
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    config, env = train_py_setup(base, CONFIG, DDETR_JAX_CACHE=str(base / "jax_cache"),
                                 JAX_EXPLAIN_CACHE_MISSES="1")
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # train.py's own setting
    return base, config, env


def _run(args, env):
    result = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    return MISS.findall(log), NOT_WRITTEN.findall(log)


def test_second_start_of_train_and_evaluate_compiles_nothing(setup):
    base, config, env = setup
    runs = []
    for workdir in ("first", "second"):  # the same run twice, from scratch
        train = _run(["train.py", f"--config={config}", f"--workdir={base / workdir}"], env)
        evaluate = _run(["evaluate.py", f"--config={config}", f"--checkpoint={base / workdir}",
                         f"--output={base / workdir / 'eval'}"], env)
        runs.append((train, evaluate))
    (first_train, first_eval), (second_train, second_eval) = runs
    assert any("forward" in name for name in first_train[0]), first_train[0]  # it did compile
    assert any("update" in name for name in first_train[0]), first_train[0]
    assert first_train[1] == [] and first_eval[1] == [], "programs the cache refused"
    assert second_train[0] == [], f"train.py compiled again: {second_train[0]}"
    assert second_eval[0] == [], f"evaluate.py compiled again: {second_eval[0]}"
