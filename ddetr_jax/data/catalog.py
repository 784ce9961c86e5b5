"""Finding a config's dataset: DATA_DIR/NAME/<version>, prepared on first use if synthetic.

    source = open_split(data_dir, name, "validation", synthetic={...} or None)
"""

from __future__ import annotations

import logging
import pathlib

from ddetr_jax.data import prepare, synthetic as synthetic_lib
from ddetr_jax.data.source import DetectionSource, latest_version_dir

log = logging.getLogger(__name__)


def ensure_synthetic(data_dir, name, train_images: int, val_images: int, seed: int):
    """Writes the synthetic dataset (COCO format, under DATA_DIR/NAME-coco) and
    prepares it as DATA_DIR/NAME unless a prepared version is already there.
    Returns the version folder."""
    base = pathlib.Path(data_dir).expanduser()
    try:
        return latest_version_dir(base, name)
    except FileNotFoundError:
        pass
    coco_dir = base / f"{name}-coco"
    log.info("preparing the synthetic dataset %s (%d train / %d validation images, seed %d) "
             "in %s", name, train_images, val_images, seed, base)
    synthetic_lib.write_dataset(coco_dir, train_images, val_images, seed)
    dataset_dir, report = prepare.prepare(str(coco_dir), name, str(base))
    log.info("%s", report.format())
    return pathlib.Path(dataset_dir)


def open_split(data_dir, name, split, synthetic: dict | None = None) -> DetectionSource:
    """The DetectionSource of DATA_DIR/NAME (latest version), split `split`.

    synthetic: {train_images, val_images, seed} to prepare the synthetic
    dataset there if it is missing (call on one process first, see loop.py).
    """
    if synthetic:
        dataset_dir = ensure_synthetic(data_dir, name, **synthetic)
    else:
        try:
            dataset_dir = latest_version_dir(data_dir, name)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"dataset {name!r} not found in data_dir {data_dir} ({error}); prepare it "
                "first (README: Data) or set --config.data.data_dir") from None
    source = DetectionSource(dataset_dir, split)
    if len(source) == 0:
        raise ValueError(f"{source}: the split is empty")
    return source
