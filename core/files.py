"""Files written so a crash never leaves half of one, and content digests of files that may be GBs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", durable: bool = False, **open_args) -> Iterator[IO]:
    """A file whose content appears under `path` only when the block ends without an error: written to a
    temporary name beside it, then renamed, so a crash never leaves a partial file under the final name.

    `durable`: fsync the data before the rename, so the file is whole on disk before anything (a manifest row)
    records it. On an error the temporary file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """`data` under `path`, atomically (see `atomic_file`)."""
    with atomic_file(path, "wb", durable) as f:
        f.write(data)


def rf_home() -> Path:
    """This user's realfake folder (RF_HOME, default ~/.cache/realfake): models built on first use, caches."""
    return Path(os.environ.get("RF_HOME") or Path.home() / ".cache" / "realfake")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (plans and graphs can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(files) -> str:
    """One sha256 over several files, by name and content (graphs with their weights, sets of plans)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{Path(path).name}:{file_sha256(Path(path))}\n".encode())
    return digest.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (a copy across file systems), replacing what was there."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
