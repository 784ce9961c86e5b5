"""Small models and batches shared by the training tests."""

import numpy as np
from flax import nnx

from ddetr_jax.models import DeformableDETR, ModelConfig

TINY = dict(backbone_depth=18, dim=64, ffn_dim=128, heads=4, enc_layers=1, dec_layers=2,
            num_queries=12, num_classes=8, dropout=0.0)


def tiny_model(**overrides):
    return DeformableDETR(ModelConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(0))


def random_batch(seed=0, batch=8, size=64, max_targets=6,
                 counts=(3, 0, 1, 6, 2, 4, 1, 2), num_classes=8):
    """A batch in the pipeline's format; image 1 has no targets, image 3 is full."""
    rng = np.random.default_rng(seed)
    counts = np.resize(np.asarray(counts), batch)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    pad_mask = np.zeros((batch, size, size), bool)
    pad_mask[1::2, size * 3 // 4:, :] = True
    pad_mask[2::3, :, size // 2:] = True
    images[pad_mask] = 0
    centres = rng.uniform(0.25, 0.75, (batch, max_targets, 2))
    sizes = rng.uniform(0.1, 0.4, (batch, max_targets, 2))
    valid = np.arange(max_targets)[None] < counts[:, None]
    return {
        "images": images, "pad_mask": pad_mask,
        "boxes_cxcywh": np.concatenate([centres, sizes], -1).astype(np.float32),
        "labels": rng.integers(1, num_classes, (batch, max_targets)).astype(np.int32),
        "target_valid": valid,
    }


# ----------------------------------------------------------------------------- training app

TINY_DATA = dict(name="tiny_shapes", train_images=24, val_images=8, seed=0)


def prepare_tiny_data(data_dir):
    """Writes and prepares the tiny synthetic dataset (TINY_DATA) in data_dir."""
    from ddetr_jax.data.catalog import ensure_synthetic
    ensure_synthetic(data_dir, TINY_DATA["name"], TINY_DATA["train_images"],
                     TINY_DATA["val_images"], TINY_DATA["seed"])


def train_py_setup(base, config_source: str, **env):
    """The tiny dataset in base/data, config_source (a format string of root and
    data_dir) written to base/tiny.py, and the environment of train.py subprocesses:
    2 CPU devices, fast compilation, the test run's compilation cache (conftest.py),
    then env.
    Returns (config path, environment)."""
    import os
    import pathlib
    root = str(pathlib.Path(__file__).resolve().parents[1])
    prepare_tiny_data(base / "data")
    config = base / "tiny.py"
    config.write_text(config_source.format(root=root, data_dir=str(base / "data")))
    return config, {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu",
                    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **env}


def load_config(path):
    """get_config() of a config file (as train.py's --config reads it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def make_tiny(config, data_dir, batch=8, total_steps=2):
    """Shrinks a training config in place for CPU tests: the tiny synthetic
    dataset in data_dir, 64-pixel images, a narrow shallow model with the
    config's variant (levels, dilation, refinement, two-stage) unchanged."""
    config.data.name = TINY_DATA["name"]
    config.data.data_dir = str(data_dir)
    config.data.synthetic.name = TINY_DATA["name"]
    config.data.synthetic.train_images = TINY_DATA["train_images"]
    config.data.synthetic.val_images = TINY_DATA["val_images"]
    config.data.synthetic.seed = TINY_DATA["seed"]
    config.data.buckets = ((64, 64),)
    config.data.eval_buckets = ()
    config.data.max_targets = 8
    config.data.scales = (40, 48)
    config.data.max_size = 60
    config.data.crop_resize_scales = (48,)
    config.data.crop_size = (32, 48)
    config.data.val_scale = 48
    config.data.num_workers = 0
    config.data.num_threads = 1
    config.model.update(dict(backbone_depth=18, dim=32, ffn_dim=64, heads=2, enc_layers=1,
                             dec_layers=1, enc_points=2, dec_points=2, num_queries=10))
    config.global_batch_size = batch
    config.eval_batch_size = batch
    config.total_steps = total_steps
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = total_steps
    return config
