"""Turn a list of pipeline requests (as numpy arrays) into sampler calls, and results back into responses.

Triton's dynamic batcher hands the `pipeline` model several requests at once; images whose settings agree
are sampled in one batch, whatever request they came from. A batch that runs out of memory is halved and each
half run again, down to one image, so the same images come back (each image's noise comes from its own seed) and
only an image that does not fit alone fails. Kept free of Triton so it is unit-tested directly.
"""

from __future__ import annotations

import gc
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from realfake.core.defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_STEPS,
    TEXT_ONLY_STRENGTH,
)
from realfake.core.protocol import denoising_steps
from realfake.serving.sampler import BadImages, Sampler, Settings


@dataclass
class Item:
    request: int
    row: int
    prompt: str
    negative_prompt: str
    seed: int
    init_image: np.ndarray | None


def _column(arrays: dict, name: str, rows: int, default):
    if name not in arrays or arrays[name] is None:
        return [default] * rows
    values = np.asarray(arrays[name]).reshape(rows, -1)[:, 0]
    return list(values)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_request(index: int, arrays: dict, image_size: int) -> list[tuple[Settings, Item]]:
    """Validate one request's tensors and split it into per-image items; raises ValueError on bad input."""
    if "PROMPT" not in arrays or "SEED" not in arrays:
        raise ValueError("PROMPT and SEED are required")
    rows = int(np.asarray(arrays["PROMPT"]).shape[0])
    prompts = [_text(p) for p in _column(arrays, "PROMPT", rows, "")]
    negatives = [_text(p) for p in _column(arrays, "NEGATIVE_PROMPT", rows, b"")]
    seeds = [int(s) for s in _column(arrays, "SEED", rows, 0)]
    steps = [int(s) for s in _column(arrays, "STEPS", rows, DEFAULT_STEPS)]
    scales = [float(g) for g in _column(arrays, "GUIDANCE_SCALE", rows, DEFAULT_GUIDANCE_SCALE)]
    init = arrays.get("INIT_IMAGE")
    strengths = [
        float(s) for s in _column(arrays, "STRENGTH", rows, TEXT_ONLY_STRENGTH if init is None else DEFAULT_STRENGTH)
    ]
    tokens = [bool(t) for t in _column(arrays, "GUIDANCE_TOKEN", rows, False)]
    if init is not None:
        init = np.asarray(init)
        if init.dtype != np.uint8 or init.shape != (rows, image_size, image_size, 3):
            raise ValueError(
                f"INIT_IMAGE must be uint8 [{rows},{image_size},{image_size},3], got {init.dtype} {list(init.shape)}"
            )
    out = []
    for r in range(rows):
        if not 1 <= steps[r] <= MAX_STEPS:
            raise ValueError(f"STEPS must be in 1..{MAX_STEPS}, got {steps[r]}")
        if not np.isfinite(scales[r]) or scales[r] < 0:
            raise ValueError(f"GUIDANCE_SCALE must be a finite number >= 0, got {scales[r]}")
        if not 0.0 < strengths[r] <= 1.0:
            raise ValueError(f"STRENGTH must be in (0, 1], got {strengths[r]}")
        if init is None and (strengths[r] < 1.0 or tokens[r]):
            raise ValueError("STRENGTH < 1 and GUIDANCE_TOKEN need INIT_IMAGE")
        if init is not None and strengths[r] < 1.0 and denoising_steps(steps[r], strengths[r]) < 1:
            raise ValueError(
                f"STEPS {steps[r]} x STRENGTH {strengths[r]} leaves no step to denoise (int(steps x strength) = 0)"
            )
        if seeds[r] < 0:
            raise ValueError(f"SEED must be >= 0, got {seeds[r]}")
        settings = Settings(steps[r], scales[r], strengths[r], tokens[r])
        image = init[r] if init is not None else None
        out.append((settings, Item(index, r, prompts[r], negatives[r], seeds[r], image)))
    return out


# lower-cased fragments of the messages runtimes raise when memory runs out (PyTorch CUDA, ONNX Runtime CUDA and
# TensorRT providers, TensorRT, Triton BLS errors carrying either)
OOM_MESSAGES = ("out of memory", "cuda_error_out_of_memory", "failed to allocate memory", "std::bad_alloc")


@dataclass
class OomStats:
    """Per process: how often a batch was halved after running out of memory, and images that did not fit alone."""

    splits: int = 0
    failed_images: int = 0


OOM_STATS = OomStats()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says memory ran out: MemoryError, PyTorch's
    torch.cuda.OutOfMemoryError, or a runtime error whose message says so."""
    torch = sys.modules.get("torch")  # checked only when torch is already loaded: no import here
    cuda_oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or (cuda_oom is not None and isinstance(exc, cuda_oom)):
            return True
        text = str(exc).lower()
        if any(fragment in text for fragment in OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_memory() -> None:
    """Give back what a failed batch left behind: unreachable objects, and PyTorch's cached CUDA blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_available() and cuda.is_initialized():
        cuda.empty_cache()


def _sample(sampler: Sampler, chunk: list[Item], settings: Settings, has_init: bool, images: dict, results: list):
    """Sample `chunk`, halving it on out-of-memory; each failure goes to the requests of the images it hit."""
    try:
        out = sampler.generate(
            [it.prompt for it in chunk],
            [it.negative_prompt for it in chunk],
            [it.seed for it in chunk],
            settings,
            init_images=np.stack([it.init_image for it in chunk]) if has_init else None,
        )
    except BadImages as exc:  # the sound images stand; the requests of the others fail, saying why
        for k, (it, img) in enumerate(zip(chunk, exc.images, strict=True)):
            if exc.problems[k]:
                results[it.request] = ValueError(exc.message(k))
            else:
                images[(it.request, it.row)] = img
        return
    except Exception as exc:  # noqa: BLE001 - reported to the requests of this chunk, server lives on
        error: Exception | None = exc
        if is_out_of_memory(exc):
            if len(chunk) == 1:
                OOM_STATS.failed_images += 1
                error = MemoryError(f"out of memory sampling a single image: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            else:
                error = None  # split below, once this frame no longer holds the failed call's traceback
        if error is not None:
            for it in chunk:
                results[it.request] = error
            return
    else:
        for it, img in zip(chunk, out, strict=True):
            images[(it.request, it.row)] = img
        return
    free_memory()
    OOM_STATS.splits += 1
    half = (len(chunk) + 1) // 2
    _sample(sampler, chunk[:half], settings, has_init, images, results)
    _sample(sampler, chunk[half:], settings, has_init, images, results)


def run_batch(sampler: Sampler, requests: list[dict], max_batch: int = 64) -> list[np.ndarray | Exception]:
    """Per request: its images uint8 [rows,H,W,3], or the exception that explains why it failed."""
    results: list[np.ndarray | Exception | None] = [None] * len(requests)
    groups: dict[tuple, list[Item]] = defaultdict(list)
    rows_of: dict[int, int] = {}
    for i, arrays in enumerate(requests):
        try:
            parsed = parse_request(i, arrays, sampler.info.image_size)
        except ValueError as exc:
            results[i] = exc
            continue
        rows_of[i] = len(parsed)
        for settings, item in parsed:
            groups[(settings, item.init_image is not None)].append(item)
    images: dict[tuple[int, int], np.ndarray] = {}
    for (settings, has_init), items in groups.items():
        for start in range(0, len(items), max_batch):
            _sample(sampler, items[start : start + max_batch], settings, has_init, images, results)
    for i, rows in rows_of.items():
        if results[i] is None:
            results[i] = np.stack([images[(i, r)] for r in range(rows)])
    return results  # type: ignore[return-value]
