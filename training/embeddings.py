"""The guidance token's CLIP image embeddings of the real images, cached so they scale to millions of rows.

The cache is a folder of chunks: `<id>.npy` (float32 [n, D]) and `<id>.keys.npy` (the n files' keys, fixed-width
bytes). A chunk is written atomically, embeddings first and keys last, so a chunk with keys is whole and a crash
keeps every finished chunk; a re-run computes only the keys no chunk holds. Loading reads the keys (24 bytes a
row) and memory-maps the embeddings: rows are read when a batch asks for them, never all held in memory.

Under accelerate every process takes its share of the missing images (rank::world), writes its own chunks into
the shared run directory (checkpoints already assume it is shared), then all read the complete cache.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from realfake.core.errors import UserError
from realfake.core.files import atomic_file

KEY_DTYPE = "S24"  # hex of a 96-bit digest
CHUNK_ROWS = 4096  # rows per chunk file: what a crash can lose at most, per process
BATCH = 64  # images per image-encoder call


def file_key(root: Path, relpath: str) -> bytes:
    """A file's cache key: its path under the data root, size and mtime (no read of the image)."""
    st = (root / relpath).stat()
    return hashlib.sha256(f"{relpath}/{st.st_size}/{st.st_mtime_ns}".encode()).hexdigest()[:24].encode()


class EmbeddingCache:
    """The chunk folder described above."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _chunks(self) -> list[Path]:
        return sorted(self.directory.glob("*.keys.npy"))

    def load(self, keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """For each of `keys`: (the chunks' memory-mapped arrays, chunk index per key, row per key); chunk index
        -1 where no chunk holds the key."""
        arrays, chunk_of, all_keys = [], [], []
        for i, key_file in enumerate(self._chunks()):
            stored = np.load(key_file)
            arrays.append(np.load(key_file.with_name(key_file.name[: -len(".keys.npy")] + ".npy"), mmap_mode="r"))
            all_keys.append(stored)
            chunk_of.append(np.full(len(stored), i, dtype=np.int32))
        chunk = np.full(len(keys), -1, dtype=np.int32)
        row = np.zeros(len(keys), dtype=np.int64)
        if not all_keys:
            return arrays, chunk, row
        flat = np.concatenate(all_keys)
        flat_chunk = np.concatenate(chunk_of)
        flat_row = np.concatenate([np.arange(len(k)) for k in all_keys])
        order = np.argsort(flat, kind="stable")
        pos = np.searchsorted(flat[order], keys).clip(max=len(flat) - 1)
        found = flat[order][pos] == keys
        chunk[found] = flat_chunk[order][pos][found]
        row[found] = flat_row[order][pos][found]
        return arrays, chunk, row

    def write(self, name: str, keys: np.ndarray, embeds: np.ndarray) -> None:
        """One chunk, atomically: the embeddings, then the keys that make it count."""
        with atomic_file(self.directory / f"{name}.npy") as f:
            np.save(f, np.ascontiguousarray(embeds, dtype=np.float32))
        with atomic_file(self.directory / f"{name}.keys.npy") as f:
            np.save(f, keys.astype(KEY_DTYPE))


class ImageEmbeddings:
    """The embeddings [N, D] of N samples, read from the cache's memory-mapped chunks row by row."""

    def __init__(self, arrays: list[np.ndarray], chunk: np.ndarray, row: np.ndarray):
        self.arrays, self.chunk, self.row = arrays, chunk, row

    def __len__(self) -> int:
        return len(self.chunk)

    def __getitem__(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.arrays[self.chunk[i]][self.row[i]] for i in indices]))


def fill_cache(
    cache: EmbeddingCache,
    keys: np.ndarray,
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    batch: int = BATCH,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[ImageEmbeddings, int]:
    """Compute the embeddings of `keys` no chunk holds yet, this process's share of them (`encode` maps sample
    indices to float [n, D]), in chunks of `chunk_rows`; then load them all. Returns (embeddings, rows computed
    by all processes). `barrier` waits for every process (accelerate's wait_for_everyone)."""
    keys = np.asarray(keys, dtype=KEY_DTYPE)
    _, chunk, _ = cache.load(keys)
    _, first = np.unique(keys, return_index=True)
    missing = np.sort(first[chunk[first] < 0])  # each missing file once, in sample order
    barrier()  # everyone has read the cache before anyone adds to it, so all agree on `missing`
    mine = missing[rank::world]
    run = f"{time.time_ns():x}-{rank}-{os.getpid()}"
    for n, start in enumerate(range(0, len(mine), chunk_rows)):
        part = mine[start : start + chunk_rows]
        embeds = np.concatenate([encode(part[b : b + batch]) for b in range(0, len(part), batch)])
        cache.write(f"{run}-{n:06d}", keys[part], embeds)
    barrier()
    arrays, chunk, row = cache.load(keys)
    if (chunk < 0).any():  # another process's chunks are not visible here
        raise UserError(
            f"{int((chunk < 0).sum())} image embeddings other processes computed are not in {cache.directory}: "
            "the run directory must be on a filesystem every process shares"
        )
    return ImageEmbeddings(arrays, chunk, row), len(missing)
