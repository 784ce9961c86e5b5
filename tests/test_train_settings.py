"""Config -> typed settings, and the workdir's saved config (train/settings.py, run_config.py)."""

import json

import pytest

from ddetr_jax import optimizer
from ddetr_jax.config import run_config, settings
from ddetr_jax.config.defaults import base_config
from ddetr_jax.models.stack import check_remat
from tests.train_fixtures import load_config


def resolve(config, steps_per_epoch: int, **kwargs):
    """settings.resolve for a training split of exactly `steps_per_epoch` steps per
    epoch (buckets.steps_per_epoch inverted: each bucket may leave batch - 1 out)."""
    batch = config.global_batch_size
    examples = steps_per_epoch * batch + len(config.data.buckets) * (batch - 1)
    return settings.resolve(config, examples, **kwargs)

CONFIGS = ("r50_deformable_detr", "r50_deformable_detr_single_scale",
           "r50_deformable_detr_single_scale_dc5",
           "r50_deformable_detr_plus_iterative_bbox_refinement",
           "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage")
VARIANTS = {  # (num_feature_levels, dilation, with_box_refine, two_stage)
    CONFIGS[0]: (4, False, False, False), CONFIGS[1]: (1, False, False, False),
    CONFIGS[2]: (1, True, False, False), CONFIGS[3]: (4, False, True, False),
    CONFIGS[4]: (4, False, True, True)}


@pytest.mark.parametrize("name", CONFIGS)
def test_published_configs(name):
    s = resolve(load_config(f"configs/{name}.py"), steps_per_epoch=3665)
    m = s.model
    assert (m.num_feature_levels, m.dilation, m.with_box_refine, m.two_stage) == VARIANTS[name]
    assert (m.backbone_depth, m.dim, m.num_queries, m.num_classes) == (50, 256, 300, 91)
    assert s.train_batch.global_batch_size == 32 and s.seed == 42
    assert s.total_steps == 50 * 3665 and s.optimizer.lr_drop_step == 40 * 3665
    assert (s.optimizer.lr, s.optimizer.lr_backbone, s.optimizer.clip_max_norm) == (
        2e-4, 2e-5, 0.1)
    assert s.data.name == "coco/2017" and s.eval_every_steps == 3665
    assert s.eval_nms_iou == 0.0  # the authors' post-processing
    assert s.train_batch.transform.val_scale == 800 and s.train_batch.transform.max_size == 1333
    assert len(s.train_batch.buckets) == len(s.eval_batch.buckets) == 12
    assert s.train_batch.buckets != s.eval_batch.buckets


def test_quickstart_config():
    s = resolve(load_config("configs/quickstart.py"), steps_per_epoch=100)
    assert s.model.backbone_norm == "group_norm" and not s.optimizer.freeze_stem
    assert s.eval_nms_iou == 0.5
    assert (s.total_steps, s.optimizer.lr_drop_step, s.optimizer.warmup_steps) == (1500, 1325, 200)
    assert s.data.synthetic == {"name": "synthetic_shapes", "train_images": 2000,
                                "val_images": 200, "seed": 0}
    assert s.data.name == s.data.synthetic["name"]
    assert s.train_batch.num_classes == s.eval_batch.num_classes == 9  # labels checked
    assert s.eval_batch.buckets == s.train_batch.buckets == ((192, 256), (256, 192), (256, 256))
    assert s.remat == "dots"  # 'auto' on a CPU


def test_auto_remat_recomputes_elementwise_work_on_a_cpu_only():
    assert [check_remat("auto", p) for p in ("cpu", "gpu", "tpu")] == ["dots", "none", "none"]
    assert check_remat("full") == "full"
    with pytest.raises(ValueError, match="remat: expected 'auto' or one of"):
        check_remat("some")


def test_total_steps_override_scales_the_drop():
    c = base_config()
    c.total_steps, c.num_epochs, c.lr_drop_epochs = 1000, 50, 40
    s = resolve(c, 10)
    assert s.total_steps == 1000 and s.optimizer.lr_drop_step == 800
    c.lr_drop_step = 123
    assert resolve(c, 10).optimizer.lr_drop_step == 123


def test_step_schedule_drops_at_lr_drop_step_after_a_warmup():
    c = base_config()
    c.total_steps, c.lr_drop_step, c.optimizer.warmup_steps = 1000, 750, 200
    lr = optimizer.schedule(1.0, resolve(c, 10).optimizer)
    assert float(lr(100)) == pytest.approx(0.5) and float(lr(200)) == pytest.approx(1.0)
    assert float(lr(749)) == 1.0 and float(lr(750)) == pytest.approx(0.1)
    c.lr_drop_step = 200
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        resolve(c, 10)


