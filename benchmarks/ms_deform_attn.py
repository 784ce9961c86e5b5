"""Benchmark: ddetr_jax.ops.ms_deform_attn vs the authors' PyTorch reference.

The reference is `ms_deform_attn_core_pytorch` (grid_sample per level), written
out in tests/torch_reference.py. Same process, same inputs, runs interleaved
(JAX, torch, JAX, torch, ...); the median of each is reported.

    python benchmarks/ms_deform_attn.py            # CPU, torch with 2 threads
    python benchmarks/ms_deform_attn.py --device gpu

torch's OpenMP threads are set to sleep when idle (OMP_WAIT_POLICY=PASSIVE):
with the default busy-wait, the two threads keep spinning after each torch
call and steal the 2 cores from the JAX run that follows; torch's own times
are the same either way.

Shapes: the encoder of one 800x1333 image (levels (100,167),(50,84),(25,42),
(13,21); Lq = S = 22,223) and the decoder (Lq = 300); M=8, D=32, P=4.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import time_interleaved  # noqa: E402
from ddetr_jax.ops import ms_deform_attn  # noqa: E402

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
M, D, P = 8, 32, 4


def make_inputs(lq: int, batch: int, levels=LEVELS, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in levels)
    value = rng.normal(size=(batch, s, M, D)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, size=(batch, lq, M, len(levels), P, 2)).astype(np.float32)
    logits = rng.normal(size=(batch, lq, M, len(levels) * P)).astype(np.float32)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    weights = weights.reshape(batch, lq, M, len(levels), P).astype(np.float32)
    grad = rng.normal(size=(batch, lq, M * D)).astype(np.float32)
    return value, loc, weights, grad


def jax_fns(levels=LEVELS):
    def fwd(v, loc, w):
        return ms_deform_attn(v, levels, loc, w)

    def fwd_bwd(v, loc, w, g):
        out, vjp = jax.vjp(fwd, v, loc, w)
        return vjp(g)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def op_cases(jdev, tdev: str, batch: int, levels=LEVELS):
    """[(shape, pass, run_jax, run_torch)]: the encoder (Lq = S) and decoder (Lq = 300)
    shapes, forward and forward + backward; each run waits for its result."""
    import torch
    from torch_reference import ms_deform_attn_torch

    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    jfwd, jfwd_bwd = jax_fns(levels)
    cases = []
    for name, lq in (("encoder", sum(h * w for h, w in levels)), ("decoder", 300)):
        v, loc, w, g = make_inputs(lq, batch, levels)
        jv, jloc, jw, jg = (jax.device_put(a, jdev) for a in (v, loc, w, g))
        tv, tloc, tw, tg = (torch.tensor(a, device=tdev) for a in (v, loc, w, g))

        def run_torch_fwd(tv=tv, tloc=tloc, tw=tw):
            with torch.no_grad():
                ms_deform_attn_torch(tv, levels, tloc, tw)
            sync()

        def run_torch_fwd_bwd(tv=tv, tloc=tloc, tw=tw, tg=tg):
            a, b, c = (t.clone().requires_grad_(True) for t in (tv, tloc, tw))
            out = ms_deform_attn_torch(a, levels, b, c)
            torch.autograd.grad(out, (a, b, c), tg)
            sync()

        cases.append((name, "fwd", lambda a=(jv, jloc, jw): jfwd(*a).block_until_ready(),
                      run_torch_fwd))
        cases.append((name, "fwd+bwd",
                      lambda a=(jv, jloc, jw, jg): jax.block_until_ready(jfwd_bwd(*a)),
                      run_torch_fwd_bwd))
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    jdev = jax.devices(args.device)[0]
    tdev = "cuda" if args.device == "gpu" else "cpu"
    print(f"jax {jax.__version__} on {jdev.device_kind}; torch {torch.__version__} on {tdev} "
          f"({torch.get_num_threads()} threads); batch {args.batch}; median of {args.repeats}")
    print(f"{'shape':<10} {'pass':<9} {'jax ms':>9} {'torch ms':>9} {'speed-up':>9}")
    for name, pass_name, run_jax, run_torch in op_cases(jdev, tdev, args.batch):
        jt, tt = time_interleaved(run_jax, run_torch, args.repeats)
        print(f"{name:<10} {pass_name:<9} {jt * 1e3:9.2f} {tt * 1e3:9.2f} {tt / jt:8.2f}x",
              flush=True)

    v, loc, w, g = make_inputs(sum(h * w for h, w in LEVELS), 1)
    out_mib = v.size * 4 / 2**20
    jfwd, jfwd_bwd = jax_fns()
    for pass_name, fn, fn_args in (("fwd", jfwd, (v, loc, w)), ("fwd+bwd", jfwd_bwd, (v, loc, w, g))):
        mem = fn.lower(*fn_args).compile().memory_analysis()
        if mem is not None:
            temp = mem.temp_size_in_bytes / 2**20
            print(f"encoder {pass_name} (batch 1): XLA temporaries {temp:.1f} MiB = {temp / out_mib:.1f}x "
                  f"the output ({out_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
