"""The classifier's input cost per CPU core: images/sec one process decodes and augments at 224 px
(`rf-train classify`'s training transform: RandomResizedCrop + flip + normalise) from the 512-px files generation
writes (PNG, JPEG q95, WebP q95), and the cores a ResNet-50 GPU then needs to be fed.

The GPU rates are NVIDIA's published ResNet-50 v1.5 PyTorch training throughput with mixed precision on DGX A100
(A100 80GB, NGC pytorch-21.03; NVIDIA/DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5):
2470 img/s on one GPU, 16621 img/s on eight (2078 per GPU). They used DALI; loading with PIL as here is the cost
this product's loader pays.

    python bench/loader_bench.py [--images 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import io
import time

A100_ONE, A100_EIGHT_PER_GPU = 2470, 16621 / 8  # img/s, see above


def main() -> None:
    import torch
    from PIL import Image

    from realfake.client.throughput import textured_images
    from realfake.core.images import encode_image
    from realfake.training.classify import transforms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="Distinct 512-px images per format.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Seconds measured per format.")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core: a loader worker
    transform = transforms(224, True, small=False)
    pixels = textured_images(args.images, 512)
    rows = []
    for fmt in ("png", "jpeg", "webp"):
        files = [encode_image(p, fmt) for p in pixels]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            with Image.open(io.BytesIO(files[n % len(files)])) as im:
                transform(im.convert("RGB"))
            n += 1
        rate = n / (time.perf_counter() - t0)
        rows.append((fmt, sum(map(len, files)) / len(files) / 1024, rate))
    base = rows[0][2]
    print("decode + augment at 224 px from 512-px files, one core (torch threads 1):")
    print(f"{'format':6} {'KB/image':>9} {'img/s/core':>11} {'vs png':>7} {'cores per A100':>15} {'(8-GPU rate)':>13}")
    for fmt, kb, rate in rows:
        print(f"{fmt:6} {kb:>9.0f} {rate:>11.1f} {rate / base:>6.2f}x {A100_ONE / rate:>15.1f} "
              f"{A100_EIGHT_PER_GPU / rate:>13.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
