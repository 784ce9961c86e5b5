"""benchmarks/gpu_suite.py's arithmetic: which buckets it measures and the projected
cost of the published schedule (the timed parts run on a device, not in tests)."""

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import gpu_suite  # noqa: E402
from ddetr_jax.data import buckets as bucket_lib  # noqa: E402

PUBLISHED = bucket_lib.sort_buckets(bucket_lib.PUBLISHED_BUCKETS)


def test_bucket_frequencies_cover_every_training_image():
    freq = gpu_suite.bucket_frequencies(PUBLISHED, samples=4000)
    assert freq.shape == (len(PUBLISHED),)
    assert freq.sum() == pytest.approx(1.0)
    assert (freq > 0).all()  # the published set has no bucket that no image uses


def test_measured_buckets_are_the_most_frequent_and_the_largest():
    freq = np.array([0.1, 0.5, 0.15, 0.25])
    buckets = np.array([(64, 64), (64, 96), (96, 128), (128, 96)])
    assert gpu_suite.chosen_buckets(buckets, freq) == [1, 3]  # equal areas: more frequent


def test_scaled_sides_round_up_to_the_multiple():
    assert gpu_suite.scaled((800, 1344), 1.0) == (800, 1344)
    assert gpu_suite.scaled((800, 1344), 0.25) == (224, 352)
    assert gpu_suite.scaled((100, 40), 0.1) == (32, 32)


def test_projected_hours_average_a_step_time_linear_in_area():
    freq = gpu_suite.bucket_frequencies(PUBLISHED, samples=4000)
    per_pixel, fixed = 2e-7, 0.05  # seconds per padded pixel, and per step
    at = {tuple(PUBLISHED[i]): fixed + per_pixel * PUBLISHED[i].prod() for i in (0, 11)}
    mean_area = float((freq * PUBLISHED.prod(axis=1)).sum())
    steps = gpu_suite.EPOCHS * gpu_suite.COCO_TRAIN_IMAGES / 4
    expected = steps * (fixed + per_pixel * mean_area) / 3600
    assert gpu_suite.projected_hours(at, PUBLISHED, freq, batch=4) == pytest.approx(expected)


def test_the_suite_needs_no_input_pipeline_or_config_packages():
    """The GPU machine has jax, flax, optax, torch and transformers, not grain, TFDS
    or ml_collections."""
    root = os.path.join(os.path.dirname(__file__), "..")
    code = ("import sys; sys.path[:0] = ['benchmarks', 'tests']; import gpu_suite;"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'grain', "
            "'tensorflow_datasets', 'tensorflow', 'ml_collections'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
