"""Benchmark: bucket padding on COCO-like image sizes, and pipeline images/s.

1. Padding. Image sizes drawn from a model of COCO 2017's size statistics
   (below; not the real annotation file, which is not available offline) go
   through the training geometry (random scales, crop branch, max 1333) and the
   validation resize (800 / 1333). Buckets are chosen (buckets.choose_buckets,
   sides multiples of --multiple, default 32) on one sample and measured on another, against
   padding every image to one square shape, 1334x1334 (the authors' rounding
   lets the longer side of a very elongated image reach max_size + 1).
2. Speed. A COCO-format folder of JPEGs with those sizes is prepared as a TFDS
   dataset and the training pipeline (decode, augment, normalise, pad, batch)
   is timed in this process (1 and 2 reader threads) and with 1 and 2 worker
   processes.

    python benchmarks/input_pipeline.py [--images 160] [--batch-size 8] [--buckets 12 16]
        [--multiple 32] [--padding-only] [--exact]

--exact also proves the least padding any bucket set can reach on the
training sizes (optimal_padding: a mixed-integer program, ~80 s for 12
buckets at multiple 32 on 2 cores).

The COCO size model is common.coco_like_sizes.
"""

import argparse
import io
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import coco_like_sizes  # noqa: E402
from ddetr_jax.data import buckets as bucket_lib  # noqa: E402
from ddetr_jax.data import pipeline, prepare, transforms  # noqa: E402
from ddetr_jax.data.source import DetectionSource  # noqa: E402


def padding_report(bucket_counts, multiple, samples=20000):
    """Prints padded fractions and distinct shapes for each number of buckets;
    returns the training buckets of the first."""
    rng, config = np.random.default_rng(0), transforms.TransformConfig()
    print("| transform | buckets | padded, all 1334x1334 | padded, buckets | distinct shapes |")
    print("|---|---:|---:|---:|---:|")
    chosen = {}
    for train in (True, False):
        fit = bucket_lib.transformed_sizes(coco_like_sizes(rng, samples), config, train, rng)
        test = bucket_lib.transformed_sizes(coco_like_sizes(rng, samples), config, train, rng)
        for count in bucket_counts:
            buckets = bucket_lib.choose_buckets(fit, count, multiple=multiple)
            chosen.setdefault((train, count), buckets)
            used = len(np.unique(bucket_lib.assign_buckets(test, buckets)))
            print(f"| {'train' if train else 'validation'} | {count} "
                  f"| {bucket_lib.padded_fraction(test, [(1334, 1334)]):.1%} "
                  f"| {bucket_lib.padded_fraction(test, buckets):.1%} | {used} |")
    for (train, count), buckets in chosen.items():
        print(f"{'train' if train else 'validation'} buckets ({count}):",
              [tuple(b) for b in buckets.tolist()])
    return chosen[(True, bucket_counts[0])]


