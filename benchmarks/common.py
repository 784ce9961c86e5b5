"""Helpers shared by the benchmarks: interleaved timing, a random-weight HF model, a
train batch, COCO-like image sizes, and one train step of each framework."""

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


def random_hf_detr(seed: int = 0, backbone: dict | None = None, **config_kwargs):
    """HF DeformableDetrForObjectDetection with random weights, built offline, with
    the paper's ResNet-50 backbone feeding C3-C5 (HF's stage2-4) to the transformer.
    backbone: ResNetConfig fields other than the published ones (tests' tiny ResNets)."""
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(seed)
    config = DeformableDetrConfig(
        num_labels=91, use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"],
                                     **(backbone or {})),
        **config_kwargs)
    return DeformableDetrForObjectDetection(config)


def make_batch(size, targets: int = 5, batch: int = 2, seed: int = 0):
    """A train batch of `batch` noise images of `size` (a side, or (height, width))
    with `targets` boxes each."""
    height, width = (size, size) if np.isscalar(size) else size
    rng = np.random.default_rng(seed)
    return {
        "images": rng.normal(size=(batch, height, width, 3)).astype(np.float32),
        "pad_mask": np.zeros((batch, height, width), bool),
        "boxes_cxcywh": np.concatenate([rng.uniform(0.3, 0.7, (batch, targets, 2)),
                                        rng.uniform(0.1, 0.3, (batch, targets, 2))],
                                       -1).astype(np.float32),
        "labels": rng.integers(1, 91, (batch, targets)).astype(np.int32),
        "target_valid": np.ones((batch, targets), bool),
    }


# COCO 2017's image sizes, modelled (the annotation file is not available offline): the
# longer side is 640 pixels for 95% of images (else uniform in 300..640); long / short is
# 4:3 for 50%, 3:2 for 25%, 1:1 for 8%, 16:9 for 10%, uniform in 1..2.5 for 7%; 75% landscape.
RATIOS = (4 / 3, 3 / 2, 1.0, 16 / 9)
RATIO_PROBS = (0.50, 0.25, 0.08, 0.10)  # the remaining 0.07: uniform in 1..2.5


def coco_like_sizes(rng, n):
    """(n, 2) int (height, width) drawn from the COCO size model above."""
    long = np.where(rng.random(n) < 0.95, 640, rng.integers(300, 641, n))
    kind = rng.choice(len(RATIOS) + 1, size=n, p=RATIO_PROBS + (0.07,))
    ratio = np.where(kind < len(RATIOS), np.array(RATIOS + (1.0,))[kind], rng.uniform(1, 2.5, n))
    short = np.round(long / ratio).astype(int)
    landscape = rng.random(n) < 0.75
    return np.stack([np.where(landscape, short, long), np.where(landscape, long, short)], 1)


def program_bytes(memory) -> int:
    """Device bytes a compiled program holds while it runs: arguments, outputs not
    aliased to them (donation) and XLA's temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def jax_train_step(model, batch, device, dtype: str = "float32", solver: str = "scipy",
                   remat: str = "auto"):
    """This project's train step for `model` on one device (AdamW with the published
    parameter groups and clipping; the published loss and matching weights; remat:
    per transformer layer, as the config's remat; 'auto' resolves as training does on
    `device`).

    Returns (run, compile_s, memories): run() takes one step and waits for it;
    memories: [(program name, XLA memory analysis or None)], one per compiled program.
    """
    import jax
    import jax.numpy as jnp

    from ddetr_jax.losses import LossConfig
    from ddetr_jax.models.stack import check_remat
    from ddetr_jax.optimizer import OptimizerConfig, make_optimizer
    from ddetr_jax.sharding import data_mesh, shard_batch, split_model
    from ddetr_jax.train.step import HostMatchedStep, init_state, make_train_step

    remat = check_remat(remat, device.platform)
    graphdef, params, rest = split_model(model)
    tx, lr = make_optimizer(params, OptimizerConfig())
    mesh = data_mesh([device])
    compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else None
    step = make_train_step(graphdef, rest, tx, lr, mesh, LossConfig(solver=solver),
                           compute_dtype=compute_dtype, remat=remat)
    holder = {"state": init_state(params, tx, mesh)}
    data = shard_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(holder["state"], data, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    if isinstance(step, HostMatchedStep):
        step.forward, step.update = compiled  # run the programs compiled above
        memories = [("forward", compiled[0].memory_analysis()),
                    ("update", compiled[1].memory_analysis())]
        compiled = step
    else:
        memories = [("step", compiled.memory_analysis())]

    def run():
        holder["state"], metrics = compiled(holder["state"], data, jax.random.key(0))
        jax.block_until_ready(metrics["loss"])

    return run, compile_s, memories


def train_backbone_as_published(hf):
    """Makes HF train the backbone as the authors (and this project) do: every
    ResNet stage but the first (HF's stages 1-3 = torchvision's layer2-4), not the
    stem or stage 0. transformers' non-timm ResNet path means to do this, but its
    name test ("stage.1" in "...stages.1...") never matches, so it freezes the whole
    backbone and its step skips the backbone's backward pass (at batch 2 x 512x512 on
    a CPU, ~0.9 s of work the published recipe does)."""
    for name, parameter in hf.model.backbone.model.named_parameters():
        parameter.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))


def hf_train_step(hf, batch, device: str, dtype: str = "float32"):
    """One HF training step as run(): forward in train mode with labels, backward,
    clip_grad_norm_ 0.1, AdamW; bfloat16 as torch.autocast. hf: on `device` already.
    The backbone trains as published (train_backbone_as_published)."""
    import torch

    train_backbone_as_published(hf)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=2e-4, weight_decay=1e-4)
    pixel_values = torch.tensor(batch["images"]).permute(0, 3, 1, 2).contiguous().to(device)
    pixel_mask = torch.ones(batch["pad_mask"].shape, dtype=torch.long, device=device)
    labels = [{"class_labels": torch.tensor(labels).long().to(device),
               "boxes": torch.tensor(boxes).to(device)}
              for labels, boxes in zip(batch["labels"], batch["boxes_cxcywh"])]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run():
        optimizer.zero_grad()
        with autocast:
            loss = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.1)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run
