"""The grain pipeline: the batch contract, buckets, determinism, resume, shards, eval."""

import logging
import pathlib
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddetr_jax.data import buckets as bucket_lib
from ddetr_jax.data import pipeline, prepare, synthetic, transforms
from ddetr_jax.data.source import DetectionSource, decode_image

tfds.disable_progress_bar()

BUCKETS = ((64, 64), (64, 96), (96, 64), (96, 96), (96, 136), (136, 96), (136, 136))
CONFIG = pipeline.BatchConfig(global_batch_size=4, buckets=BUCKETS, max_targets=6,
                              transform=transforms.TransformConfig().scaled(0.1))
CONTRACT = {
    "images": (np.float32, 4), "pad_mask": (np.bool_, 3), "boxes_cxcywh": (np.float32, 3),
    "labels": (np.int32, 2), "target_valid": (np.bool_, 2), "image_id": (np.int64, 1),
    "orig_size": (np.int32, 2), "size": (np.int32, 2), "example_valid": (np.bool_, 1),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cocos = synthetic.write_dataset(root / "coco", train_images=40, val_images=11, seed=3)
    dataset_dir, _ = prepare.prepare(root / "coco", "shapes", root / "tfds")
    sources = {split: DetectionSource(dataset_dir, split) for split in cocos}
    sizes = {split: pipeline.read_sizes(source) for split, source in sources.items()}
    return cocos, sources, sizes


def _train(data, **kwargs):
    _, sources, sizes = data
    args = dict(seed=0, num_epochs=2, sizes=sizes["train"]) | kwargs
    return pipeline.train_dataset(sources["train"], CONFIG, **args)


def _take(dataset, n):
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _check_contract(batch, batch_size):
    assert set(batch) == set(CONTRACT)
    for key, (dtype, rank) in CONTRACT.items():
        assert batch[key].dtype == dtype and batch[key].ndim == rank, key
        assert batch[key].shape[0] == batch_size, key
    _, height, width, _ = batch["images"].shape
    assert batch["pad_mask"].shape[1:] == (height, width)
    assert batch["boxes_cxcywh"].shape[1:] == (CONFIG.max_targets, 4)
    sorted_buckets = bucket_lib.sort_buckets(BUCKETS)
    bucket = int(np.flatnonzero((sorted_buckets == (height, width)).all(axis=1))[0])
    for row in np.flatnonzero(batch["example_valid"]):
        h, w = batch["size"][row]
        assert bucket_lib.assign_buckets([[h, w]], BUCKETS)[0] <= bucket  # it fits this bucket
        expected_mask = np.ones((height, width), bool)
        expected_mask[:h, :w] = False
        np.testing.assert_array_equal(batch["pad_mask"][row], expected_mask)
        assert (batch["images"][row][expected_mask] == 0).all()
        boxes = batch["boxes_cxcywh"][row][batch["target_valid"][row]]
        assert (boxes > 0).all() and (boxes <= 1).all()
        assert (batch["labels"][row][batch["target_valid"][row]] > 0).all()
    assert not batch["target_valid"][~batch["example_valid"]].any()


def test_train_batches_follow_the_contract_and_share_the_smallest_bucket(data):
    batches = _take(_train(data), 8)
    for batch in batches:
        _check_contract(batch, CONFIG.global_batch_size)
        assert batch["example_valid"].all()
        buckets_needed = bucket_lib.assign_buckets(batch["size"], BUCKETS)
        assert bucket_lib.sort_buckets(BUCKETS)[buckets_needed.max()].tolist() == \
            list(batch["images"].shape[1:3])
    assert len({b["images"].shape for b in batches}) > 1


def test_train_is_deterministic_by_seed_and_changes_by_epoch(data):
    first, again = _take(_train(data), 6), _take(_train(data), 6)
    _assert_same(first, again)
    other = _take(_train(data, seed=1), 6)
    assert any(not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other))
    per_epoch = pipeline.steps_per_epoch(40, CONFIG)
    both = _take(_train(data), 2 * per_epoch)
    epoch_ids = [np.concatenate([b["image_id"] for b in both[e * per_epoch:(e + 1) * per_epoch]])
                 for e in range(2)]
    assert all(len(set(ids.tolist())) == len(ids) for ids in epoch_ids)  # no repeats in an epoch
    assert epoch_ids[0].tolist() != epoch_ids[1].tolist()


class _ReadRecorder:
    """A data source that records which threads read it."""

    def __init__(self, source):
        self.source, self.threads = source, set()

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.threads.add(threading.get_ident())
        return self.source[index]