def optimal_padding(fit, num_buckets, multiple, time_limit):
    """The fewest padded pixels any num_buckets buckets (sides multiples of
    `multiple`) can give the sizes `fit`, by mixed-integer programming (scipy's
    HiGHS): binary y_b picks candidate buckets (buckets.candidate_buckets,
    which loses nothing), x_sb assigns each rounded size s to one
    picked bucket holding it, at cost count_s * area_b; at most num_buckets
    picked. Returns (buckets, scipy result): result.status 0 is proven optimal
    (within mip_rel_gap 1e-4), 1 hit the time limit."""
    from scipy import optimize, sparse
    cells, counts = np.unique(-(-fit // multiple) * multiple, axis=0, return_counts=True)
    candidates = bucket_lib.candidate_buckets(cells, multiple)
    cell, bucket = np.nonzero((cells[:, None, :] <= candidates[None]).all(-1))
    nx, ny = len(cell), len(candidates)
    pairs = np.arange(nx)
    cost = np.concatenate([counts[cell] * candidates[bucket].prod(1).astype(float), np.zeros(ny)])
    one_bucket_each = sparse.csr_matrix((np.ones(nx), (cell, pairs)), shape=(len(cells), nx + ny))
    only_picked = sparse.csr_matrix(
        (np.concatenate([np.ones(nx), -np.ones(nx)]),
         (np.concatenate([pairs, pairs]), np.concatenate([pairs, nx + bucket]))),
        shape=(nx, nx + ny))
    how_many = sparse.csr_matrix((np.ones(ny), (np.zeros(ny, int), nx + np.arange(ny))),
                                 shape=(1, nx + ny))
    result = optimize.milp(
        cost / cost.max(), integrality=np.concatenate([np.zeros(nx), np.ones(ny)]),
        bounds=optimize.Bounds(0, 1),
        constraints=[optimize.LinearConstraint(one_bucket_each, 1, 1),
                     optimize.LinearConstraint(only_picked, -np.inf, 0),
                     optimize.LinearConstraint(how_many, 0, num_buckets)],
        options=dict(time_limit=time_limit, mip_rel_gap=1e-4))
    return candidates[result.x[nx:] > 0.5], result


def exact_report(bucket_counts, multiple, time_limit, samples=20000):
    """Prints, for the training geometry, the proven least padding of each
    bucket count (on the fit sample and on a held-out one)."""
    rng, config = np.random.default_rng(0), transforms.TransformConfig()
    fit = bucket_lib.transformed_sizes(coco_like_sizes(rng, samples), config, True, rng)
    test = bucket_lib.transformed_sizes(coco_like_sizes(rng, samples), config, True, rng)
    for count in bucket_counts:
        start = time.perf_counter()
        best, result = optimal_padding(fit, count, multiple, time_limit)
        status = "proven optimal" if result.status == 0 else f"not proven ({result.message})"
        print(f"train, {count} buckets, multiple {multiple}: least padding "
              f"{bucket_lib.padded_fraction(fit, best):.2%} on the fit sample, "
              f"{bucket_lib.padded_fraction(test, best):.2%} held out; {status}, "
              f"{time.perf_counter() - start:.0f} s; buckets {[tuple(b) for b in best.tolist()]}")


def write_coco_folder(root, num_images, rng):
    """A COCO-format folder of smooth noisy JPEGs with COCO-like sizes and
    7 boxes each."""
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for index, (height, width) in enumerate(coco_like_sizes(rng, num_images)):
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (root / "train" / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
        images.append({"id": index + 1, "file_name": f"{index:06d}.jpg",
                       "height": int(height), "width": int(width)})
        for _ in range(7):
            w, h = rng.uniform(10, width / 2), rng.uniform(10, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))


def time_pipeline(source, sizes, config, num_workers, num_threads, num_batches):
    """Training images per second over num_batches after one warm-up batch."""
    dataset = pipeline.train_dataset(source, config, seed=0, num_epochs=10, sizes=sizes,
                                     num_workers=num_workers, num_threads=num_threads)
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return num_batches * config.global_batch_size / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--buckets", type=int, nargs="+", default=[12, 16])
    parser.add_argument("--multiple", type=int, default=32, help="bucket sides' multiple")
    parser.add_argument("--padding-only", action="store_true", help="skip the images/s part")
    parser.add_argument("--exact", action="store_true",
                        help="also solve for the least possible training padding (MILP)")
    parser.add_argument("--exact-time-limit", type=float, default=600.0)
    args = parser.parse_args()
    train_buckets = padding_report(args.buckets, args.multiple)
    if args.exact:
        exact_report(args.buckets, args.multiple, args.exact_time_limit)
    if args.padding_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_coco_folder(root / "coco", args.images, np.random.default_rng(1))
        dataset_dir, _ = prepare.prepare(root / "coco", "coco_like", root / "tfds")
        source = DetectionSource(dataset_dir, "train")
        start = time.perf_counter()
        sizes = pipeline.read_sizes(source)
        print(f"read_sizes: {len(sizes) / (time.perf_counter() - start):.0f} records/s")
        config = pipeline.BatchConfig(global_batch_size=args.batch_size,
                                      buckets=tuple(map(tuple, train_buckets.tolist())))
        for workers, threads in ((0, 1), (0, 2), (1, 1), (2, 1)):
            rate = time_pipeline(source, sizes, config, workers, threads, args.batches)
            print(f"workers={workers} threads={threads}: {rate:.1f} training images/s "
                  f"(batch {args.batch_size}, {args.batches} batches)")


if __name__ == "__main__":
    main()
