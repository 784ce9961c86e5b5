"""Checkpoints (latest k + best AP, exact round trip, damaged ones, failed saves) and the
metric writers."""

import json
import re
import resource
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ddetr_jax.checkpoints.store import Checkpoints, CorruptCheckpoint, SaveFailed
from ddetr_jax.train.loop import restore_newest
from ddetr_jax.train.step import TrainState
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


def test_checkpoint_of_variable_state_restores_into_pure_state(tmp_path):
    """Runs checkpointed before the state held pure arrays (nnx.Variables, stored as
    {'value': array}) resume: same values, in the pure layout the step takes."""
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    graphdef, variables = nnx.split(model, nnx.Param)
    tx = optax.multi_transform(  # masked states, as make_optimizer's: layer 1 is frozen
        {"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[1].key == 1 else "train", params))
    grads = jax.tree.map(jnp.ones_like, variables)
    old = TrainState(variables, tx.update(grads, tx.init(variables), variables)[1],
                     jnp.asarray(7, jnp.int32))
    ckpt = Checkpoints(tmp_path, keep=1)
    ckpt.save(7, old, {"data_iterator": {}})
    ckpt.wait()
    pure = nnx.to_pure_dict(variables)
    target = TrainState(jax.tree.map(jnp.zeros_like, pure), tx.init(pure),
                        jnp.zeros((), jnp.int32))
    restored, _ = Checkpoints(tmp_path, keep=1).restore(7, target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(old)):
        np.testing.assert_array_equal(got, want)
    adam = restored.opt_state.inner_states["train"].inner_state[0]
    assert float(jnp.abs(adam.mu["layers"][0]["kernel"]).sum()) > 0


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
    from ddetr_jax.config.defaults import base_config
    from ddetr_jax.config.settings import resolve
    c = base_config()
    c.keep_checkpoints = keep
    with pytest.raises(ValueError, match="keep_checkpoints"):
        resolve(c, num_train_examples=1000)


# ----------------------------------------------------------------------------- faults


def _two_checkpoints(workdir, asynchronous=True):
    """Checkpoints 6 and 12 of _state(6) and _state(12) in workdir."""
    ckpt = Checkpoints(workdir, keep=2, asynchronous=asynchronous)
    for step in (6, 12):
        ckpt.save(step, _state(step), {"data_iterator": {"step": step}})
    ckpt.wait()
    ckpt.close()
    return workdir / "checkpoints"


def _truncate_arrays(checkpoint):
    for path in (checkpoint / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # tensorstore's data files
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGES = {  # what the user did to checkpoint 12 -> what the message names
    "truncated arrays": (_truncate_arrays, r"12/state/d/\w+"),
    "garbage metadata": (lambda c: (c / "state" / "_METADATA").write_text("garbage{"),
                         r"12/state/_METADATA: JSONDecodeError"),
    "deleted _METADATA": (lambda c: (c / "state" / "_METADATA").unlink(),
                          r"12/state/_METADATA: no tree structure"),
    "deleted state/": (lambda c: shutil.rmtree(c / "state"), r"12/state: missing"),
    "garbage extra": (lambda c: (c / "extra" / "metadata").write_text("{x"),
                      r"12/extra/metadata: JSONDecodeError"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_checkpoint_is_set_aside(tmp_path, damage, caplog):
    """Resume takes checkpoint 6, names the file of 12 that failed and keeps 12 aside."""
    directory = _two_checkpoints(tmp_path)
    damage_fn, named = DAMAGES[damage]
    damage_fn(directory / "12")
    step, state, extra = restore_newest(Checkpoints(tmp_path, keep=2), _state(0))
    assert (step, extra) == (6, {"data_iterator": {"step": 6}})
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 6, np.float32))
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                 and r.name == "ddetr_jax.train.loop"]
    assert re.search(named, warning) and "checkpoint 12 skipped" in warning, warning
    assert (tmp_path / "checkpoints_corrupt" / "12").is_dir()  # kept, not deleted
    assert Checkpoints(tmp_path, keep=2).all_steps() == [6]


def test_no_checkpoint_restores_nothing_is_moved(tmp_path):
    directory = _two_checkpoints(tmp_path)
    for step in ("6", "12"):
        shutil.rmtree(directory / step / "state")
    with pytest.raises(CorruptCheckpoint, match=r"step 12: \S+12/state: missing\n  "
                                                r"step 6: \S+6/state: missing"):
        restore_newest(Checkpoints(tmp_path, keep=2), _state(0))
    assert Checkpoints(tmp_path, keep=2).all_steps() == [6, 12]


@pytest.fixture
def file_size_limit():
    """Files written by this process may not exceed 4 kB (EFBIG): a full disk for the
    checkpoint writer's background threads, without a small filesystem."""
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, previous[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, previous)
    signal.signal(signal.SIGXFSZ, handler)


def test_failed_background_save_is_reported_at_once(tmp_path, file_size_limit):
    """The save's own thread fails; check_saves (called every step) raises SaveFailed
    with the folder, the reason and the free space; checkpoint 1 is intact."""
    ckpt = Checkpoints(tmp_path, keep=1)
    big = {"w": jax.random.normal(jax.random.key(0), (50_000,))}
    ckpt.save(1, big, {"step": 1})
    ckpt.wait()
    file_size_limit()
    ckpt.save(2, big, {"step": 2})
    deadline = time.time() + 60
    with pytest.raises(SaveFailed) as failed:
        while time.time() < deadline:
            ckpt.check_saves()
            time.sleep(0.01)
    message = str(failed.value)
    assert f"checkpoint of step 2 to {tmp_path / 'checkpoints' / '2'}: " in message
    assert "File too large" in message and " free there" in message
    assert "intact (steps [1])" in message and "resume from step 1" in message
    restored, extra = Checkpoints(tmp_path, keep=1).restore(1, big)
    assert extra == {"step": 1}
    assert np.asarray(restored["w"]).tobytes() == np.asarray(big["w"]).tobytes()


def test_failed_save_call_is_one_error(tmp_path, monkeypatch):
    ckpt = Checkpoints(tmp_path, keep=1)
    ckpt.save(1, _state(1), {})
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(SaveFailed, match=r"step 2 to \S+: OSError: \[Errno 28\] No space "
                                         r"left on device \(\d.* free there\)"):
        ckpt.save(2, _state(2), {})


def test_restart_from_step_0_replaces_the_old_records(tmp_path):
    """A run that restarts from scratch (no checkpoint was kept) writes each step once."""
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write(step, "train", {"loss": 1.0})
    writer.close()
    writer = MetricsWriter(tmp_path, resume_step=0)
    writer.write(1, "train", {"loss": 2.0})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 2.0}]
    moved = (tmp_path / "metrics.jsonl.replaced-0").read_text().splitlines()
    assert [json.loads(line)["step"] for line in moved] == [1, 2, 3, 4]
    assert _tensorboard_purges(tmp_path / "tensorboard") == [1]  # the old steps >= 1 go


def _tensorboard_purges(directory) -> list[int]:
    """The purge steps (SessionLog START events) in the TensorBoard files of directory."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):  # TFRecord: length (8), crc (4), record, crc (4)
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps.append(event.step)
    return steps


def test_evaluation_names_the_damaged_file_and_the_steps(tmp_path):
    from ddetr_jax.convert import CheckpointMismatch
    from ddetr_jax.config.run_config import as_json
    from ddetr_jax.checkpoints.loading import load_workdir_model
    from tests.train_fixtures import load_config, make_tiny
    config = make_tiny(load_config("configs/quickstart.py"), tmp_path / "data")
    (tmp_path / "config.json").write_text(json.dumps(as_json(config)))
    directory = _two_checkpoints(tmp_path)
    (directory / "12" / "state" / "_METADATA").write_text("garbage{")
    with pytest.raises(CheckpointMismatch, match=r"12/state/_METADATA: no tree structure.*"
                                                 r"steps \[6, 12\]"):
        load_workdir_model(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"checkpoints/99: no checkpoint there; the "
                                                 r"run's checkpoints are steps \[6, 12\]"):
        load_workdir_model(tmp_path / "checkpoints" / "99")
