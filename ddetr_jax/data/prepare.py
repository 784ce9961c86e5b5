"""Prepares a COCO-format folder as a TFDS dataset in array_record format.

    python -m ddetr_jax.data.prepare --coco-dir DIR --name NAME --data-dir OUT [--overwrite]

DIR has the COCO 2017 layout (annotations/instances_<split>.json and one image
folder per split, DIR/<split>/). Every split found is written to
OUT/NAME/<version>/, readable with `tfds.builder_from_directory` (and by
`ddetr_jax.data.pipeline`). The report printed at the end lists the examples
per split and every skipped or repaired item with its file and reason; see
`ddetr_jax.data.coco_builder` for what is skipped and what is repaired. The
report is also saved in the dataset (prepare_report.json).

Preparing again: if OUT/NAME/<version> was prepared from the same source (the
same instances JSONs and image folder listings, see
`coco_builder.source_fingerprint`), nothing is written and the saved report is
shown; if the source changed, `DatasetExists` (exit 2) unless --overwrite,
which builds the new dataset beside the old one and replaces it when complete.
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

import tensorflow_datasets as tfds

from ddetr_jax.data import coco_builder

REPORT_FILE = "prepare_report.json"


class DatasetExists(ValueError):
    """The dataset folder holds a dataset prepared from another source."""


def recorded_metadata(dataset_dir) -> dict:
    """info.metadata of a prepared dataset ({} if it has none)."""
    return dict(tfds.builder_from_directory(str(dataset_dir)).info.metadata or {})


def _differing(recorded: dict, wanted: dict) -> list[str]:
    """The metadata keys of `wanted` whose recorded value differs."""
    return [key for key, value in wanted.items() if recorded.get(key) != value]


def _build(coco_dir, name, data_dir, workers, metadata):
    """Builds the dataset in data_dir (which must not hold it); returns (dir, report)."""
    builder = coco_builder.builder_class(name)(
        coco_dir=coco_dir, workers=workers, data_dir=data_dir, file_format="array_record",
        extra_metadata=metadata)
    with tempfile.TemporaryDirectory() as download_dir:  # nothing is downloaded
        builder.download_and_prepare(download_dir=download_dir)
    builder.report.save(pathlib.Path(builder.data_dir) / REPORT_FILE)
    return pathlib.Path(builder.data_dir), builder.report


def prepare(coco_dir, name, data_dir, workers=1, *, overwrite=False, metadata=None):
    """Writes DATA_DIR/NAME/<version>; returns (dataset directory, PrepareReport).

    metadata: more info.metadata entries to record (compared like the source).
    A dataset already there from the same source and metadata is kept (the
    report is its saved one, reused=True); one from another source raises
    DatasetExists, unless overwrite: then it is replaced once the new one is complete.
    """
    builder = coco_builder.builder_class(name)(coco_dir=coco_dir, workers=workers,
                                               data_dir=data_dir, extra_metadata=metadata)
    target = pathlib.Path(builder.data_dir)
    if not target.exists():
        dataset_dir, report = _build(coco_dir, name, data_dir, workers, metadata)
        return str(dataset_dir), report
    wanted = {"categories": builder.categories, "source": builder.source, **(metadata or {})}
    try:
        differing = _differing(recorded_metadata(target), wanted)
    except Exception as error:  # whatever makes it unreadable, it is not this source's
        differing = [f"unreadable ({type(error).__name__}: {error})"]
    if not differing:
        saved = target / REPORT_FILE
        return str(target), (coco_builder.PrepareReport.load(saved) if saved.is_file()
                             else coco_builder.PrepareReport(reused=True))
    if not overwrite:
        raise DatasetExists(
            f"{target} was prepared from another source (differing: {', '.join(differing)}; "
            f"the annotations or the image list of {coco_dir} changed since, or it came from "
            "elsewhere). Rerun with --overwrite to rebuild it, or choose another --name.")
    with tempfile.TemporaryDirectory(prefix=f".{name}-rebuild-", dir=target.parent) as staging:
        built, report = _build(coco_dir, name, staging, workers, metadata)
        shutil.rmtree(target)
        os.replace(built, target)
    return str(target), report


def _name(value):
    try:
        return coco_builder.check_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-dir", required=True, help="COCO-format folder to read")
    parser.add_argument("--name", required=True, type=_name,
                        help="dataset name (lower snake case)")
    parser.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes that read and check images")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset of that name prepared from another source")
    args = parser.parse_args(argv)
    try:
        dataset_dir, report = prepare(args.coco_dir, args.name, args.data_dir, args.workers,
                                      overwrite=args.overwrite)
    except (coco_builder.CocoFormatError, DatasetExists) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report.reused:
        print(f"{dataset_dir} was prepared from this source before (the same annotations and "
              "image list); nothing written. Its report:")
    else:
        print(f"wrote {dataset_dir}")
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
