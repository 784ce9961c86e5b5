"""Prepares a COCO-format folder as a TFDS dataset in array_record format.

    python -m ddetr_jax.data.prepare --coco-dir DIR --name NAME --data-dir OUT

DIR has the COCO 2017 layout (annotations/instances_<split>.json and one image
folder per split, DIR/<split>/). Every split found is written to
OUT/NAME/<version>/, readable with `tfds.builder_from_directory` (and by
`ddetr_jax.data.pipeline`). The report printed at the end lists the examples
per split and every skipped or repaired item with its file and reason; see
`ddetr_jax.data.coco_builder` for what is skipped and what is repaired.
"""

import argparse
import os
import sys
import tempfile

from ddetr_jax.data import coco_builder


def prepare(coco_dir, name, data_dir, workers=1):
    """Writes the dataset; returns (dataset directory, PrepareReport)."""
    builder = coco_builder.builder_class(name)(coco_dir=coco_dir, workers=workers,
                                               data_dir=data_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as download_dir:  # nothing is downloaded
        builder.download_and_prepare(download_dir=download_dir)
    return builder.data_dir, builder.report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-dir", required=True, help="COCO-format folder to read")
    parser.add_argument("--name", required=True, help="dataset name (lower snake case)")
    parser.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes that read and check images")
    args = parser.parse_args(argv)
    try:
        dataset_dir, report = prepare(args.coco_dir, args.name, args.data_dir, args.workers)
    except coco_builder.CocoFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {dataset_dir}")
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
