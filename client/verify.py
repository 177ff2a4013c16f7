"""`rf-client verify` and `pack`: check that a dataset is whole, and write it as WebDataset tar shards."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from realfake.core.dataset import manifest_files, read_manifest_rows
from realfake.core.errors import UserError
from realfake.core.files import file_sha256, write_atomic
from realfake.core.images import FORMATS, check_decodes


@dataclass
class Report:
    rows: int = 0
    images: int = 0
    class_counts: Counter = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)  # manifest row without its image
    undecodable: list[str] = field(default_factory=list)
    hash_mismatch: list[str] = field(default_factory=list)
    duplicate_rows: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # image without a manifest row

    @property
    def ok(self) -> bool:
        return not (self.missing or self.undecodable or self.hash_mismatch or self.duplicate_rows or self.unlisted)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "images": self.images,
            "classes": len(self.class_counts),
            "class_counts": dict(sorted(self.class_counts.items())),
            "missing": self.missing,
            "undecodable": self.undecodable,
            "hash_mismatch": self.hash_mismatch,
            "duplicate_rows": self.duplicate_rows,
            "unlisted": self.unlisted,
        }


def load_rows(out: Path) -> list[dict]:
    if not out.is_dir():
        raise UserError(f"{out} is not a directory")
    files = manifest_files(out)
    if not files:
        raise UserError(f"{out} has no manifest*.jsonl: is it an rf-client output directory?")
    return [row for f in files for row in read_manifest_rows(f)]


Progress = Callable[..., None]  # progress(done, problems, total=...): realfake.core.progress.ProgressLines.update


def verify(out: Path, decode: bool = True, progress: Progress | None = None) -> Report:
    """Every manifest row has its image (decodable, same hash) and every image has exactly one row.
    `progress(done, problems)` is called after each row (a cheap callback: it decides when to print)."""
    rows = load_rows(out)
    report = Report(rows=len(rows))
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        if progress:
            progress(n - 1, len(report.missing) + len(report.undecodable) + len(report.hash_mismatch), total=len(rows))
        rel = row["path"]
        if rel in seen:
            report.duplicate_rows.append(rel)
            continue
        seen.add(rel)
        path = out / rel
        if not path.is_file():
            report.missing.append(rel)
            continue
        if file_sha256(path) != row.get("sha256"):
            report.hash_mismatch.append(rel)
        elif decode and check_decodes(path) is not None:
            report.undecodable.append(rel)
        else:
            report.class_counts[row["class_id"]] += 1
    suffixes = set(FORMATS.values())
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*") if p.suffix in suffixes}
    report.images = len(on_disk)
    report.unlisted = sorted(on_disk - seen)
    return report


def pack_webdataset(
    out: Path, target: Path, shard_size: int = 1000, seed: int = 0, progress: Progress | None = None
) -> list[Path]:
    """Write the verified dataset as tar shards: <key>.<png|jpg|webp>, <key>.cls (class index), <key>.json (the
    manifest row). The samples are shuffled across classes with `seed` (the same seed, the same shards): a
    streaming loader shuffles only within a buffer of a few thousand samples, so shards in class order would feed
    it one class at a time."""
    report = verify(out, decode=False)
    if not report.ok:
        raise UserError(f"{out} is not whole (run `rf-client verify {out}`); refusing to pack it")
    if shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    rows = sorted({r["path"]: r for r in load_rows(out)}.values(), key=lambda r: (r["class_index"], r["index"]))
    random.Random(seed).shuffle(rows)
    target.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(rows), shard_size)):
        if progress:
            progress(start, 0, total=len(rows))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row in rows[start : start + shard_size]:
                key = row["path"].rsplit(".", 1)[0].replace("/", "__")
                members = {
                    row["path"].rsplit(".", 1)[1]: (out / row["path"]).read_bytes(),
                    "cls": str(row["class_index"]).encode(),
                    "json": json.dumps(row, sort_keys=True).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        path = target / f"shard-{n:05d}.tar"
        write_atomic(path, buf.getvalue())
        shards.append(path)
    return shards
