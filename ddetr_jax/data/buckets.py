"""Static (H, W) buckets: which bucket holds an image, and choosing a bucket set.

    python -m ddetr_jax.data.buckets NAME --data_dir DIR [--num_buckets 12] [--scales ...]
prints the buckets for a prepared dataset's image sizes (after the training
geometry and the validation resize of the given transform; default the
published one) as config lines, with the padding they leave.

Every image is padded bottom/right to the smallest
(by area) configured bucket that holds it, so the model compiles once per
bucket instead of once per image size, and far less is padded than with one
max_size x max_size shape.
"""

import argparse
import dataclasses
import sys

import numpy as np

from ddetr_jax.data.transforms import TransformConfig, eval_geometry, sample_train_geometry


# 12 (H, W) buckets for the 800..1333 recipe: the least-padding set of 12 (sides multiples
# of 32) for the COCO-like training sizes of benchmarks/input_pipeline.py, proven optimal
# by its --exact program (16.1% padding held out; docs/benchmarks.md).
PUBLISHED_BUCKETS = (
    (544, 640), (736, 640), (576, 768), (896, 672), (640, 864), (800, 832), (704, 960),
    (1024, 800), (768, 1024), (800, 1152), (800, 1344), (1344, 800))
# The same for the validation resize (800 / 1333): 2.3% padding.
PUBLISHED_EVAL_BUCKETS = (
    (800, 800), (800, 928), (640, 1344), (1344, 640), (800, 1088), (1088, 800), (800, 1216),
    (1216, 800), (768, 1344), (1344, 768), (800, 1344), (1344, 800))


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """What shapes a batch: global batch size, buckets, targets, transforms, and the
    model's num_classes that every label must be below (None: not checked)."""

    global_batch_size: int
    buckets: tuple  # ((height, width), ...)
    max_targets: int = 100
    transform: TransformConfig = TransformConfig()
    num_classes: int | None = None


