"""benchmarks/gpu_suite.py's arithmetic (which buckets it measures, the projected
cost of the published schedule) and that its HF step trains what ours trains (the
timed parts run on a device, not in tests)."""

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


def test_hf_trains_the_same_backbone_parameters_as_this_project():
    """train_backbone_as_published: HF's trainable backbone tensors are the conv
    kernels of stages 2-4 (HF's stages 1-3), they get gradients and nothing else
    does, and they are as many as the kernels this project's step trains."""
    import jax
    import torch
    from flax import nnx

    from common import random_hf_detr, train_backbone_as_published
    from ddetr_jax.models.backbone import ResNet

    hf = random_hf_detr(
        backbone=dict(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[8, 16, 32, 64]),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=4)
    train_backbone_as_published(hf)
    trainable = [n for n, p in hf.model.backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all(any(f"stages.{i}." in n for i in (1, 2, 3)) for n in trainable)

    features = hf.model.backbone.model(torch.randn(1, 3, 64, 64)).feature_maps
    sum(f.sum() for f in features).backward()
    grads = {n: p.grad for n, p in hf.model.backbone.model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trainable)
    assert all(g is None for n, g in grads.items() if n not in trainable)

    # Its stages 2-4 train, the stem and layer1 get no gradient (test_model.py).
    resnet = nnx.eval_shape(lambda: ResNet(18, width=8, rngs=nnx.Rngs(0)))
    kernels = jax.tree.leaves(nnx.state(nnx.List(list(resnet.layers)[1:]), nnx.Param))
    assert len(kernels) == len(trainable)
