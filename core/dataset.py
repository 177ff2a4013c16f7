"""The dataset a job builds: its settings, the work items, seeds, the on-disk layout and the manifest.

Layout: DIR/<class_id>/<index>.png, DIR/job.json (the settings), DIR/manifest.jsonl (one row per finished image;
`manifest.shard-I-of-N.jsonl` per shard). Image (class, index) always gets the same seed and prompt for a job,
so any number of processes can split a job and resume it without overlap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from realfake.core.classes import ClassInfo
from realfake.core.defaults import (
    DEFAULT_FORMAT,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
)
from realfake.core.errors import UserError
from realfake.core.files import atomic_file, file_sha256

JOB_FILE = "job.json"
# what the standard loaders read beside the images: torchvision ImageFolder's class order (sorted folder names)
# and Hugging Face's imagefolder metadata (its `file_name` column names the image)
CLASSES_FILE = "classes.txt"
CLASS_TO_IDX_FILE = "class_to_idx.json"
HF_METADATA_FILE = "metadata.jsonl"


def image_seed(job_seed: int, class_id: str, index: int) -> int:
    """The seed of image (class, index): stable across machines, processes and Python versions."""
    digest = hashlib.sha256(f"{job_seed}/{class_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def render_prompt(template: str, class_name: str, caption: str = "") -> str:
    """Fill `{class}` and `{caption}`; without a caption its clause is dropped, not left empty."""
    if not caption:
        for clause in (", {caption}", "{caption}, ", "{caption}"):
            template = template.replace(clause, "")
    return template.replace("{class}", class_name).replace("{caption}", caption)


@dataclass(frozen=True)
class WorkItem:
    cls: ClassInfo
    index: int  # image index within its class
    seed: int
    prompt: str
    real_image: str | None = None  # path of the real image (conditioned mode), relative to the real root
    caption: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.cls.id, self.index)


@dataclass
class JobSpec:
    """Everything that determines the images; stored in job.json and compared on resume."""

    classes: list[dict]
    per_class: int
    seed: int = 0
    prompt_template: str = DEFAULT_TEMPLATE
    negative_prompt: str = DEFAULT_NEGATIVE
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    strength: float | None = None
    guidance_token: bool = False
    versions: int = 1
    real: str | None = None
    captions_digest: str | None = None
    model: str | None = None
    engine: str | None = None  # the servers' engine (see PARAM_ENGINE), or "mixed" with --mixed-engines
    image_format: str = DEFAULT_FORMAT  # png, jpeg or webp (realfake.core.images.FORMATS)
    quality: int | None = None  # jpeg/webp quality; None for png
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def differences(self, other: JobSpec) -> list[str]:
        mine, theirs = self.to_json(), other.to_json()
        return sorted(k for k in mine if mine[k] != theirs.get(k))


def index_width(spec: JobSpec) -> int:
    return max(5, len(str(spec.per_class * spec.versions - 1)))


def image_relpath(item: WorkItem, width: int, suffix: str = ".png") -> str:
    return f"{item.cls.id}/{item.index:0{width}d}{suffix}"


def shard_of(item: WorkItem, shards: int) -> int:
    """Which of `shards` client processes owns an item: by its key, so the split is stable."""
    digest = hashlib.sha256(f"{item.cls.id}/{item.index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % shards


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N")
    return (i, n)


def manifest_name(shard: tuple[int, int]) -> str:
    i, n = shard
    return "manifest.jsonl" if n == 1 else f"manifest.shard-{i}-of-{n}.jsonl"


def manifest_files(out: Path) -> list[Path]:
    return sorted(out.glob("manifest*.jsonl"))


def iter_manifest(path: Path) -> Iterator[tuple[dict, str]]:
    """(row, line) of a manifest, streamed; a torn last line (crash mid-write) is dropped, any other bad line is
    an error."""
    torn = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if torn is not None:  # a bad line with rows after it: not a crash mid-write
                raise UserError(f"{path} line {torn} is not valid JSON: the manifest was edited or corrupted")
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn = n
                continue
            yield row, line if line.endswith("\n") else line + "\n"


def read_manifest_rows(path: Path) -> list[dict]:
    """Rows of a manifest; a torn last line (crash mid-write) is dropped, any other bad line is an error."""
    return [row for row, _ in iter_manifest(path)]


def manifest_keys(path: Path) -> set[tuple[str, int]]:
    """The (class id, index) keys a manifest lists, without keeping its rows."""
    return {(row["class_id"], int(row["index"])) for row, _ in iter_manifest(path)}


def remove_stale_temporaries(out: Path, shard: tuple[int, int]) -> None:
    """Delete temporaries a killed run left behind (never a finished file: those have their final name).

    Only unsharded runs clean up: shard processes may run side by side and own each other's temporaries.
    """
    if shard[1] == 1:
        for tmp in out.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)


class ManifestWriter:
    """Append-only JSONL, flushed and fsync'd every `sync_every` rows or `sync_seconds` seconds."""

    def __init__(self, path: Path, sync_every: int = 64, sync_seconds: float = 2.0):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")
        self.sync_every, self.sync_seconds = sync_every, sync_seconds
        self.pending, self.last_sync = 0, time.monotonic()

    def append(self, row: dict) -> None:
        self.file.write(json.dumps(row, sort_keys=True) + "\n")
        self.pending += 1
        if self.pending >= self.sync_every or time.monotonic() - self.last_sync > self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.pending, self.last_sync = 0, time.monotonic()

    def close(self) -> None:
        """Sync and close; the file is closed even when the sync fails (the error is raised)."""
        if self.file.closed:
            return
        try:
            self.sync()
        finally:
            with contextlib.suppress(OSError):  # what the failed sync could not write is lost either way
                self.file.close()