def test_cosine_schedule_ends_at_total_steps():
    c = base_config()
    c.total_steps, c.optimizer.warmup_steps, c.optimizer.schedule = 1000, 100, "cosine"
    s = resolve(c, 10)
    assert s.optimizer.total_steps == 1000
    lr = optimizer.schedule(1.0, s.optimizer)
    assert float(lr(50)) == pytest.approx(0.5) and float(lr(100)) == pytest.approx(1.0)
    assert float(lr(550)) == pytest.approx(0.5) and float(lr(1000)) == pytest.approx(0.0)
    step = optimizer.schedule(1.0, resolve(base_config(), 10).optimizer)
    assert float(step(399)) == 1.0 and float(step(400)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        optimizer.schedule(1.0, optimizer.OptimizerConfig(schedule="cosine", total_steps=10,
                                                          warmup_steps=10))


@pytest.mark.parametrize("field,value,message", [
    ("global_batch_size", 0, "global_batch_size must be >= 1"),
    ("compute_dtype", "float16", "compute_dtype"),
    ("model.heads_typo", 3, "unknown fields"),
    ("optimizer.freeze_stem", False, "contradicts"),
    ("optimizer.schedule", "linear", "optimizer.schedule: expected one of"),
    ("eval_nms_iou", 1.0, "eval_nms_iou: expected 0"),
    ("eval_nms_iou", -0.1, "eval_nms_iou: expected 0"),
    ("data.synthetic.seed", 0, r"data.synthetic: expected the fields \['name'"),
    ("data.num_threads", -1, "data.num_threads must be >= 0"),
    ("data.num_workers", -2, "data.num_workers must be >= 0"),
])
def test_bad_configs(field, value, message):
    c = base_config()
    with c.unlocked():
        parent = c
        *path, leaf = field.split(".")
        for name in path:
            parent = parent[name]
        parent[leaf] = value
    with pytest.raises(ValueError, match=message):
        resolve(c, 10)


def test_batch_must_split_over_devices_and_processes():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 devices"):
        settings.check_devices(32, 3, "global_batch_size")
    c = base_config()
    with pytest.raises(ValueError, match="cannot be split evenly over 5 processes"):
        resolve(c, 10, process_count=5)


def test_saved_config_contradiction(tmp_path):
    c = base_config()
    run_config.check_and_save(c, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["num_queries"] == 300
    c.log_every_steps = 7  # observation only: allowed
    c.data.num_workers = 1
    run_config.check_and_save(c, tmp_path)
    c.model.num_queries = 100
    c.optimizer.lr = 1e-3
    with pytest.raises(run_config.ConfigMismatch) as error:
        run_config.check_and_save(c, tmp_path)
    assert "model.num_queries: saved 300, now 100" in str(error.value)
    assert "optimizer.lr: saved 0.0002, now 0.001" in str(error.value)
    assert "--override_config" in str(error.value)
    run_config.check_and_save(c, tmp_path, override=True)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["num_queries"] == 100
    assert json.loads((tmp_path / "config.1.json").read_text())["model"]["num_queries"] == 300


def test_published_buckets_hold_every_published_size():
    import numpy as np
    from ddetr_jax.data import buckets, transforms
    rng = np.random.default_rng(0)
    config = transforms.TransformConfig()
    c = base_config()
    originals = np.stack([rng.integers(100, 1200, 3000), rng.integers(100, 1200, 3000)], 1)
    train = [transforms.sample_train_geometry(rng, tuple(s), config).out_hw for s in originals]
    evals = [transforms.eval_geometry(tuple(s), config).out_hw for s in originals]
    buckets.assign_buckets(train, c.data.buckets)  # raises if a size fits no bucket
    buckets.assign_buckets(evals, c.data.eval_buckets)


def _config_flag(monkeypatch, path, *overrides):
    """The config train.py's --config=path ... would build (absl flags, ml_collections;
    it reads the overrides from sys.argv)."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["train.py", f"--config={path}", *overrides]
    monkeypatch.setattr("sys.argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=values)
    values(argv)
    return values.config


@pytest.mark.parametrize("name", sorted(p.stem for p in __import__("pathlib").Path(
    "configs").glob("*.py")))
def test_every_dataclass_field_is_settable_on_every_config(name, monkeypatch):
    """--config.SECTION.FIELD for every field of ModelConfig, OptimizerConfig, LossConfig
    and MatchWeights; the base config holds each at its dataclass default."""
    from ddetr_jax.config import defaults
    from ddetr_jax.losses import LossConfig
    from ddetr_jax.matcher import MatchWeights
    from ddetr_jax.models import ModelConfig
    sections = {"model": [ModelConfig], "optimizer": [optimizer.OptimizerConfig],
                "loss": [LossConfig, MatchWeights]}
    base = base_config()
    overrides, expected = [], {}
    for section, classes in sections.items():
        for cls in classes:
            for field, default in defaults.config_fields(cls).items():
                assert base[section][field] == default, f"{section}.{field}"
                value = not default if isinstance(default, bool) else (
                    default if isinstance(default, str) else default + 1)
                overrides.append(f"--config.{section}.{field}={value}")
                expected[f"{section}.{field}"] = value
    config = _config_flag(monkeypatch, f"configs/{name}.py", *overrides)
    for key, value in expected.items():
        section, field = key.split(".")
        assert config[section][field] == value, key


def test_a_field_added_since_a_run_started_is_its_default(tmp_path):
    """config.json of a run started before model.backbone_width existed: resuming it
    with the field at its default is no contradiction; at another value it is."""
    c = base_config()
    run_config.check_and_save(c, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["backbone_width"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run_config.check_and_save(c, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    c.model.backbone_width = 32
    with pytest.raises(run_config.ConfigMismatch, match="model.backbone_width: saved 64, now 32"):
        run_config.check_and_save(c, tmp_path)


def test_every_config_field_the_docs_name_exists():
    """--config.X in the README, docs/, configs/ and the library is a field users can set."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    files = [root / "README.md", *root.glob("docs/*.md"), *root.glob("configs/*.py"),
             *root.glob("ddetr_jax/**/*.py")]
    named = {m for f in files for m in re.findall(r"--config\.([a-z_][a-z_.]*[a-z_])",
                                                  f.read_text())}
    fields = set(run_config.flatten(run_config.as_json(load_config("configs/quickstart.py"))))
    fields |= set(run_config.flatten(run_config.as_json(base_config())))
    sections = {f.rsplit(".", 1)[0] for f in fields if "." in f}
    assert named and {n for n in named if n not in fields | sections} == set()
