"""grain input pipeline: bucketed, static-shape, per-process batches.

The batch contract, a dict of numpy arrays (B = per-process batch size,
T = max_targets, (H, W) = the batch's bucket):

    images        (B, H, W, 3) float32, ImageNet-normalised
    pad_mask      (B, H, W) bool, True on padding (bottom / right)
    boxes_cxcywh  (B, T, 4) float32, normalised to the unpadded resized image
    labels        (B, T) int32, COCO category ids, in [0, num_classes) when the
                  BatchConfig has num_classes (else ValueError naming the image)
    target_valid  (B, T) bool
    image_id      (B,) int64
    orig_size     (B, 2) int32, (height, width) of the original image
    size          (B, 2) int32, (height, width) after resize, before padding
    example_valid (B,) bool, False for the examples that fill the last
                  evaluation batches (a zero image, no padding, image_id -1)

How: each example's geometry (transforms.py) is drawn from
`np.random.default_rng([seed, epoch, index])` and the original size alone, so
the output size, and with it the bucket, of every example is known without
decoding. A *plan* lists the global batches of an epoch: the shuffled indices
are grouped by bucket and a batch is emitted whenever a bucket has
`global_batch_size` examples. Each process loads only its slice of every
global batch (process_index, process_count), and all processes agree on the
bucket of every step. The grain MapDataset maps step -> batch, so the iterator
state is a step count: `get_state()` / `set_state()` resume exactly.

Training runs `steps_per_epoch(...)` steps per epoch, the same every epoch:
ceil((N - K (B - 1)) / B) for N examples, K buckets and global batch B, which
every epoch's plan reaches; the examples of an epoch that come after (at most
about 2 K B, different ones each epoch) are left out of it. Evaluation visits
every example exactly once: the last batch of each bucket is filled with
padding examples (example_valid False).
"""

import functools
import logging

import grain
import numpy as np
from absl import flags

from ddetr_jax.data import buckets as bucket_lib
from ddetr_jax.data import transforms
from ddetr_jax.data.buckets import BatchConfig, steps_per_epoch
from ddetr_jax.data.source import decode_image, read_sizes

PAD_INDEX = -1
log = logging.getLogger(__name__)


def check_category_ids(source, num_classes):
    """Raises ValueError if a category id of `source` (its `category_ids`) is outside
    [0, num_classes): the model could neither learn nor predict that category."""
    ids = np.asarray(source.category_ids)
    outside = sorted({int(i) for i in ids if not 0 <= i < num_classes})
    if outside:
        raise ValueError(
            f"{source}: category ids {outside} lie outside [0, model.num_classes="
            f"{num_classes}) (the dataset's largest id is {int(ids.max())}); their objects "
            f"would never be matched. Set --config.model.num_classes={int(ids.max()) + 1}")


def check_labels(labels, num_classes, image_id):
    """Raises ValueError naming the image if a label is outside [0, num_classes)."""
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise ValueError(f"image {image_id}: label {int(outside[0])} lies outside "
                         f"[0, model.num_classes={num_classes}); its object would never be "
                         "matched")


def example_rng(seed, epoch, index):
    """The Generator of one example's training geometry."""
    return np.random.default_rng([seed, epoch, index])


def group_by_bucket(order, bucket_of, batch_size):
    """Batches of `order` (indices) whose members share a bucket, in the order
    they fill up: [(bucket, (batch_size,) indices)], plus the leftovers
    {bucket: [indices]} of buckets that did not fill a last batch."""
    pending, batches = {}, []
    for index in order:
        members = pending.setdefault(int(bucket_of[index]), [])
        members.append(int(index))
        if len(members) == batch_size:
            batches.append((int(bucket_of[index]), np.array(members, np.int64)))
            pending[int(bucket_of[index])] = []
    return batches, {b: members for b, members in pending.items() if members}