def image_is_recorded(image: Path, row: dict) -> bool:
    """Whether the image on disk is the one a row records. Rows carry the file's size and mtime (ns), which a
    `stat` confirms without reading the image: the client fsyncs each image before its row exists. Rows from
    older manifests, and files copied without their mtimes, are checked by hash; another size is never the same
    image."""
    try:
        st = image.stat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if "size" in row and st.st_size != row["size"]:
        return False
    if st.st_mtime_ns == row.get("mtime_ns"):
        return True
    # no mtime recorded (an older manifest), or the file was copied without it: the content decides
    return file_sha256(image) == row.get("sha256")


def compact_manifest(out: Path, name: str) -> set[tuple[str, int]]:
    """Keep the rows of this shard's manifest whose image is on disk as recorded, rewrite the manifest
    atomically, and return the finished keys (class id, index). Rows for missing or changed images are dropped,
    so those images are remade; a key listed twice is kept once. Streams the manifest: memory holds the keys, not
    the rows, and no image is read (see `image_is_recorded`), so a 1.3 M-row resume takes seconds."""
    path = out / name
    if not path.exists():
        return set()
    done: set[tuple[str, int]] = set()
    with atomic_file(path, "w", durable=True, encoding="utf-8") as kept:
        for row, line in iter_manifest(path):
            key = (row["class_id"], int(row["index"]))
            if key not in done and image_is_recorded(out / row["path"], row):
                done.add(key)
                kept.write(line)
    return done


def merge_manifests(out: Path, progress=None) -> tuple[int, int]:
    """Fold the shards' manifests (manifest.shard-I-of-N.jsonl) into OUT/manifest.jsonl, for the tools that read one
    manifest: rows streamed in file order, a key listed twice kept once. The merged file is written and fsync'd
    before any shard file goes, so a crash at any point loses no row and the merge can simply run again.
    Run it once every shard has finished. `progress(rows, 0)` is called per row read. Returns (rows, shard files
    merged)."""
    main = out / manifest_name((0, 1))
    shards = [f for f in manifest_files(out) if f.name != main.name]
    if not shards:
        if main.exists():
            write_loader_files(out)
        return (sum(1 for _ in iter_manifest(main)) if main.exists() else 0), 0
    seen: set[tuple[str, int]] = set()
    with atomic_file(main, "w", durable=True, encoding="utf-8") as merged:
        for source in ([main] if main.exists() else []) + shards:
            for row, line in iter_manifest(source):
                key = (row["class_id"], int(row["index"]))
                if progress:
                    progress(len(seen), 0)
                if key not in seen:
                    seen.add(key)
                    merged.write(line)
    for source in shards:
        source.unlink()
    write_loader_files(out)
    return len(seen), len(shards)


def write_loader_files(out: Path) -> str | None:
    """Write what the standard loaders read with the labels, from OUT's manifests: classes.txt (one class id a
    line, in torchvision ImageFolder's order: sorted folder names), class_to_idx.json (ImageFolder's
    `class_to_idx`) and metadata.jsonl (Hugging Face imagefolder: `file_name`, `label` = the ImageFolder index,
    and the manifest's class id, class-set index, prompt and seed). Streams the manifests; each file is replaced
    atomically. Returns a note when ImageFolder's order differs from the class set's, else None."""
    files = manifest_files(out)
    class_set_index: dict[str, int] = {}
    for f in files:
        for row, _ in iter_manifest(f):
            class_set_index.setdefault(row["class_id"], row.get("class_index"))
    folder_order = sorted(class_set_index)
    to_idx = {cid: i for i, cid in enumerate(folder_order)}
    with atomic_file(out / CLASSES_FILE, "w", encoding="utf-8") as fh:
        fh.writelines(f"{cid}\n" for cid in folder_order)
    with atomic_file(out / CLASS_TO_IDX_FILE, "w", encoding="utf-8") as fh:
        json.dump(to_idx, fh, indent=1)
    seen: set[str] = set()
    with atomic_file(out / HF_METADATA_FILE, "w", encoding="utf-8") as fh:
        for f in files:
            for row, _ in iter_manifest(f):
                if row["path"] in seen:
                    continue
                seen.add(row["path"])
                meta = {
                    "file_name": row["path"],
                    "label": to_idx[row["class_id"]],
                    "class_id": row["class_id"],
                    "class_index": row.get("class_index"),
                    "prompt": row.get("prompt"),
                    "seed": row.get("seed"),
                }
                fh.write(json.dumps(meta) + "\n")
    if any(v is None for v in class_set_index.values()):  # rows of an older version: no class-set index to compare
        return None
    set_order = sorted(class_set_index, key=class_set_index.get)
    moved = [cid for rank, cid in enumerate(set_order) if to_idx[cid] != rank]
    if not moved:
        return None
    first = moved[0]
    return (
        f"ImageFolder orders the classes by folder name: {len(moved)} of {len(set_order)} classes have another index "
        f"than in the class set (e.g. {first}: class set {set_order.index(first)}, ImageFolder {to_idx[first]}). "
        f"{CLASSES_FILE}, {CLASS_TO_IDX_FILE} and {HF_METADATA_FILE} give ImageFolder's order; the manifest's "
        "class_index and the WebDataset .cls the class set's"
    )
