"""Fashion-MNIST (and MNIST-format) idx files: read them, and write a split out as an ImageFolder.

The four standard files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-...`) may sit in any
directory; Debian's `dataset-fashion-mnist` package puts them in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from realfake.core.classes import ClassInfo
from realfake.core.errors import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": "train", "test": "t10k"}


def _read(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(
            f"{path} is missing (install Debian's dataset-fashion-mnist or pass the directory of the idx files)"
        )
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        got, count = struct.unpack(">II", raw[:8])
        if got != magic:
            raise ValueError(f"magic {got:#x}, expected {magic:#x}")
        if magic == 2051:
            rows, cols = struct.unpack(">II", raw[8:16])
            data = np.frombuffer(raw, dtype=np.uint8, offset=16)
            if data.size != count * rows * cols:
                raise ValueError(f"{data.size} bytes of pixels, expected {count * rows * cols}")
            return data.reshape(count, rows, cols)
        data = np.frombuffer(raw, dtype=np.uint8, offset=8)
        if data.size != count:
            raise ValueError(f"{data.size} labels, expected {count}")
        return data
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise UserError(f"{path} is not a valid idx file ({exc})") from None


def load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of `train` or `test`."""
    prefix = SPLITS[split]
    images = _read(_find(directory, f"{prefix}-images-idx3-ubyte"), 2051)
    labels = _read(_find(directory, f"{prefix}-labels-idx1-ubyte"), 2049)
    if len(images) != len(labels):
        raise UserError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return directory / f"{stem}.gz"


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of `per_class` images of every label (seeded), in label-then-position order."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        pool = np.flatnonzero(labels == label)
        if len(pool) < per_class:
            raise UserError(f"label {label} has {len(pool)} images, fewer than {per_class}")
        picked.append(np.sort(rng.choice(pool, per_class, replace=False)))
    return np.concatenate(picked)


def write_imagefolder(
    images: np.ndarray, labels: np.ndarray, classes: list[ClassInfo], out: Path, indices: np.ndarray | None = None
) -> Path:
    """Write images as OUT/<class_id>/<position>.png (grayscale PNG)."""
    from PIL import Image

    indices = np.arange(len(images)) if indices is None else indices
    for c in classes:
        (out / c.id).mkdir(parents=True, exist_ok=True)
    for i in indices:
        path = out / classes[int(labels[i])].id / f"{int(i):05d}.png"
        if not path.exists():
            Image.fromarray(images[i]).save(path)
    return out
