"""Benchmark: one training step of the multi-scale model, JAX vs HF transformers (PyTorch).

Same random weights (the HF model converted), same batch of 2 images at
512x512 with 5 targets each, runs interleaved. JAX: the jitted data-parallel
step on one device (forward, matching, losses with auxiliary terms, backward,
AdamW with parameter groups and clipping). HF: DeformableDetrForObjectDetection
in train mode with labels (auxiliary loss on, class/bbox/GIoU matching costs
2/5/2; HF fixes the class loss weight at 1; the backbone's stages 2-4 train as
published, common.train_backbone_as_published), backward, clip_grad_norm_ 0.1,
AdamW step. torch uses 2 threads on CPU (OMP_WAIT_POLICY=PASSIVE, see
benchmarks/ms_deform_attn.py).

    python benchmarks/train_step.py [--device gpu] [--dtype bfloat16] [--repeats 3]
        [--solver scipy|optax] [--targets 5] [--remat auto|none|dots|full]

--solver scipy (the default) is the HostMatchedStep: two programs with
scipy's matching on the host between them; optax matches inside one program.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# JAX takes device memory as it needs it, not 75% up front: torch shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import (hf_train_step, jax_train_step, make_batch, random_hf_detr,  # noqa: E402
                    time_interleaved)
from ddetr_jax.convert import load_torch_checkpoint  # noqa: E402
from ddetr_jax.models.stack import check_remat  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solver", choices=("scipy", "optax"), default="scipy")
    parser.add_argument("--targets", type=int, default=5, help="targets per image")
    parser.add_argument("--remat", choices=("auto", "none", "dots", "full"), default="auto",
                        help="recompute in each transformer layer's backward (config.remat; "
                             "auto: training's default on this device)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tdev = "cuda" if args.device == "gpu" else "cpu"
    jdev = jax.devices(args.device)[0]
    hf = random_hf_detr(auxiliary_loss=True, class_cost=2, bbox_cost=5, giou_cost=2)
    with jax.default_device(jdev):
        model, _ = load_torch_checkpoint(hf.state_dict())
    hf = hf.to(tdev).train()
    batch = make_batch(args.size, args.targets)

    remat = check_remat(args.remat, jdev.platform)
    run_jax, compile_s, memories = jax_train_step(model, batch, jdev, args.dtype, args.solver,
                                                 remat)
    run_torch = hf_train_step(hf, batch, tdev, args.dtype)
    j, tm = time_interleaved(run_jax, run_torch, args.repeats)
    print(f"jax {jax.__version__} on {jdev.device_kind}; torch {torch.__version__} on {tdev} "
          f"({torch.get_num_threads()} threads); multi-scale train step, batch 2 x "
          f"{args.size}x{args.size}, {args.dtype}, remat {remat}, median of {args.repeats}")
    print(f"JAX compile: {compile_s:.1f} s")
    print(f"JAX step: {j * 1e3:.0f} ms ({2 / j:.2f} images/s)   HF step: {tm * 1e3:.0f} ms "
          f"({2 / tm:.2f} images/s)   speed-up: {tm / j:.2f}x")
    for name, m in memories:
        if m is not None:
            print(f"JAX {name} program: XLA temporaries {m.temp_size_in_bytes / 2**30:.2f} GiB, "
                  f"arguments {m.argument_size_in_bytes / 2**30:.2f} GiB, outputs "
                  f"{m.output_size_in_bytes / 2**30:.2f} GiB")
    if tdev == "cuda":
        print(f"torch peak allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        stats = jdev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(f"JAX peak in use: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    print(f"process peak RSS (both frameworks): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
