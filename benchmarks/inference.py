"""Benchmark: images/s of Detector.predict vs HuggingFace transformers, end to end.

Both take the same PIL images (800x1333) and return thresholded detections in
original-image pixels: JAX is `Detector.predict` (resize, normalise, pad to
the size bucket, jitted forward + post-processing); HF is its image processor
(DeformableDetrImageProcessorPil: resize, normalise, pad to the batch) +
DeformableDetrForObjectDetection + post_process_object_detection. Same random
weights (the HF multi-scale model converted), eval mode, runs interleaved,
torch with 2 threads (OMP_WAIT_POLICY=PASSIVE, see benchmarks/ms_deform_attn.py).

    python benchmarks/inference.py [--batch-sizes 1 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import random_hf_detr  # noqa: E402
from ddetr_jax.convert import load_torch_checkpoint  # noqa: E402
from ddetr_jax.inference import Detector  # noqa: E402


def smooth_images(count: int, height: int, width: int) -> list[Image.Image]:
    """Random low-frequency colour images (a blurred 8x13 grid of colours)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (8, 13, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR) for _ in range(count)]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--size-multiple", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers.models.deformable_detr.image_processing_pil_deformable_detr import \
        DeformableDetrImageProcessorPil

    torch.set_num_threads(args.threads)
    hf = random_hf_detr().eval()
    processor = DeformableDetrImageProcessorPil()
    model, _ = load_torch_checkpoint(hf.state_dict())
    detector = Detector(model, size_multiple=args.size_multiple,
                        batch_size=max(args.batch_sizes))

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); multi-scale R50, {args.height}x{args.width} "
          f"images, JAX bucket multiple {args.size_multiple}, median of {args.repeats}")
    for batch in args.batch_sizes:
        images = smooth_images(batch, args.height, args.width)
        sizes = [(args.height, args.width)] * batch

        def run_jax():
            detector.predict(images, score_threshold=0.3)

        def run_hf():
            with torch.no_grad():
                inputs = processor(images=images, return_tensors="pt")
                outputs = hf(**inputs)
                processor.post_process_object_detection(outputs, threshold=0.3,
                                                        target_sizes=sizes)

        start = time.perf_counter()
        run_jax()
        first_s = time.perf_counter() - start
        run_hf()
        jax_s, hf_s = median_seconds(run_jax, args.repeats), median_seconds(run_hf, args.repeats)
        print(f"batch {batch}: JAX {batch / jax_s:.3f} images/s ({jax_s:.2f} s/batch, first call "
              f"with compile {first_s:.1f} s)   HF {batch / hf_s:.3f} images/s "
              f"({hf_s:.2f} s/batch)   speed-up {hf_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
