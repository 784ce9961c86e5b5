"""Helpers shared by the benchmarks: interleaved timing, a random-weight HF model."""

from __future__ import annotations

import statistics
import time

import numpy as np


def time_interleaved(run_jax, run_torch, repeats: int) -> tuple[float, float]:
    """Median seconds of each, after one warm-up each, runs alternating."""
    run_jax()
    run_torch()
    jax_times, torch_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_jax()
        jax_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_torch()
        torch_times.append(time.perf_counter() - t0)
    return statistics.median(jax_times), statistics.median(torch_times)


def random_hf_detr(seed: int = 0, **config_kwargs):
    """HF DeformableDetrForObjectDetection with random weights, built offline, with
    the paper's ResNet-50 backbone feeding C3-C5 (HF's stage2-4) to the transformer."""
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(seed)
    config = DeformableDetrConfig(
        num_labels=91, use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
        **config_kwargs)
    return DeformableDetrForObjectDetection(config)


def make_batch(size: int, targets: int = 5, batch: int = 2, seed: int = 0):
    """A train batch of `batch` square noise images with `targets` boxes each."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "pad_mask": np.zeros((batch, size, size), bool),
        "boxes_cxcywh": np.concatenate([rng.uniform(0.3, 0.7, (batch, targets, 2)),
                                        rng.uniform(0.1, 0.3, (batch, targets, 2))],
                                       -1).astype(np.float32),
        "labels": rng.integers(1, 91, (batch, targets)).astype(np.int32),
        "target_valid": np.ones((batch, targets), bool),
    }
