"""The training run (train/loop.py) in-process on the tiny synthetic dataset, 8 CPU devices."""

import json

import numpy as np
import pytest

from ddetr_jax.checkpoints.store import Checkpoints, SaveFailed
from ddetr_jax.config.run_config import ConfigMismatch
from ddetr_jax.train import loop
from tests.test_train_settings import CONFIGS
from tests.train_fixtures import TINY_DATA, load_config, make_tiny, prepare_tiny_data


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    prepare_tiny_data(path)
    return path


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", CONFIGS)
def test_published_configs_train(name, data_dir, tmp_path):
    config = make_tiny(load_config(f"configs/{name}.py"), data_dir)
    metrics = loop.train(config, tmp_path)
    records = _records(tmp_path)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) and r["train/nonfinite"] == 0 for r in train)
    if "two_stage" in name:
        assert "train/loss_ce_enc" in train[0]
    evals = [r for r in records if "eval/AP" in r]
    assert [r["step"] for r in evals] == [2]
    assert set(evals[0]) == {"step", "eval/AP", "eval/AP50", "eval/AP75", "eval/APs",
                             "eval/APm", "eval/APl", "eval/AR1", "eval/AR10", "eval/AR100"}
    assert metrics["num_images"] == TINY_DATA["val_images"]
    assert Checkpoints(tmp_path, keep=1).all_steps() == [2]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 32


def test_quickstart_config_trains_evaluates_and_resumes(data_dir, tmp_path):
    config = make_tiny(load_config("configs/quickstart.py"), data_dir, total_steps=4)
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 3
    loop.train(config, tmp_path)
    evals = [r for r in _records(tmp_path) if "eval/AP" in r]
    assert [r["step"] for r in evals] == [2, 4]
    best = max(evals, key=lambda r: (r["eval/AP"], r["step"]))["step"]
    checkpoints = Checkpoints(tmp_path, keep=1)
    assert checkpoints.best_step() == best
    assert checkpoints.all_steps() == sorted({3, 4, best})  # the latest 2 and the best
    assert loop.train(config, tmp_path) == {}  # finished: nothing to do
    config.total_steps = 6  # a longer run is a different schedule: refused...
    with pytest.raises(ConfigMismatch, match="total_steps: saved 4, now 6"):
        loop.train(config, tmp_path)
    loop.train(config, tmp_path, override_config=True)  # ...unless asked for
    train_steps = [r["step"] for r in _records(tmp_path) if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]


def test_consecutive_nonfinite_steps_stop_the_run(data_dir, tmp_path):
    config = make_tiny(load_config("configs/quickstart.py"), data_dir, total_steps=10)
    config.loss.bbox_weight = float("inf")  # every loss is inf
    config.max_consecutive_nonfinite = 3
    with pytest.raises(loop.NonFiniteError, match="step 3: 3 consecutive non-finite steps"):
        loop.train(config, tmp_path)
    records = _records(tmp_path)
    assert [r["train/nonfinite_total"] for r in records] == [1, 2]  # step 3 raised first
    assert Checkpoints(tmp_path, keep=1).all_steps() == []


def test_batch_that_does_not_split_over_devices(data_dir, tmp_path):
    config = make_tiny(load_config("configs/quickstart.py"), data_dir, batch=4)
    with pytest.raises(ValueError, match="global_batch_size=4 cannot be split evenly over 8 "
                                         "devices"):
        loop.train(config, tmp_path)


def test_too_few_classes_are_refused_before_the_run_writes_anything(data_dir, tmp_path):
    config = make_tiny(load_config("configs/quickstart.py"), data_dir)
    config.model.num_classes = 3
    with pytest.raises(ValueError, match=r"category ids \[.*\] lie outside \[0, "
                                         r"model.num_classes=3\)"):
        loop.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_missing_dataset_is_named(tmp_path):
    config = load_config("configs/r50_deformable_detr.py")
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset 'coco/2017' not found"):
        loop.train(config, tmp_path / "run")


def _stub_trainer(config, workdir):
    """A Trainer whose step leaves the state as it is: the loop without compilation."""
    trainer = loop.Trainer(config, workdir)
    trainer.step_fn = lambda state, batch, rng: (state, {"loss": np.float32(1.0),
                                                         "nonfinite": np.bool_(False)})
    return trainer


def test_restart_from_step_0_writes_each_step_once(data_dir, tmp_path):
    """An earlier attempt logged steps 1-4 but kept no checkpoint: its records move aside."""
    config = make_tiny(load_config("configs/quickstart.py"), data_dir, total_steps=2)
    config.eval_every_steps = 0
    earlier = [{"step": step, "train/loss": 9.0} for step in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    trainer = _stub_trainer(config, tmp_path)
    trainer.evaluate = lambda iteration, writer: None  # no evaluation: no compilation
    trainer.run()
    assert [(r["step"], r["train/loss"]) for r in _records(tmp_path)] == [(1, 1.0), (2, 1.0)]
    moved = (tmp_path / "metrics.jsonl.replaced-0").read_text().splitlines()
    assert [json.loads(line) for line in moved] == earlier


def test_failed_save_stops_the_run_at_once(data_dir, tmp_path, monkeypatch):
    """The loop asks every step whether a background save failed and stops then."""
    config = make_tiny(load_config("configs/quickstart.py"), data_dir, total_steps=6)
    config.checkpoint_every_steps = 2
    trainer = _stub_trainer(config, tmp_path)
    started, save = [], trainer.checkpoints.save

    def recording_save(iteration, *args, **kwargs):
        started.append(iteration)
        save(iteration, *args, **kwargs)

    def check_saves():
        if 4 in started:  # the save of step 4 failed in its background thread
            raise SaveFailed("could not write the checkpoint of step 4")

    monkeypatch.setattr(trainer.checkpoints, "save", recording_save)
    monkeypatch.setattr(trainer.checkpoints, "check_saves", check_saves)
    with pytest.raises(SaveFailed, match="step 4"):
        trainer.run()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]  # not one step more
