"""GPU suite: the op and the train step at the published shape, JAX vs HF, one table.

    python benchmarks/gpu_suite.py [--budget_s 420]             # on a GPU
    python benchmarks/gpu_suite.py --device cpu --scale 0.25 --batch 1 --repeats 1

1. The deformable-attention op at the encoder (one 800x1333 image, Lq = S = 22,223)
   and decoder (Lq = 300) shapes, forward and forward + backward, vs the authors'
   PyTorch reference (tests/torch_reference.py), batch --batch.
2. The train step of the multi-scale and ++two-stage models, batch --batch per
   device (published: 4), at two of the published training buckets: the most
   frequent under the published augmentation of COCO-like image sizes
   (common.coco_like_sizes) and the largest; float32 and bfloat16. JAX: this
   project's step (scipy matching between two programs; remat as training's
   default on that device); HF:
   DeformableDetrForObjectDetection with the same weights, float32 with TF32 allowed
   (as JAX's default matmul precision on GPU) and bfloat16 autocast. Rows run in
   that order while the seconds left of --budget_s (counted from the start) hold
   the longest row so far; the rest are listed as skipped.
3. The projected cost of the published schedule (50 epochs of COCO's 118,287
   training images) on one such device: the multi-scale step time, linear in the
   bucket's area through the two measured buckets, averaged over the buckets'
   frequencies; beside the authors' 325 V100-hours.

Memory. JAX: the most one of the step's programs holds on the device (arguments,
outputs not aliased to them, XLA temporaries; common.program_bytes), from XLA's
analysis of the compiled program. HF: torch.cuda.max_memory_allocated over the
row's steps (on CPU: not measured). Needs jax, flax, optax, torch, transformers,
scipy and pillow; not grain, TFDS or ml_collections. --scale shrinks every image
side (buckets, op levels) to run the whole suite on a CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# JAX takes device memory as it needs it, not 75% up front: torch shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import (coco_like_sizes, hf_train_step, jax_train_step, make_batch,  # noqa: E402
                    program_bytes, random_hf_detr, time_interleaved)
from ms_deform_attn import LEVELS, op_cases  # noqa: E402

from ddetr_jax.convert import load_torch_checkpoint  # noqa: E402
from ddetr_jax.data import buckets as bucket_lib  # noqa: E402
from ddetr_jax.data.transforms import TransformConfig  # noqa: E402
from ddetr_jax.models.stack import check_remat  # noqa: E402

COCO_TRAIN_IMAGES = 118_287
EPOCHS = 50
AUTHORS_V100_HOURS = 325  # multi-scale Deformable DETR, the paper's Table 1
HF_LOSS = dict(auxiliary_loss=True, class_cost=2, bbox_cost=5, giou_cost=2)
VARIANTS = {"multi-scale": HF_LOSS,
            "++two-stage": dict(HF_LOSS, with_box_refine=True, two_stage=True)}


def bucket_frequencies(buckets, samples: int = 20000, seed: int = 0) -> np.ndarray:
    """(K,) fraction of training images that each bucket (in sort_buckets order)
    holds, for COCO-like sizes after one draw of the published training geometry."""
    rng = np.random.default_rng(seed)
    sizes = bucket_lib.transformed_sizes(coco_like_sizes(rng, samples), TransformConfig(),
                                         True, rng)
    counts = np.bincount(bucket_lib.assign_buckets(sizes, buckets), minlength=len(buckets))
    return counts / counts.sum()


def scaled(hw, scale: float, multiple: int = 32) -> tuple[int, int]:
    """(H, W) with each side times `scale`, rounded up to `multiple` (1.0: unchanged)."""
    return tuple(max(multiple, math.ceil(side * scale / multiple) * multiple) for side in hw)


def chosen_buckets(buckets, freq) -> list[int]:
    """Indices of the most frequent bucket and of the largest (the more frequent of
    equal areas)."""
    area = buckets.prod(axis=1)
    return [int(np.argmax(freq)),
            int(max(np.flatnonzero(area == area.max()), key=lambda i: freq[i]))]


def projected_hours(step_s: dict, buckets, freq, batch: int) -> float:
    """Device-hours of the published schedule: step seconds at the measured buckets
    ({(H, W): s}, two of them), linear in the bucket area, averaged over `freq`."""
    (a0, t0), (a1, t1) = ((h * w, t) for (h, w), t in step_s.items())
    slope = (t1 - t0) / (a1 - a0)
    mean_step = float(np.sum(freq * (t0 + slope * (buckets.prod(axis=1) - a0))))
    return EPOCHS * COCO_TRAIN_IMAGES / batch * mean_step / 3600


class Budget:
    """Rows run while the seconds left exceed the longest row so far."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.longest = 0.0

    def allows(self) -> bool:
        return self.deadline - time.monotonic() > self.longest

    def spent(self, seconds: float):
        self.longest = max(self.longest, seconds)


