"""The finetune's input pipeline against the code it replaced, in one run:

1. the sample order: the permutation the old loop made again at every micro-step, against `EpochOrder` (one per
   epoch), at ImageNet's n = 1,281,167;
2. images/sec the training step receives at 512 px from ImageNet-sized JPEGs (500x375, q90), decoding in the
   training process (before: in series with the step) against DataLoader workers, alone and against a simulated
   GPU step (a sleep: the GPU is busy and the process idles, as under CUDA), so the overlap shows.

    python bench/finetune_input.py [--images 96] [--batch 8] [--gpu-step-ms 94] [--workers N]

The default GPU step, 94 ms for a batch of 8 at 512 px, is an estimate: ~3.5 TFLOP per image (UNet forward +
backward and the VAE encoder, FLOP-counted at SD-1.5 shapes) at 30 % of an H100's 989 TFLOP/s dense bf16.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _old_order(n: int, per_step: int, micro_step: int, seed: int) -> list[int]:
    """The order as the finetune drew it before: a full permutation per micro-step."""
    start, out = micro_step * per_step, []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(per_step - len(out), n - offset)
        out.extend(int(i) for i in order[offset : offset + take])
    return out


def _folder(root: Path, count: int) -> Path:
    from PIL import Image

    from realfake.client.throughput import textured_images

    for k, image in enumerate(textured_images(count, 500)):
        folder = root / ("cat", "dog")[k % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[:375]).save(folder / f"{k:05d}.jpg", quality=90)
    return root


def _rate(dataset, n: int, batch: int, workers: int, steps: int, step_s: float) -> float:
    from realfake.training.finetune_loader import StepBatches, step_loader

    loader = step_loader(dataset, StepBatches(n, batch, 0, 1, 0, 0, steps + 2), workers, pin_memory=False)
    batches = iter(loader)
    next(batches), next(batches)  # workers started, first batches made: the steady state is what a run sees
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
        if step_s:
            time.sleep(step_s)
    rate = steps * batch / (time.perf_counter() - t0)
    del batches, loader
    return rate


def main() -> None:
    from realfake.core.classes import load_classes
    from realfake.training.classify_config import default_workers
    from realfake.training.data import FinetuneDataset, collect_samples
    from realfake.training.finetune_loader import EpochOrder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="JPEGs in the temporary ImageFolder.")
    parser.add_argument("--batch", type=int, default=8, help="Images per step (per process).")
    parser.add_argument("--steps", type=int, default=10, help="Steps measured per row.")
    parser.add_argument("--gpu-step-ms", type=float, default=94.0, help="The simulated GPU step, ms per batch.")
    parser.add_argument("--workers", type=int, default=None, help="Loader workers (default: the finetune's).")
    args = parser.parse_args()

    n, per_step, calls = 1_281_167, 64, 20
    t0 = time.perf_counter()
    for m in range(calls):
        _old_order(n, per_step, m, 0)
    old = (time.perf_counter() - t0) / calls
    order, epoch_steps = EpochOrder(n, 0), n // per_step
    t0 = time.perf_counter()
    for m in range(epoch_steps):  # one epoch: its permutation once, then slices
        order.batch(per_step, m)
    new = (time.perf_counter() - t0) / epoch_steps
    print(f"sample order at n = {n:,}, {per_step} per step: per micro-step {old * 1e3:.1f} ms before, "
          f"{new * 1e3:.3f} ms now over an epoch's {epoch_steps:,} steps ({old / new:.0f}x)")  # fmt: skip

    workers = default_workers() if args.workers is None else args.workers
    workers = max(1, workers)
    root = Path(tempfile.mkdtemp(prefix="rf-finetune-input-"))
    try:
        real = _folder(root / "real", args.images)
        samples = collect_samples(real, load_classes("cifar10"), log=lambda m: None)
        dataset = FinetuneDataset(real, samples, 512, seed=0)
        print(f"loader at 512 px from {args.images} JPEGs 500x375, batch {args.batch}, {workers} worker(s):")
        for label, step_s in (("loading alone", 0.0), (f"with a {args.gpu_step_ms:g} ms GPU step", args.gpu_step_ms)):
            before = _rate(dataset, len(samples), args.batch, 0, args.steps, step_s / 1e3)
            now = _rate(dataset, len(samples), args.batch, workers, args.steps, step_s / 1e3)
            ceiling = f", the GPU's ceiling {args.batch / (step_s / 1e3):.1f}" if step_s else ""
            print(f"  {label:28} in the training process {before:6.1f} img/s, {workers} worker(s) {now:6.1f} img/s "
                  f"({now / before:.2f}x){ceiling}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
