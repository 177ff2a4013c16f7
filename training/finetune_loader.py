"""The finetune's input pipeline: which samples each process takes at each micro-step (one seeded permutation per
epoch, computed once per epoch), and a DataLoader whose workers decode, crop, flip and tokenise them ahead of the
GPU step (prefetched, pinned), so the accelerator never waits on the main process's Python.

The order is a function of (seed, micro-step) alone: a resumed run, any number of workers and any process see the
same samples with the same augmentation as an uninterrupted run."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from realfake.core.errors import UserError


class EpochOrder:
    """The global sample order: epoch e is `default_rng([seed, e]).permutation(n)`; global micro-step m takes the
    `per_step` samples from position m * per_step on, running over into the next epoch's order. Only the current
    epoch's permutation (and the next, at a boundary) is held: ~10 MB at n = 1.28 M, computed once per epoch."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise UserError("no real images to finetune on")
        self.n, self.seed = n, seed
        self._orders: dict[int, np.ndarray] = {}
        self.computed = 0  # permutations made (the test of "once per epoch")

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self.computed += 1
        return self._orders[epoch]

    def batch(self, per_step: int, micro_step: int) -> list[int]:
        start, out = micro_step * per_step, []
        while len(out) < per_step:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(per_step - len(out), self.n - offset)
            out.extend(int(i) for i in self.order(epoch)[offset : offset + take])
        return out


class StepBatches(torch.utils.data.Sampler):
    """A batch sampler: for each global micro-step in [start, stop), this process's share of the step's samples,
    as (sample index, micro-step) pairs (the micro-step salts the augmentation)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int, stop: int):
        self.order = EpochOrder(n, seed)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_step = self.batch_size * self.world
        for m in range(self.start, self.stop):
            mine = self.order.batch(per_step, m)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield [(i, m) for i in mine]


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([x["pixels"] for x in items]),
        "input_ids": torch.stack([x["input_ids"] for x in items]) if "input_ids" in items[0] else None,
        "prompts": [x["prompt"] for x in items],
        "indices": [x["index"] for x in items],
    }


def step_loader(dataset, sampler: StepBatches, workers: int, pin_memory: bool, prefetch: int = 4):
    """Batches in micro-step order; with workers, `prefetch` batches per worker are made ahead of the step."""
    kwargs = {"prefetch_factor": prefetch, "persistent_workers": True} if workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, pin_memory=pin_memory, **kwargs
    )


def resolve_length(max_steps: int | None, epochs: float | None, images: int, per_step: int) -> tuple[int, str]:
    """Optimizer steps of the run, and the line that says what they are in images and epochs. Neither given:
    at least 1000 steps and at least one epoch of the data (a default run is not a toy at ImageNet size)."""
    if max_steps is not None and epochs is not None:
        raise UserError("--max-steps and --epochs exclude each other: give the run's length one way")
    if epochs is not None:
        steps, how = max(1, math.ceil(epochs * images / per_step)), f"--epochs {epochs:g}"
    elif max_steps is not None:
        steps, how = max_steps, f"--max-steps {max_steps}"
    else:
        steps, how = max(1000, math.ceil(images / per_step)), "default: at least 1000 steps and one epoch"
    seen = steps * per_step
    return steps, (
        f"length: {steps:,} steps x {per_step:,} images = {seen:,} images seen, "
        f"{seen / images:.2f} epochs of {images:,} ({how})"
    )
