"""Static (H, W) buckets: which bucket holds an image, and choosing a bucket set.

DESIGN.md decision 4: every image is padded bottom/right to the smallest
(by area) configured bucket that holds it, so the model compiles once per
bucket instead of once per image size, and far less is padded than with one
max_size x max_size shape.
"""

import numpy as np


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


def choose_buckets(sizes_hw, num_buckets, multiple=64, passes=3):
    """A bucket set for a sample of image sizes: (K, 2) sorted buckets.

    Candidates are the sample's sizes with sides rounded up to `multiple`.
    Greedy start: the one bucket that holds every size, then, num_buckets - 1
    times, the candidate that removes the most padded pixels. Then up to
    `passes` rounds of local search: each bucket but the holder of every size
    is replaced by the candidate that leaves the fewest padded pixels.
    """
    sizes, counts = np.unique(np.asarray(sizes_hw, np.int64).reshape(-1, 2), axis=0,
                              return_counts=True)
    rounded = -(-sizes // multiple) * multiple  # (U, 2) ceil to the multiple
    cover_all = rounded.max(axis=0)
    candidates = np.unique(np.vstack([rounded, cover_all]), axis=0)  # (C, 2)
    fits = (sizes[:, None, :] <= candidates[None, :, :]).all(axis=-1)  # (U, C)
    waste = np.where(fits, candidates.prod(axis=1)[None, :] - sizes.prod(axis=1)[:, None],
                     np.inf)  # (U, C) padded pixels of each size in each candidate
    chosen = [int(np.flatnonzero((candidates == cover_all).all(axis=1))[0])]
    for _ in range(num_buckets - 1):
        current = waste[:, chosen].min(axis=1)  # (U,)
        totals = (np.minimum(current[:, None], waste) * counts[:, None]).sum(axis=0)  # (C,)
        if totals.min() >= (current * counts).sum():
            break
        chosen.append(int(np.argmin(totals)))
    for _ in range(passes):
        before = _total_waste(waste, counts, chosen)
        for slot in range(1, len(chosen)):
            others = waste[:, chosen[:slot] + chosen[slot + 1:]].min(axis=1)  # (U,)
            totals = (np.minimum(others[:, None], waste) * counts[:, None]).sum(axis=0)
            chosen[slot] = int(np.argmin(totals))
        if _total_waste(waste, counts, chosen) >= before:
            break
    return sort_buckets(candidates[sorted(set(chosen))])