@pytest.mark.parametrize("num_threads", [2, 0])  # 0: read in the calling thread
def test_restoring_the_iterator_state_gives_the_same_next_batches(data, num_threads):
    _, sources, sizes = data

    def train():
        return pipeline.train_dataset(source, CONFIG, seed=0, num_epochs=2, sizes=sizes["train"],
                                      num_threads=num_threads)

    source = _ReadRecorder(sources["train"])
    iterator = iter(train())
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    assert (source.threads == {threading.get_ident()}) == (num_threads == 0)
    restored = iter(train())
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(3)], expected)


def test_process_shards_are_disjoint_and_agree_on_buckets(data):
    whole = _take(_train(data), 5)
    shards = [_take(_train(data, process_index=p, process_count=2), 5) for p in range(2)]
    for step, batch in enumerate(whole):
        parts = [shards[p][step] for p in range(2)]
        assert parts[0]["images"].shape == parts[1]["images"].shape == \
            (2,) + batch["images"].shape[1:]
        assert not set(parts[0]["image_id"]) & set(parts[1]["image_id"])
        np.testing.assert_array_equal(np.concatenate([p["image_id"] for p in parts]),
                                      batch["image_id"])


def test_worker_processes_give_the_same_batches(data):
    _assert_same(_take(_train(data, num_workers=1), 3), _take(_train(data), 3))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_image_exactly_once(data, process_count):
    cocos, sources, sizes = data
    seen = []
    for process in range(process_count):
        for batch in pipeline.eval_dataset(sources["validation"], CONFIG,
                                           sizes=sizes["validation"], process_index=process,
                                           process_count=process_count):
            _check_contract(batch, CONFIG.global_batch_size // process_count)
            seen += batch["image_id"][batch["example_valid"]].tolist()
            assert (batch["image_id"][~batch["example_valid"]] == -1).all()
    assert sorted(seen) == [image["id"] for image in cocos["validation"]["images"]]


def test_eval_example_matches_the_validation_transform(data):
    cocos, sources, sizes = data
    batch = next(iter(pipeline.eval_dataset(sources["validation"], CONFIG,
                                            sizes=sizes["validation"])))
    index = next(i for i in range(len(sources["validation"]))
                 if sources["validation"][i]["image_id"] == batch["image_id"][0])
    element = sources["validation"][index]
    geometry = transforms.eval_geometry(tuple(element["orig_size"]), CONFIG.transform)
    out = transforms.transform_example(decode_image(element["image_bytes"]),
                                       element["boxes_xyxy"], element["labels"],
                                       element["is_crowd"], geometry)
    h, w = geometry.out_hw
    assert batch["size"][0].tolist() == [h, w] and min(h, w) == CONFIG.transform.val_scale
    np.testing.assert_array_equal(batch["images"][0, :h, :w], out["image"])
    n = len(out["labels"])
    assert batch["target_valid"][0].sum() == n
    np.testing.assert_array_equal(batch["labels"][0, :n], out["labels"])
    np.testing.assert_array_equal(batch["boxes_cxcywh"][0, :n], out["boxes_cxcywh"])
    assert batch["orig_size"][0].tolist() == element["orig_size"].tolist()


def test_too_many_targets_are_truncated_with_a_counted_warning(data, caplog):
    _, sources, sizes = data
    config = pipeline.BatchConfig(global_batch_size=4, buckets=BUCKETS, max_targets=1,
                                  transform=CONFIG.transform)
    with caplog.at_level(logging.WARNING, logger="ddetr_jax.data.pipeline"):
        batches = list(pipeline.eval_dataset(sources["validation"], config,
                                             sizes=sizes["validation"], num_threads=1))
    assert all(b["target_valid"].sum(axis=1).max() <= 1 for b in batches)
    warnings = [r.getMessage() for r in caplog.records if "keeping the first" in r.getMessage()]
    assert warnings and "max_targets=1" in warnings[0] and "(1 such images" in warnings[0]


def test_steps_per_epoch_is_reached_by_every_plan():
    rng = np.random.default_rng(0)
    config = pipeline.BatchConfig(global_batch_size=5, buckets=BUCKETS)
    steps = pipeline.steps_per_epoch(60, config)
    for _ in range(50):
        order, bucket_of = rng.permutation(60), rng.integers(0, len(BUCKETS), 60)
        batches, leftovers = pipeline.group_by_bucket(order, bucket_of, 5)
        assert len(batches) >= steps
        assert all(len(set(bucket_of[idx])) == 1 for _, idx in batches)
        assert sum(map(len, leftovers.values())) + 5 * len(batches) == 60
    with pytest.raises(ValueError, match="cannot fill a batch"):
        pipeline.steps_per_epoch(20, config)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.process_slice(np.arange(6), 0, 4)


def test_buckets_assign_the_smallest_holder_and_choose_reduces_padding():
    assert bucket_lib.assign_buckets([[60, 60], [64, 65], [65, 64], [100, 30]],
                                     [(136, 136), (64, 64), (64, 96), (96, 64)]).tolist() == \
        [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"\[200, 10\] \(HxW\) fits no bucket"):
        bucket_lib.assign_buckets([[200, 10]], BUCKETS)
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(300, 800, 500), rng.integers(300, 1333, 500)], axis=1)
    one = bucket_lib.choose_buckets(sizes, 1)
    assert one.tolist() == [[832, 1344]]
    fractions = [bucket_lib.padded_fraction(sizes, bucket_lib.choose_buckets(sizes, k))
                 for k in (1, 4, 12)]
    assert fractions[0] > fractions[1] > fractions[2]
    assert len(bucket_lib.choose_buckets(sizes, 12)) == 12


