"""Finding a config's dataset (data/catalog.py): missing names, the synthetic dataset on request."""

import pytest
import tensorflow_datasets as tfds

from ddetr_jax.data import catalog, prepare, synthetic

tfds.disable_progress_bar()
TINY = {"name": "shapes", "train_images": 2, "val_images": 1, "seed": 0}


def _params(synthetic_settings):
    return {k: synthetic_settings[k] for k in synthetic.SYNTHETIC_FIELDS}


def test_a_misspelt_name_is_an_error_naming_what_exists(tmp_path):
    """The quickstart's synthetic settings do not make a dataset under any other name."""
    catalog.ensure_synthetic(tmp_path, "shapes", **_params(TINY))
    with pytest.raises(FileNotFoundError) as error:
        catalog.open_split(tmp_path, "shapess", "train", TINY)
    message = str(error.value)
    assert "dataset 'shapess' not found in data_dir" in message and str(tmp_path) in message
    assert "holds shapes" in message and "data.synthetic.name='shapes'" in message
    assert not (tmp_path / "shapess").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        catalog.open_split(tmp_path / "nowhere", "shapes", "train")


def test_the_synthetic_dataset_follows_the_config(tmp_path):
    """A synthetic dataset made with other image counts or seed is rebuilt, not reused."""
    assert len(catalog.open_split(tmp_path, "shapes", "train", TINY)) == 2
    bigger = {**TINY, "train_images": 3, "val_images": 2}
    assert len(catalog.open_split(tmp_path, "shapes", "train", bigger)) == 3
    assert len(catalog.open_split(tmp_path, "shapes", "validation", bigger)) == 2
    dataset_dir = catalog.open_split(tmp_path, "shapes", "train", bigger).dataset_dir
    assert prepare.recorded_metadata(dataset_dir)["synthetic"] == _params(bigger)
    assert catalog.prepared_datasets(tmp_path) == ["shapes"]  # nothing left beside it


def test_a_dataset_that_is_not_synthetic_is_not_replaced(tmp_path):
    synthetic.write_dataset(tmp_path / "coco", 1, 1, seed=1)
    dataset_dir, _ = prepare.prepare(tmp_path / "coco", "mine", tmp_path / "tfds")
    with pytest.raises(ValueError, match="records no synthetic parameters"):
        catalog.open_split(tmp_path / "tfds", "mine", "train", {**TINY, "name": "mine"})
    assert "synthetic" not in prepare.recorded_metadata(dataset_dir)
    assert len(catalog.open_split(tmp_path / "tfds", "mine", "train", TINY)) == 1


def test_making_the_synthetic_dataset_prints_nothing_of_tfds(tmp_path, capsys):
    """A run's output stays its own: TFDS's banners and progress bars are held back."""
    tfds.display_progress_bar(True)
    try:
        catalog.ensure_synthetic(tmp_path, "shapes", **_params(TINY))
    finally:
        tfds.disable_progress_bar()
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == "", printed
