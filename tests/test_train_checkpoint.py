"""Checkpoints (latest k + best AP, exact round trip) and the metric writers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddetr_jax.train.checkpoint import Checkpoints
from ddetr_jax.train.metrics import IntervalMean, MetricsWriter


def _state(value):
    return {"params": {"w": jnp.full((3, 2), value, jnp.float32)},
            "step": jnp.asarray(int(value), jnp.int32)}


def test_keeps_latest_k_and_best(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=2)
    aps = {2: 0.30, 4: 0.55, 6: 0.40}
    for step in range(1, 9):
        metrics = {"eval/AP": aps[step]} if step in aps else None
        ckpt.save(step, _state(step), {"data_iterator": {"step": step}}, metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 7, 8]  # best (AP 0.55) and the latest two
    assert ckpt.best_step() == 4 and ckpt.latest_step() == 8
    state, extra = ckpt.restore(4, _state(0))
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 4, np.float32))
    assert extra == {"data_iterator": {"step": 4}}
    ckpt.close()


def test_restore_is_bitwise(tmp_path):
    values = jax.random.normal(jax.random.key(0), (5, 7))
    ckpt = Checkpoints(tmp_path, keep=1)
    ckpt.save(1, {"x": values}, {})
    ckpt.wait()
    restored, _ = Checkpoints(tmp_path, keep=1).restore(1, {"x": jnp.zeros((5, 7))})
    assert np.asarray(restored["x"]).tobytes() == np.asarray(values).tobytes()


def test_interval_mean():
    mean = IntervalMean()
    mean.add({"loss": np.float32(1.0), "n": 2})
    mean.add({"loss": np.float32(3.0), "n": 4})
    assert mean.pop() == {"loss": 2.0, "n": 3.0}
    mean.add({"loss": 5.0})
    assert mean.pop() == {"loss": 5.0}


def test_metrics_writer_records_and_resume(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": 1.0 / step, "bad": float("nan")})
    writer.write(3, "eval", {"AP": 0.5})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "train/loss": 1.0, "train/bad": "nan"}
    assert lines[-1] == {"step": 3, "eval/AP": 0.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # resuming from step 1: later records move aside, nothing is lost
    MetricsWriter(tmp_path, resume_step=1).close()
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    moved = (tmp_path / "metrics.jsonl.replaced-1").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1]
    assert [json.loads(line)["step"] for line in moved] == [2, 3, 3]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.write(1, "train", {"loss": 1.0})
    writer.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("keep", [0])
def test_keep_must_be_positive(tmp_path, keep):
    from ddetr_jax.train.defaults import base_config
    from ddetr_jax.train.settings import resolve
    c = base_config()
    c.keep_checkpoints = keep
    with pytest.raises(ValueError, match="keep_checkpoints"):
        resolve(c, steps_per_epoch=10)