def test_choose_buckets_can_split_the_bucket_that_holds_everything():
    """Landscape and portrait images: two 832x1344 / 1344x832 buckets beat any set that
    keeps the 1344x1344 holder of every size (the local search may replace it)."""
    rng = np.random.default_rng(1)
    short, long = rng.integers(500, 801, 400), rng.integers(1000, 1334, 400)
    sizes = np.concatenate([np.stack([short[:200], long[:200]], 1),
                            np.stack([long[200:], short[200:]], 1)])
    assert bucket_lib.choose_buckets(sizes, 2).tolist() == [[832, 1344], [1344, 832]]


class _Relabelled:
    """`source` with every label shifted by `shift` (its category list unchanged)."""

    def __init__(self, source, shift):
        self.source, self.shift, self.category_ids = source, shift, source.category_ids

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        element = dict(self.source[index])
        element["labels"] = element["labels"] + self.shift
        return element


def test_the_buckets_command_fits_every_size_of_a_prepared_dataset(data, capsys):
    """python -m ddetr_jax.data.buckets: config lines whose buckets hold every image of
    the dataset after the given transform, with less padding than one square shape."""
    _, sources, sizes = data
    root = pathlib.Path(sources["train"].dataset_dir).parents[1]  # the data_dir
    flags = ["--scales", "96", "128", "--max_size", "200", "--val_scale", "112",
             "--crop_resize_scales", "100", "--crop_size", "64", "96"]
    assert bucket_lib.main(["shapes", "--data_dir", str(root), "--num_buckets", "3",
                            "--multiple", "16", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    config = transforms.TransformConfig(scales=(96, 128), max_size=200, val_scale=112,
                                        crop_resize_scales=(100,), crop_size=(64, 96))
    for split, train, line in (("train", True, lines[1]), ("validation", False, lines[3])):
        field, buckets = line.split(" = ")
        assert field == f"c.data.{'buckets' if train else 'eval_buckets'}"
        buckets = eval(buckets)
        assert len(buckets) == 3 and all(side % 16 == 0 for b in buckets for side in b)
        out = bucket_lib.transformed_sizes(sizes[split], config, train,
                                            np.random.default_rng(0), epochs=3)
        bucket_lib.assign_buckets(out, buckets)  # raises if a size fits none
    assert "% padding (one " in lines[0] and "% padding (one " in lines[2]
    assert bucket_lib.main(["missing", "--data_dir", str(root)]) == 1
    assert "no prepared versions" in capsys.readouterr().err


def test_labels_the_model_cannot_predict_are_refused(data):
    """Category ids >= num_classes: refused when the dataset is opened, naming the ids and
    the num_classes needed; a label outside [0, num_classes) in a batch: an error naming the
    image, never an unmatched target."""
    _, sources, sizes = data
    small = pipeline.BatchConfig(4, BUCKETS, 6, CONFIG.transform, num_classes=8)
    with pytest.raises(ValueError, match=r"category ids \[8\] lie outside \[0, model.num_classes"
                                         r"=8\).*largest id is 8.*num_classes=9"):
        pipeline.train_dataset(sources["train"], small, seed=0, num_epochs=1,
                               sizes=sizes["train"])
    with pytest.raises(ValueError, match="num_classes=9"):
        pipeline.eval_dataset(sources["validation"], small, sizes=sizes["validation"])
    enough = pipeline.BatchConfig(4, BUCKETS, 6, CONFIG.transform, num_classes=9)
    shifted = _Relabelled(sources["validation"], 100)
    with pytest.raises(ValueError, match=r"image (\d+): label 10[1-8] lies outside "
                                         r"\[0, model.num_classes=9\)") as error:
        list(pipeline.eval_dataset(shifted, enough, sizes=sizes["validation"], num_threads=1))
    image_id = int(error.value.args[0].split(":")[0].split()[1])
    assert image_id in {sources["validation"][i]["image_id"] for i in range(len(shifted))}
