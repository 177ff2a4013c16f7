"""Finished images to disk, off the request threads: a pool of threads sized to the cores encodes each image
(PNG, JPEG or WebP), hashes it and writes it atomically and durably (fsync'd before its manifest row exists).
Pillow's encoders, hashlib and file writes release the GIL, so the pool scales with cores in one process.

A bound on the images held in memory holds the request threads back when encoding or the disk is the bottleneck.
The first write error (disk full, permission, read-only mount, quota) is reported once with its path; nothing
is queued after it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from realfake.core.defaults import DEFAULT_FORMAT, DEFAULT_QUALITY
from realfake.core.files import write_atomic
from realfake.core.images import encode_image


class WriteError(Exception):
    """Writing one image failed: the path and the cause, as one line."""

    def __init__(self, path: Path, cause: BaseException):
        self.path, self.cause = path, cause
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        super().__init__(f"cannot write {path}: {reason}")


# per image: sha256 (hex), size (bytes) and mtime_ns of the written file; the last two make resume a `stat`
ImageFacts = dict
BatchDone = Callable[[list[ImageFacts] | None, WriteError | None], None]


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class ImageWriter:
    """Queue batches of images with `write_batch`; `close()` waits for what is queued."""

    def __init__(
        self,
        out: Path,
        fmt: str = DEFAULT_FORMAT,
        quality: int = DEFAULT_QUALITY,
        workers: int | None = None,
        max_pending: int | None = None,
    ):
        self.out, self.fmt, self.quality = out, fmt, quality
        self.workers = workers or default_workers()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rf-write")
        # each pending image holds its decoded array (0.75 MB at 512 px): a few per worker keeps them all busy
        self.slots = threading.Semaphore(max_pending or 8 * self.workers)
        self.failed: WriteError | None = None
        self.closed = False
        self.lock = threading.Lock()

    def write_batch(self, rels: Sequence[str], images: np.ndarray, on_done: BatchDone) -> None:
        """Encode and write `images` to OUT/<rel>; `on_done(facts, None)` runs once all are on disk (facts in
        order), or `on_done(None, error)` once, on the first failure. Blocks while too many images are pending."""
        state = {"left": len(rels), "facts": [None] * len(rels), "error": None}

        def finished(k: int, facts: ImageFacts | None, error: WriteError | None) -> None:
            with self.lock:
                if error is not None and state["error"] is None:
                    state["error"] = error
                    self.failed = self.failed or error
                state["facts"][k] = facts
                state["left"] -= 1
                last = state["left"] == 0
            if not last:
                return
            if state["error"] is None:
                on_done(state["facts"], None)
                return
            # a batch is recorded whole or not at all: the images of a failed batch that did land go
            for written, rel in zip(state["facts"], rels, strict=True):
                if written is not None:
                    (self.out / rel).unlink(missing_ok=True)
            on_done(None, state["error"])

        for k, (rel, image) in enumerate(zip(rels, images, strict=True)):
            self.slots.acquire()
            refusal = self.failed
            if refusal is None and self.closed:
                refusal = WriteError(self.out / rel, RuntimeError("the job is stopping"))
            if refusal is not None:  # the disk already failed, or the job stopped: queue nothing more
                self.slots.release()
                finished(k, None, refusal)
                continue
            try:
                self.pool.submit(self._write_one, k, rel, image, finished)
            except RuntimeError as exc:  # shut down between the check and the submit
                self.slots.release()
                finished(k, None, WriteError(self.out / rel, exc))

    def _write_one(self, k: int, rel: str, image: np.ndarray, finished) -> None:
        path = self.out / rel
        try:
            data = encode_image(image, self.fmt, self.quality)
            write_atomic(path, data, durable=True)
            st = os.stat(path)
            facts = {"sha256": hashlib.sha256(data).hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except Exception as exc:  # noqa: BLE001 - every failure reaches the job as one line with its path
            self.slots.release()
            finished(k, None, WriteError(path, exc))
            return
        self.slots.release()
        finished(k, facts, None)

    def close(self) -> None:
        """Wait for the images queued so far; later batches are refused (their callback gets an error)."""
        self.closed = True
        self.pool.shutdown(wait=True)
