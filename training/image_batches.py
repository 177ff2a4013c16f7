"""Decoding image files in batches for the models that read whole folders (captioning, data evaluation): files
decode on a few threads while the model runs, and a file that does not decode is reported, not fatal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class ImageBatch:
    keys: list[str]  # what the caller named each decoded image by (a relative path)
    images: list[Image.Image]  # RGB
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of files that did not decode


def _decode(path: Path) -> Image.Image | str:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: skip this file and say why
        return f"{type(exc).__name__}: {exc}"


def image_batches(root: Path, keys: list[str], batch_size: int, workers: int | None = None) -> Iterator[ImageBatch]:
    """Batches of `root / key` decoded to RGB, in order; the next batch decodes while the caller works."""
    workers = workers or min(4, os.cpu_count() or 1)
    chunks = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    with ThreadPoolExecutor(workers) as pool:

        def submit(chunk: list[str]):
            return [pool.submit(_decode, root / k) for k in chunk]

        pending = submit(chunks[0]) if chunks else []
        for n, chunk in enumerate(chunks):
            futures, pending = pending, submit(chunks[n + 1]) if n + 1 < len(chunks) else []
            batch = ImageBatch([], [])
            for key, fut in zip(chunk, futures, strict=True):
                result = fut.result()
                if isinstance(result, str):
                    batch.unreadable.append((key, result))
                else:
                    batch.keys.append(key)
                    batch.images.append(result)
            yield batch