def print_op_table(jdev, tdev, batch, scale, repeats):
    levels = [tuple(max(1, math.ceil(s * scale)) for s in hw) for hw in LEVELS]
    print(f"\n## Op: ms_deform_attn vs the PyTorch reference (levels {levels}, batch {batch})\n")
    print("| shape | pass | JAX ms | PyTorch ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, pass_name, run_jax, run_torch in op_cases(jdev, tdev, batch, levels):
        jt, tt = time_interleaved(run_jax, run_torch, repeats)
        print(f"| {name} | {pass_name} | {jt * 1e3:.2f} | {tt * 1e3:.2f} | {tt / jt:.2f}x |",
              flush=True)


def step_row(model, hf, hw, dtype, jdev, tdev, args):
    """Times one (model, bucket, dtype) in both frameworks; returns the table cells
    and the JAX step seconds."""
    import torch

    batch = make_batch(hw, args.targets, args.batch)
    run_jax, compile_s, memories = jax_train_step(model, batch, jdev, dtype)
    run_torch = hf_train_step(hf, batch, tdev, dtype)
    if tdev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    j, t = time_interleaved(run_jax, run_torch, args.repeats)
    jax_bytes = [program_bytes(m) for _, m in memories if m is not None]
    jax_mem = f"{max(jax_bytes) / 2**30:.2f}" if jax_bytes else "n/a"
    hf_mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if tdev == "cuda" else "n/a"
    cells = (f"{j * 1e3:.0f} | {args.batch / j:.1f} | {t * 1e3:.0f} | {args.batch / t:.1f} "
             f"| **{t / j:.2f}x** | {compile_s:.0f} | {jax_mem} | {hf_mem}")
    return cells, j


def run_steps(jdev, tdev, buckets, freq, args, budget):
    """The train-step table; returns {dtype: {(H, W): JAX step s}} of the multi-scale model."""
    import torch

    chosen = chosen_buckets(buckets, freq)
    print(f"\n## Train step, batch {args.batch} per device, {args.targets} targets per image\n")
    print("| model | bucket (share of images) | dtype | JAX ms | JAX img/s | HF ms | HF img/s "
          "| JAX vs HF | JAX compile s | JAX memory GiB | HF memory GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    measured = {}
    for variant, hf_kwargs in VARIANTS.items():
        model = hf = None
        for index in chosen:
            hw = tuple(int(side) for side in buckets[index])
            for dtype in ("float32", "bfloat16"):
                label = f"| {variant} | {hw[0]}x{hw[1]} ({freq[index]:.1%}) | {dtype} |"
                if not budget.allows():
                    print(f"{label} skipped: --budget_s spent |||||||", flush=True)
                    continue
                if model is None:
                    hf = random_hf_detr(**hf_kwargs)
                    with jax.default_device(jdev):
                        model, _ = load_torch_checkpoint(hf.state_dict())
                    hf = hf.to(tdev).train()
                t0 = time.monotonic()
                try:
                    cells, step_s = step_row(model, hf, hw, dtype, jdev, tdev, args)
                except Exception as error:  # out of memory, say: the table goes on
                    first_line = (str(error).strip().splitlines() or [""])[0][:200]
                    print(f"{label} failed: {type(error).__name__}: {first_line} |||||||",
                          flush=True)
                    continue
                finally:
                    budget.spent(time.monotonic() - t0)
                print(f"{label} {cells} |", flush=True)
                if variant == "multi-scale":
                    measured.setdefault(dtype, {})[hw] = step_s
        del hf, model
        if tdev == "cuda":
            torch.cuda.empty_cache()
    return measured


def print_projection(measured, buckets, freq, args, device_kind):
    print(f"\n## Projected cost: {EPOCHS} epochs of COCO train2017 ({COCO_TRAIN_IMAGES:,} "
          f"images), multi-scale, batch {args.batch} per device\n")
    for dtype, step_s in measured.items():
        if len(step_s) < 2:
            print(f"- {dtype}: needs both buckets measured")
            continue
        hours = projected_hours(step_s, buckets, freq, args.batch)
        print(f"- {dtype}: {hours:.0f} {device_kind}-hours (the authors: "
              f"{AUTHORS_V100_HOURS} V100-hours)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--batch", type=int, default=4, help="images per device")
    parser.add_argument("--targets", type=int, default=7, help="per image (COCO: 7.3)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="image sides times this (a reduced run on a CPU)")
    parser.add_argument("--budget_s", type=float, default=420,
                        help="start no train-step row that the seconds left since the "
                             "start would not hold (judged by the longest row so far)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    args = parser.parse_args()
    budget = Budget(args.budget_s)

    import torch

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default float32 matmul on GPU
    torch.backends.cudnn.allow_tf32 = True
    try:
        jdev = jax.devices(args.device)[0]
    except RuntimeError:
        parser.error(f"JAX sees no {args.device} here (only {jax.default_backend()}); "
                     "--device cpu --scale 0.25 --batch 1 runs the suite on a CPU")
    tdev = "cuda" if args.device == "gpu" else "cpu"
    if tdev == "cuda" and not torch.cuda.is_available():
        parser.error(f"torch {torch.__version__} sees no CUDA device (a CPU build?)")
    published = bucket_lib.sort_buckets(bucket_lib.PUBLISHED_BUCKETS)
    freq = bucket_frequencies(published)
    buckets = np.array([scaled(hw, args.scale) for hw in published.tolist()])
    print(f"# GPU suite: jax {jax.__version__} on {jdev.device_kind}; torch {torch.__version__}"
          f" on {tdev}; median of {args.repeats}; image sides x{args.scale}; JAX remat "
          f"{check_remat('auto', jdev.platform)} (training's default there)")
    print_op_table(jdev, tdev, args.batch, args.scale, args.repeats)
    measured = run_steps(jdev, tdev, buckets, freq, args, budget)
    print_projection(measured, buckets, freq, args, jdev.device_kind)
    stats = jdev.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"\nJAX peak device memory of the whole run: "
              f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
