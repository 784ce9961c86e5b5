"""Finding a config's dataset: DATA_DIR/NAME/<version>; the synthetic one made on request.

    source = open_split(data_dir, name, "validation", synthetic={...} or None)

A missing dataset is an error naming the name, the folder and the datasets
that folder holds. The synthetic dataset is made only when the config asks
for it by name (data.synthetic.name == data.name): a misspelt data.name is
an error, never a synthetic dataset under that name. A synthetic dataset
records its parameters (train_images, val_images, seed) in its metadata; one
made with other parameters than the config's is rebuilt, without TensorFlow
Datasets' progress bars and banners (the run says what it makes, then its report).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import sys
import tempfile

from ddetr_jax.data import prepare, synthetic as synthetic_lib
from ddetr_jax.data.source import DetectionSource, latest_version_dir

log = logging.getLogger(__name__)


def prepared_datasets(data_dir) -> list[str]:
    """The names of the datasets prepared under data_dir ("NAME" or "NAME/CONFIG"),
    sorted: the folders holding a <version>/dataset_info.json."""
    base = pathlib.Path(data_dir).expanduser()
    names = {info.parent.parent.relative_to(base).as_posix()
             for pattern in ("*/*/dataset_info.json", "*/*/*/dataset_info.json")
             for info in base.glob(pattern)}
    return sorted(names)


def missing_dataset_error(data_dir, name, synthetic: dict | None) -> FileNotFoundError:
    """The error for a dataset not found: the name, the folder and what it holds."""
    base = pathlib.Path(data_dir).expanduser()
    if not base.is_dir():
        holds = "does not exist"
    else:
        found = prepared_datasets(base)
        holds = f"holds {', '.join(found)}" if found else "holds no prepared dataset"
    hint = ("prepare it first (README: Data) or set --config.data.name / "
            "--config.data.data_dir")
    if synthetic:
        hint += (f"; the synthetic dataset is made only under data.synthetic.name="
                 f"{synthetic['name']!r}")
    return FileNotFoundError(f"dataset {name!r} not found in data_dir {base} (it {holds}); "
                             f"{hint}")


def ensure_synthetic(data_dir, name, train_images: int, val_images: int, seed: int):
    """DATA_DIR/NAME's version folder, holding the synthetic dataset of these parameters.

    Writes and prepares it if missing, rebuilds it if it was made with other
    parameters; refuses (ValueError) to replace a dataset that is not synthetic.
    """
    base = pathlib.Path(data_dir).expanduser()
    wanted = {"train_images": int(train_images), "val_images": int(val_images),
              "seed": int(seed)}
    try:
        existing = latest_version_dir(base, name)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        recorded = prepare.recorded_metadata(existing).get("synthetic")
        if recorded == wanted:
            return existing
        if recorded is None:
            raise ValueError(f"{existing} records no synthetic parameters (prepared from a "
                             "COCO folder, or by an older ddetr_jax), so data.synthetic.name="
                             f"{name!r} will not replace it: remove that folder to have it "
                             "rebuilt, or choose another data.synthetic.name and data.name")
        log.info("%s holds the synthetic dataset %s; the config asks for %s: rebuilding it",
                 existing, recorded, wanted)
    log.info("preparing the synthetic dataset %s (%d train / %d validation images, seed %d) "
             "in %s", name, train_images, val_images, seed, base)
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-coco-", dir=base) as coco_dir, \
            _console_kept() as console:
        synthetic_lib.write_dataset(coco_dir, train_images, val_images, seed)
        dataset_dir, report = prepare.prepare(coco_dir, name, str(base), overwrite=True,
                                              metadata={"synthetic": wanted})
        console.truncate(0)
    log.info("%s", report.format())
    return pathlib.Path(dataset_dir)


@contextlib.contextmanager
def _console_kept():
    """Holds what is printed to stdout and stderr inside; written to stderr at the
    end unless the body empties it (truncate(0)), so a failure shows it all."""
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            yield console
    finally:
        sys.stderr.write(console.getvalue())


def open_split(data_dir, name, split, synthetic: dict | None = None) -> DetectionSource:
    """The DetectionSource of DATA_DIR/NAME (latest version), split `split`.

    synthetic: {name, train_images, val_images, seed}: if its name is `name`,
    the synthetic dataset is made or rebuilt there as needed (ensure_synthetic;
    call on one process first, see loop.py); otherwise it is not used.
    """
    if synthetic and synthetic["name"] == name:
        dataset_dir = ensure_synthetic(data_dir, name,
                                       **{k: synthetic[k] for k in synthetic_lib.SYNTHETIC_FIELDS})
    else:
        try:
            dataset_dir = latest_version_dir(data_dir, name)
        except FileNotFoundError:
            raise missing_dataset_error(data_dir, name, synthetic) from None
    source = DetectionSource(dataset_dir, split)
    if len(source) == 0:
        raise ValueError(f"{source}: the split is empty")
    return source