def train_plan(sizes, config, seed, epoch):
    """The global batches of one training epoch: [(bucket, (B,) indices)]."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    out_sizes = np.array([transforms.sample_train_geometry(example_rng(seed, epoch, i),
                                                           tuple(sizes[i]), config.transform).out_hw
                          for i in range(len(sizes))], np.int64).reshape(-1, 2)
    batches, _ = group_by_bucket(order, bucket_lib.assign_buckets(out_sizes, config.buckets),
                                 config.global_batch_size)
    return batches[:steps_per_epoch(len(sizes), config)]


def eval_plan(sizes, config):
    """Global evaluation batches covering every index once, in index order within
    each bucket; last batches filled with PAD_INDEX: [(bucket, (B,) indices)]."""
    out_sizes = np.array([transforms.eval_geometry(tuple(s), config.transform).out_hw
                          for s in sizes], np.int64).reshape(-1, 2)
    batches, leftovers = group_by_bucket(
        np.arange(len(sizes)), bucket_lib.assign_buckets(out_sizes, config.buckets),
        config.global_batch_size)
    for bucket, members in sorted(leftovers.items()):
        filler = [PAD_INDEX] * (config.global_batch_size - len(members))
        batches.append((bucket, np.array(members + filler, np.int64)))
    return batches


def process_slice(indices, process_index, process_count):
    """This process's contiguous share of a global batch's indices."""
    if len(indices) % process_count:
        raise ValueError(f"global batch {len(indices)} is not divisible by {process_count} "
                         "processes")
    share = len(indices) // process_count
    return indices[process_index * share:(process_index + 1) * share]


class TrainSteps:
    """Sequence: step -> (epoch, bucket, this process's indices); plans lazily,
    one epoch cached."""

    def __init__(self, sizes, config, seed, num_epochs, process_index, process_count):
        self.sizes, self.config, self.seed = sizes, config, seed
        self.per_epoch = steps_per_epoch(len(sizes), config)
        self.num_epochs, self.process = num_epochs, (process_index, process_count)

    def __len__(self):
        return self.num_epochs * self.per_epoch

    @functools.lru_cache(maxsize=1)
    def plan(self, epoch):
        return train_plan(self.sizes, self.config, self.seed, epoch)

    def __getitem__(self, step):
        epoch = step // self.per_epoch
        bucket, indices = self.plan(epoch)[step % self.per_epoch]
        return epoch, bucket, process_slice(indices, *self.process)


class BatchLoader:
    """Loads and pads one batch: (epoch, bucket, indices) -> the batch contract.
    epoch None means evaluation geometry."""

    def __init__(self, source, sizes, config, seed):
        self.source, self.sizes, self.config, self.seed = source, sizes, config, seed
        self.buckets = bucket_lib.sort_buckets(config.buckets)
        self.truncated_images = 0  # images with more than max_targets targets, this process

    def example(self, index, epoch):
        """One transformed example (see transforms.transform_example)."""
        element = self.source[index]
        size = tuple(self.sizes[index])
        if epoch is None:
            geometry = transforms.eval_geometry(size, self.config.transform)
        else:
            geometry = transforms.sample_train_geometry(example_rng(self.seed, epoch, index),
                                                        size, self.config.transform)
        out = transforms.transform_example(decode_image(element["image_bytes"]),
                                           element["boxes_xyxy"], element["labels"],
                                           element["is_crowd"], geometry)
        return element, out

    def __call__(self, item):
        epoch, bucket, indices = item
        height, width = (int(v) for v in self.buckets[bucket])
        b, t = len(indices), self.config.max_targets
        batch = {
            "images": np.zeros((b, height, width, 3), np.float32),
            "pad_mask": np.zeros((b, height, width), bool),
            "boxes_cxcywh": np.zeros((b, t, 4), np.float32),
            "labels": np.zeros((b, t), np.int32),
            "target_valid": np.zeros((b, t), bool),
            "image_id": np.full((b,), -1, np.int64),
            "orig_size": np.full((b, 2), [height, width], np.int32),
            "size": np.full((b, 2), [height, width], np.int32),
            "example_valid": indices != PAD_INDEX,
        }
        for row, index in enumerate(indices):
            if index != PAD_INDEX:
                self._fill(batch, row, *self.example(int(index), epoch))
        return batch

    def _fill(self, batch, row, element, out):
        h, w = out["image"].shape[:2]
        batch["images"][row, :h, :w] = out["image"]
        batch["pad_mask"][row] = True
        batch["pad_mask"][row, :h, :w] = False
        n = len(out["labels"])
        if n > self.config.max_targets:
            self.truncated_images += 1
            log.warning("image %d has %d targets; keeping the first max_targets=%d "
                            "(%d such images in this process so far)", element["image_id"], n,
                            self.config.max_targets, self.truncated_images)
            n = self.config.max_targets
        if self.config.num_classes is not None:
            check_labels(out["labels"], self.config.num_classes, element["image_id"])
        batch["boxes_cxcywh"][row, :n] = out["boxes_cxcywh"][:n]
        batch["labels"][row, :n] = out["labels"][:n]
        batch["target_valid"][row, :n] = True
        batch["image_id"][row] = element["image_id"]
        batch["orig_size"][row] = element["orig_size"]
        batch["size"][row] = (h, w)


def _to_iter(dataset, num_workers, num_threads, prefetch):
    """MapDataset -> IterDataset with `num_threads` reader threads and, if
    num_workers > 0, that many worker processes."""
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    iterable = dataset.to_iter_dataset(read)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag when it starts workers and fails in
            # programs that never parsed flags (google/grain#1355): use the defaults.
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=prefetch))
    return iterable


def train_dataset(source, config, *, seed, num_epochs, sizes=None, process_index=0,
                  process_count=1, num_workers=0, num_threads=2, prefetch=2):
    """Training batches of this process, num_epochs * steps_per_epoch of them:
    an IterDataset whose iterator has get_state() / set_state()."""
    if config.num_classes is not None:
        check_category_ids(source, config.num_classes)
    sizes = read_sizes(source) if sizes is None else sizes
    steps = TrainSteps(sizes, config, seed, num_epochs, process_index, process_count)
    dataset = grain.MapDataset.source(steps).map(BatchLoader(source, sizes, config, seed))
    return _to_iter(dataset, num_workers, num_threads, prefetch)


def eval_dataset(source, config, *, sizes=None, process_index=0, process_count=1,
                 num_workers=0, num_threads=2, prefetch=2):
    """Evaluation batches of this process; over all processes every example
    appears exactly once with example_valid True."""
    if config.num_classes is not None:
        check_category_ids(source, config.num_classes)
    sizes = read_sizes(source) if sizes is None else sizes
    items = [(None, bucket, process_slice(indices, process_index, process_count))
             for bucket, indices in eval_plan(sizes, config)]
    dataset = grain.MapDataset.source(items).map(BatchLoader(source, sizes, config, seed=0))
    return _to_iter(dataset, num_workers, num_threads, prefetch)