def steps_per_epoch(num_examples, config):
    """Training steps in every epoch: every bucket's last batch may be incomplete, so
    K buckets leave up to K * (batch - 1) examples out of an epoch (data/pipeline.py
    plans it); raises if < 1."""
    batch, num_buckets = config.global_batch_size, len(config.buckets)
    steps = -(-(num_examples - num_buckets * (batch - 1)) // batch)
    if steps < 1:
        raise ValueError(f"{num_examples} examples cannot fill a batch of {batch} in every "
                         f"epoch with {num_buckets} buckets; use fewer buckets or a smaller batch")
    return steps


def sort_buckets(buckets):
    """(K, 2) int array of (height, width), sorted by area then height; checks shape."""
    buckets = np.asarray(buckets, np.int64).reshape(-1, 2)
    if buckets.size == 0 or (buckets <= 0).any():
        raise ValueError(f"buckets must be positive (height, width) pairs, got {buckets.tolist()}")
    order = np.lexsort((buckets[:, 0], buckets[:, 0] * buckets[:, 1]))
    return buckets[order]


def assign_buckets(sizes_hw, buckets):
    """Index (into sort_buckets(buckets)) of the smallest bucket holding each
    size: sizes_hw (N, 2) -> (N,) int64. Raises ValueError if a size fits none."""
    buckets = sort_buckets(buckets)
    sizes = np.asarray(sizes_hw, np.int64).reshape(-1, 2)
    fits = (sizes[:, None, :] <= buckets[None, :, :]).all(axis=-1)  # (N, K)
    if not fits.any(axis=1).all():
        too_big = sizes[~fits.any(axis=1)][0].tolist()
        raise ValueError(f"an image of size {too_big} (HxW) fits no bucket of "
                         f"{buckets.tolist()}; add a bucket at least that large")
    return fits.argmax(axis=1)  # the first fitting bucket is the smallest


def padded_fraction(sizes_hw, buckets):
    """Fraction of the pixels of the padded images that is padding."""
    sizes = np.asarray(sizes_hw, np.int64).reshape(-1, 2)
    chosen = sort_buckets(buckets)[assign_buckets(sizes, buckets)]
    return 1.0 - sizes.prod(axis=1).sum() / chosen.prod(axis=1).sum()


def _total_waste(waste, counts, chosen):
    """Padded pixels of the sample with the bucket set `chosen` (candidate indices)."""
    return (waste[:, chosen].min(axis=1) * counts).sum()


def _search(waste, counts, chosen, num_buckets, passes):
    """Greedy additions up to num_buckets, then local search; `waste` (U, C) may hold
    inf (does not fit). Returns the chosen candidate indices."""
    chosen = list(chosen)
    while len(chosen) < num_buckets:
        current = waste[:, chosen].min(axis=1) if chosen else np.full(len(waste), np.inf)
        totals = (np.minimum(current[:, None], waste) * counts[:, None]).sum(axis=0)  # (C,)
        if chosen and totals.min() >= (current * counts).sum():
            break
        chosen.append(int(np.argmin(totals)))
    for _ in range(passes):
        before = _total_waste(waste, counts, chosen)
        for slot in range(len(chosen)):
            rest = chosen[:slot] + chosen[slot + 1:]
            others = waste[:, rest].min(axis=1) if rest else np.full(len(waste), np.inf)
            totals = (np.minimum(others[:, None], waste) * counts[:, None]).sum(axis=0)
            chosen[slot] = int(np.argmin(totals))
        if _total_waste(waste, counts, chosen) >= before:
            break
    return chosen


def _cover(rounded, candidates, chosen, rounds=10):
    """Makes a bucket set hold every size: each size goes to the bucket whose
    (height, width) envelope with it is smallest, and each bucket becomes the
    envelope of its sizes, until stable. Returns candidate indices."""
    buckets = candidates[chosen]  # (K, 2)
    for _ in range(rounds):
        envelopes = np.maximum(buckets[None], rounded[:, None])  # (U, K, 2)
        assign = envelopes.prod(axis=-1).argmin(axis=1)  # (U,)
        grown = np.array([rounded[assign == k].max(axis=0) if (assign == k).any() else b
                          for k, b in enumerate(buckets)])
        if (grown == buckets).all():
            break
        buckets = grown
    return [int(np.flatnonzero((candidates == b).all(axis=1))[0]) for b in buckets]


def candidate_buckets(sizes_hw, multiple):
    """Every (height, width) pair of the sizes' heights and widths rounded up to
    `multiple`: (C, 2). A bucket set can always shrink to such pairs (to the
    largest height and width it holds) without losing a size."""
    rounded = -(-np.asarray(sizes_hw, np.int64).reshape(-1, 2) // multiple) * multiple
    heights, widths = np.unique(rounded[:, 0]), np.unique(rounded[:, 1])
    return np.stack(np.meshgrid(heights, widths, indexing="ij"), -1).reshape(-1, 2)


def choose_buckets(sizes_hw, num_buckets, multiple=64, passes=3):
    """A bucket set for a sample of image sizes: (K, 2) sorted buckets.

    Candidates are every (height, width) pair of the sample's heights and
    widths rounded up to `multiple`. Two searches, the better result kept:
    (a) start from the one bucket that holds every size, add num_buckets - 1
    times the candidate that removes the most padded pixels; (b) the same
    from nothing, counting a size that fits no chosen bucket as if padded to
    the holder of every size (so, e.g., 832x1344 and 1344x832 can replace
    1344x1344). Each then runs up to `passes` rounds of local search: every
    bucket in turn is replaced by the candidate that leaves the fewest padded
    pixels. Every size fits the result.
    """
    sizes, counts = np.unique(np.asarray(sizes_hw, np.int64).reshape(-1, 2), axis=0,
                              return_counts=True)
    rounded = -(-sizes // multiple) * multiple  # (U, 2) ceil to the multiple
    cover_all = rounded.max(axis=0)
    candidates = candidate_buckets(rounded, multiple)
    fits = (sizes[:, None, :] <= candidates[None, :, :]).all(axis=-1)  # (U, C)
    waste = np.where(fits, candidates.prod(axis=1)[None, :] - sizes.prod(axis=1)[:, None],
                     np.inf)  # (U, C) padded pixels of each size in each candidate
    holder = int(np.flatnonzero((candidates == cover_all).all(axis=1))[0])
    penalised = np.where(fits, waste, waste[:, [holder]])  # (U, C)
    covered = _cover(rounded, candidates, _search(penalised, counts, [], num_buckets, passes))
    results = [_search(waste, counts, [holder], num_buckets, passes),
               _search(waste, counts, covered, num_buckets, passes)]
    best = min(results, key=lambda chosen: _total_waste(waste, counts, chosen))
    return sort_buckets(candidates[sorted(set(best))])


def transformed_sizes(sizes_hw, config: TransformConfig, train: bool, rng=None,
                      epochs: int = 1) -> np.ndarray:
    """(N, 2) original sizes -> (N * epochs, 2) sizes after the training geometry
    (one draw from the numpy Generator `rng` per image and epoch) or (N, 2) after the
    validation resize (no rng)."""
    if not train:
        return np.array([eval_geometry(tuple(s), config).out_hw for s in sizes_hw])
    return np.array([sample_train_geometry(rng, tuple(s), config).out_hw
                     for _ in range(epochs) for s in sizes_hw])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr_jax.data.buckets",
        description="Size buckets for a prepared dataset (README: Data), printed as config "
                    "lines. The transform flags default to the published recipe; pass a "
                    "config's data.* values for another.")
    parser.add_argument("name", help="dataset name under --data_dir, e.g. coco/2017")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets")
    parser.add_argument("--split", default="train")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--num_buckets", type=int, default=12)
    parser.add_argument("--multiple", type=int, default=32, help="bucket sides are multiples")
    parser.add_argument("--epochs", type=int, default=3,
                        help="training geometry draws per image")
    for field in dataclasses.fields(TransformConfig):
        default = getattr(TransformConfig(), field.name)
        kind = type(default[0]) if isinstance(default, tuple) else type(default)
        parser.add_argument(f"--{field.name}", type=kind, default=default,
                            nargs="+" if isinstance(default, tuple) else None)
    return parser


def main(argv=None) -> int:
    from ddetr_jax.data.source import DetectionSource, latest_version_dir, read_sizes
    args = _parser().parse_args(argv)
    config = TransformConfig(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list)
                                else v for f in dataclasses.fields(TransformConfig)})
    try:
        dataset_dir = latest_version_dir(args.data_dir, args.name)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for split, train, field in ((args.split, True, "buckets"),
                                (args.eval_split, False, "eval_buckets")):
        source = DetectionSource(dataset_dir, split)
        sizes = transformed_sizes(read_sizes(source), config, train,
                                  np.random.default_rng(0), args.epochs)
        buckets = choose_buckets(sizes, args.num_buckets, args.multiple)
        side = -(-int(sizes.max()) // args.multiple) * args.multiple  # one square holds all
        print(f"# {split}: {len(source)} images{f' x {args.epochs} draws' if train else ''}, "
              f"{padded_fraction(sizes, buckets):.1%} padding "
              f"(one {side}x{side} shape: {padded_fraction(sizes, [(side, side)]):.1%})")
        print(f"c.data.{field} = {tuple(tuple(int(v) for v in b) for b in buckets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
