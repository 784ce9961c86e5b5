"""Benchmark: eval forward of the multi-scale model, JAX vs HuggingFace transformers.

Same random weights (the HF model converted), same batch of 2 images of
512x512, runs interleaved; torch with 2 threads (OMP_WAIT_POLICY=PASSIVE, see
benchmarks/ms_deform_attn.py). Prints compile time and the ratio.

    python benchmarks/model_forward.py [--device gpu] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import random_hf_detr, time_interleaved  # noqa: E402
from ddetr_jax.convert import load_torch_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tdev = "cuda" if args.device == "gpu" else "cpu"
    jdev = jax.devices(args.device)[0]
    hf = random_hf_detr().eval()
    with jax.default_device(jdev):
        model, _ = load_torch_checkpoint(hf.state_dict())
    hf = hf.to(tdev)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, args.size, args.size, 3)).astype(np.float32)
    pad_mask = np.zeros((2, args.size, args.size), bool)
    pixel_values = torch.tensor(images).permute(0, 3, 1, 2).contiguous().to(tdev)
    pixel_mask = torch.ones((2, args.size, args.size), dtype=torch.long, device=tdev)
    jimages, jmask = jax.device_put(images, jdev), jax.device_put(pad_mask, jdev)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))
    t0 = time.perf_counter()
    compiled = forward.lower(state, jimages, jmask).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        jax.block_until_ready(compiled(state, jimages, jmask)["pred_logits"])

    def run_torch():
        with torch.no_grad():
            hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        if tdev == "cuda":
            torch.cuda.synchronize()

    j, tm = time_interleaved(run_jax, run_torch, args.repeats)
    print(f"jax {jax.__version__} on {jdev.device_kind}; torch {torch.__version__} on {tdev} "
          f"({torch.get_num_threads()} threads); multi-scale, batch 2 x {args.size}x{args.size}, "
          f"median of {args.repeats}")
    print(f"JAX compile: {compile_s:.1f} s")
    print(f"JAX forward: {j * 1e3:.1f} ms   HF forward: {tm * 1e3:.1f} ms   "
          f"speed-up: {tm / j:.2f}x")


if __name__ == "__main__":
    main()
