"""train.py as a user runs it: SIGKILL at any moment + rerun == an uninterrupted run;
SIGTERM saves a checkpoint before exiting. Subprocesses on 2 CPU devices."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddetr_jax.checkpoints.loading import restore_numpy
from ddetr_jax.checkpoints.store import Checkpoints
from tests.train_fixtures import train_py_setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 8

CONFIG = """
import sys
sys.path.insert(0, {root!r})
from tests.train_fixtures import load_config, make_tiny


def get_config():
    config = make_tiny(load_config({root!r} + "/configs/quickstart.py"), {data_dir!r},
                       batch=2, total_steps={total})
    config.model.dropout = 0.1  # the dropout RNG must resume too
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 0
    return config
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    config, env = train_py_setup(base, CONFIG.replace("{total}", str(TOTAL_STEPS)))
    return base, config, env


def _start(config, workdir, env):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--config={config}",
                             f"--workdir={workdir}"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def _params(workdir):
    step = Checkpoints(workdir, keep=1).latest_step()
    tree = restore_numpy(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")
    return step, jax.tree_util.tree_flatten_with_path(tree)[0]


def _train_records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def _wait_for_checkpoint(workdir, step, process, timeout=600):
    target = pathlib.Path(workdir) / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not target.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)


def test_sigkill_and_resume_equals_uninterrupted_run(setup):
    base, config, env = setup
    code, out = _finish(_start(config, base / "straight", env))
    assert code == 0, out
    killed = base / "killed"
    process = _start(config, killed, env)
    _wait_for_checkpoint(killed, 4, process)  # mid-run, maybe mid-save of a later step
    process.send_signal(signal.SIGKILL)
    assert _finish(process)[0] == -signal.SIGKILL
    code, out = _finish(_start(config, killed, env))
    assert code == 0, out
    assert "resumed from" in out
    step_a, params_a = _params(base / "straight")
    step_b, params_b = _params(killed)
    assert step_a == step_b == TOTAL_STEPS
    assert [p for p, _ in params_a] == [p for p, _ in params_b]
    for (path, a), (_, b) in zip(params_a, params_b):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    records_a, records_b = _train_records(base / "straight"), _train_records(killed)
    assert [r["step"] for r in records_b] == list(range(1, TOTAL_STEPS + 1))
    assert [r["train/loss"] for r in records_a] == [r["train/loss"] for r in records_b]


def test_sigterm_saves_a_checkpoint(setup):
    base, config, env = setup
    workdir = base / "terminated"
    process = _start(config, workdir, env)
    deadline = time.time() + 600
    while not (workdir / "metrics.jsonl").exists():  # the first step is done
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code, out = _finish(process)
    assert code == 128 + signal.SIGTERM, out
    assert "stopped by signal" in out
    saved = Checkpoints(workdir, keep=1).latest_step()
    assert saved is not None and saved < TOTAL_STEPS
    assert saved == _train_records(workdir)[-1]["step"]
