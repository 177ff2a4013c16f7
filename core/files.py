"""Files written so a crash never leaves half of one, and content digests of files that may be GBs."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Write via a temporary file and rename, so a crash never leaves a partial file under the final name.

    `durable`: fsync the data before the rename, so the file is whole on disk before anything (a manifest row)
    records it. A failed write removes its temporary file and raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
