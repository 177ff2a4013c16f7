"""Where the labelled images of `rf-train classify` live: an rf-client output or WebDataset shards (synthetic),
class folders (an ImageFolder), or a flat folder plus a labels file, which is how the official ILSVRC-2012
validation set ships; validation sets each under a name of their own.

ILSVRC-2012 validation, as distributed: `ILSVRC2012_val_00000001.JPEG` ... in one folder, and the devkit's
`data/ILSVRC2012_validation_ground_truth.txt`: one 1-based ILSVRC2012_ID a line, line n for image n. Those ids
count the classes in the devkit's order (`data/meta.mat`), which is *not* the sorted-WordNet-id order of the
`imagenet` class set (core/data/imagenet.tsv, the order torchvision and ImageFolder use): the ground truth needs
the devkit's class order beside it (`--devkit-classes`). A file of `<image> <wnid>` lines needs nothing else;
Kaggle's LOC_val_solution.csv is such a file (its header is skipped, the boxes after the first wnid ignored).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realfake.core.classes import ClassInfo
from realfake.core.dataset import iter_manifest, manifest_files
from realfake.core.errors import UserError
from realfake.core.images import IMAGE_SUFFIXES
from realfake.core.real_folder import scan_real

DEVKIT_VAL_NAME = "ILSVRC2012_val_{:08d}"  # image n of the devkit's ground truth (stem; files end in .JPEG)


@dataclass(frozen=True)
class Ref:
    """Where one labelled image lives: a file, or a byte range inside a tar shard."""

    path: str
    label: int
    offset: int = -1
    size: int = 0


@dataclass(frozen=True)
class ValSpec:
    """One validation set: a name for the reports, its folder, and a labels file when the folder is flat."""

    name: str
    path: Path
    labels: Path | None = None

    @property
    def layout(self) -> str:
        return "flat + labels file" if self.labels else "class folders"


class RefTable:
    """Labelled images as a few arrays instead of a Python object per image: each image's name (UTF-8, fixed
    width) under one of a few roots (a folder, or a tar shard whose members are byte ranges), its label, and its
    byte range. About 40-60 bytes an image at ImageNet's path lengths, against ~2.8 KB for a manifest row's dict
    and a Ref (13 M rows: well under 1 GB per rank); and DataLoader workers share the arrays copy-on-write (a
    list of objects is copied page by page into every worker as their reference counts are written)."""

    CHUNK = 1 << 16  # rows held as Python objects before they become arrays (bounds the build's peak and leftovers)

    def __init__(self, roots, root_index, names, labels, offsets=None, sizes=None):
        n = len(labels)
        self.roots = list(roots)
        self.root_index = np.asarray(root_index, np.int32)
        self.names = np.asarray(names, dtype=np.bytes_) if len(names) else np.zeros(0, "S1")
        self.labels = np.asarray(labels, np.int32)
        # byte ranges only for members of tar shards; files have none (None: no 16 bytes a row spent on -1, 0)
        ranged = offsets is not None and bool(np.any(np.asarray(offsets) >= 0))
        self.offsets = np.asarray(offsets, np.int64) if ranged else None
        self.sizes = np.asarray(sizes, np.int64) if ranged else None
        assert self.root_index.shape == self.labels.shape == (n,)

    @classmethod
    def empty(cls) -> RefTable:
        return cls([], [], [], [])

    @classmethod
    def concat(cls, tables: Sequence[RefTable]) -> RefTable:
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        roots, index = [], []
        for t in tables:
            index.append(t.root_index + len(roots))
            roots += t.roots
        width = max(t.names.dtype.itemsize for t in tables)
        ranged = any(t.offsets is not None for t in tables)
        return cls(
            roots,
            np.concatenate(index),
            np.concatenate([t.names.astype(f"S{width}") for t in tables]),
            np.concatenate([t.labels for t in tables]),
            np.concatenate([t.offsets if t.offsets is not None else np.full(len(t), -1) for t in tables])
            if ranged
            else None,
            np.concatenate([t.sizes if t.sizes is not None else np.zeros(len(t), np.int64) for t in tables])
            if ranged
            else None,
        )

    def __add__(self, other: RefTable) -> RefTable:
        return RefTable.concat([self, other])

    def select(self, indices: np.ndarray) -> RefTable:
        i = np.asarray(indices, np.int64)
        ranged = self.offsets is not None
        offsets, sizes = (self.offsets[i], self.sizes[i]) if ranged else (None, None)
        return RefTable(self.roots, self.root_index[i], self.names[i], self.labels[i], offsets, sizes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Ref:
        root, name = self.roots[self.root_index[i]], self.names[i].decode("utf-8")
        path = f"{root}/{name}" if name else root
        if self.offsets is None:
            return Ref(path, int(self.labels[i]))
        return Ref(path, int(self.labels[i]), int(self.offsets[i]), int(self.sizes[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def label_set(self) -> set[int]:
        return set(np.unique(self.labels).tolist())

    @property
    def nbytes(self) -> int:
        arrays = (self.root_index, self.names, self.labels, self.offsets, self.sizes)
        return sum(a.nbytes for a in arrays if a is not None) + sum(len(r) for r in self.roots)


class _TableBuilder:
    """Rows appended one at a time, turned into arrays a chunk at a time."""

    def __init__(self):
        self._root_ids: dict[str, int] = {}  # root -> its index, in the order first seen
        self._rows: list[tuple[int, bytes, int, int, int]] = []
        self._tables: list[RefTable] = []

    def add(self, root: str, name: str, label: int, offset: int = -1, size: int = 0) -> None:
        r = self._root_ids.setdefault(root, len(self._root_ids))
        self._rows.append((r, name.encode("utf-8"), label, offset, size))
        if len(self._rows) >= RefTable.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            r, names, labels, offsets, sizes = zip(*self._rows, strict=True)
            self._tables.append(RefTable([], r, names, labels, offsets, sizes))
            self._rows = []

    def table(self) -> RefTable:
        self._flush()
        if not self._tables:
            return RefTable.empty()
        out = RefTable.concat(self._tables) if len(self._tables) > 1 else self._tables[0]
        out.roots = list(self._root_ids)  # the chunks index into the one list of roots
        self._tables = []  # the chunks' arrays go as the table is made (else a caller's builder keeps 2x)
        return out


def folder_refs(root: Path, classes: list[ClassInfo], option: str = "--real") -> RefTable:
    """An ImageFolder: one folder per class, named by class id or class name."""
    by_id = {c.id: c.index for c in classes}
    found = scan_real(root, classes, option)
    rows = _TableBuilder()
    for cid, rels in sorted(found.items()):
        for rel in rels:
            rows.add(str(root), rel, by_id[cid])
    return rows.table()


def synthetic_refs(root: Path, classes: list[ClassInfo], versions: int | None = None) -> RefTable:
    """An rf-client output (manifest rows) or a folder of WebDataset shards (`.cls` members). `versions`: only the
    first K versions of each real image (a job of `--versions V` writes real image r's version v as index
    r * V + v), the same job at 1x, 2x, ... without generating again."""
    by_id = {c.id: c.index for c in classes}
    if not root.is_dir():
        raise UserError(f"--synthetic {root} is not a directory")
    shards = sorted(root.glob("*.tar"))
    if versions is not None and shards:
        raise UserError(
            f"--versions selects by the manifest's image index: give the rf-client output, not the shards in {root}"
        )
    made = _job_versions(root) if versions is not None else 1
    if versions is not None and not 1 <= versions <= made:
        raise UserError(f"--versions {versions}: {root} holds {made} version(s) of each real image (job.json)")
    if shards:
        refs = _webdataset_refs(shards, len(classes))
        if not refs:
            raise UserError(
                f"--synthetic {root}: its {len(shards)} .tar shards hold no image member "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}): nothing to train on"
            )
        return refs
    if not manifest_files(root):
        raise UserError(f"--synthetic {root} has no manifest*.jsonl and no .tar shards: is it an rf-client output?")
    # rows streamed, only (path, label) kept; a path listed twice keeps its last row, and the table is in path
    # order (the order a dict of the rows, sorted, gave)
    rows, unknown = _TableBuilder(), set()
    for f in manifest_files(root):
        for r, _ in iter_manifest(f):  # one row at a time (read_manifest_rows holds a file's rows at once)
            label = by_id.get(r["class_id"])
            if label is None:
                unknown.add(r["class_id"])
                continue
            if versions is not None and r["index"] % made >= versions:
                continue
            rows.add(str(root), r["path"], label)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise UserError(f"--synthetic {root} has class ids that are not in the class set: {shown}")
    table = rows.table()
    if not len(table):
        raise UserError(f"--synthetic {root}: its manifests list no image: nothing to train on")
    order = np.argsort(table.names, kind="stable")
    names = table.names[order]
    last = np.append(names[1:] != names[:-1], True)  # the last row of each run of one path
    return table.select(order[last])


def _job_versions(root: Path) -> int:
    """How many versions of each real image the job in `root` makes (its job.json)."""
    import json

    from realfake.core.dataset import JOB_FILE

    try:
        return int(json.loads((root / JOB_FILE).read_text()).get("versions", 1))
    except (OSError, ValueError) as exc:
        raise UserError(f"--versions needs {root / JOB_FILE}, the job's record ({exc})") from None


def _webdataset_refs(shards: list[Path], n_classes: int) -> RefTable:
    refs = _TableBuilder()
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, m in members.items():
                key, dot, ext = name.rpartition(".")
                if not dot or "." + ext not in IMAGE_SUFFIXES:
                    continue
                cls_member = members.get(key + ".cls")
                if cls_member is None:
                    raise UserError(f"{shard}: {name} has no .cls label")
                label = int(tar.extractfile(cls_member).read())
                if not 0 <= label < n_classes:
                    raise UserError(f"{shard}: {name} has label {label}, outside the class set")
                refs.add(str(shard), "", label, m.offset_data, m.size)
    return refs.table()


def stratified_fraction(refs: RefTable, fraction: float, seed: int) -> RefTable:
    """round(fraction x n_c) images of every class c, chosen with a seeded generator."""
    return stratified(refs, seed, lambda n: round(fraction * n))


def stratified(refs: RefTable, seed: int, count: Callable[[int], int]) -> RefTable:
    """count(n_c) images of every class c (n_c: its images here), chosen with a seeded generator; class by class
    (in label order), each class's in table order."""
    order = np.argsort(refs.labels, kind="stable")  # each class's images in table order
    labels = refs.labels[order]
    bounds = np.flatnonzero(np.diff(labels)) + 1
    rng = np.random.default_rng(seed)
    picked = []
    for pool in np.split(order, bounds) if len(order) else []:
        picked.append(pool[np.sort(rng.choice(len(pool), count(len(pool)), replace=False))])
    return refs.select(np.concatenate(picked) if picked else np.zeros(0, np.int64))


def _split_named(spec: str | Path, option: str) -> tuple[str | None, Path]:
    """'NAME=PATH' or 'PATH'; a path that exists as written is taken whole even when it holds a '='."""
    text = str(spec)
    name, sep, rest = text.partition("=")
    if isinstance(spec, Path) or not sep or Path(text).exists():
        return None, Path(text)
    if not name or not rest:
        raise UserError(f"{option} {text!r}: write NAME=PATH or PATH")
    return name, Path(rest)


def val_specs(val: str | Path | Sequence[str | Path], labels: Sequence[str | Path] = ()) -> list[ValSpec]:
    """The validation sets of `--val [NAME=]DIR` (repeatable; a name defaults to the folder's) with their
    `--val-labels [NAME=]FILE` (a name may be left out when there is one validation set)."""
    items = [val] if isinstance(val, (str, Path)) else list(val)
    if not items:
        raise UserError("give at least one --val")
    folders: dict[str, Path] = {}
    for item in items:
        name, path = _split_named(item, "--val")
        name = name or path.name or str(path)
        if name in folders:
            raise UserError(f"two validation sets are named {name!r}: name them, --val NAME=DIR")
        folders[name] = path
    label_files: dict[str, Path] = {}
    for item in labels:
        name, path = _split_named(item, "--val-labels")
        if name is None:
            if len(folders) > 1:
                raise UserError(f"--val-labels {item}: say which validation set it labels, --val-labels NAME=FILE")
            name = next(iter(folders))
        if name not in folders:
            raise UserError(f"--val-labels {item}: no validation set is named {name!r} ({', '.join(folders)})")
        label_files[name] = path
    return [ValSpec(name, path, label_files.get(name)) for name, path in folders.items()]


def read_devkit_classes(path: Path, classes: list[ClassInfo]) -> dict[int, int]:
    """ILSVRC2012_ID -> class index, from a text file: one class id (wnid) a line in the devkit's order (line n
    is ID n), or `<ID> <wnid>` lines."""
    by_id = {c.id: c.index for c in classes}
    order: dict[int, int] = {}
    for n, tokens in _rows(path):
        number, wnid = (tokens[0], tokens[1]) if len(tokens) > 1 else (str(len(order) + 1), tokens[0])
        if not number.isdigit() or wnid not in by_id:
            raise UserError(
                f"--devkit-classes {path} line {n}: expected a class id of the set or '<ILSVRC2012_ID> <class id>',"
                f" got {' '.join(tokens[:2])!r}"
            )
        order[int(number)] = by_id[wnid]
    if not order:
        raise UserError(f"--devkit-classes {path} is empty")
    return order


def read_val_labels(path: Path, classes: list[ClassInfo], devkit: dict[int, int] | None) -> dict[str, int]:
    """Image stem -> class index, from the devkit's ground truth (one ILSVRC2012_ID a line, needs `devkit`) or
    from `<image> <class id>` lines (whitespace or comma separated; a CSV header and further columns ignored)."""
    rows = list(_rows(path))
    if not rows:
        raise UserError(f"--val-labels {path} is empty")
    if all(len(tokens) == 1 and tokens[0].isdigit() for _, tokens in rows):
        if devkit is None:
            raise UserError(
                f"--val-labels {path} holds ILSVRC2012_IDs (the devkit's ground truth): give the devkit's class order"
                " too, --devkit-classes FILE (one wnid a line in ILSVRC2012_ID order)"
            )
        labels = {}
        for image, (n, tokens) in enumerate(rows, 1):
            if int(tokens[0]) not in devkit:
                raise UserError(f"--val-labels {path} line {n}: ILSVRC2012_ID {tokens[0]} is not in --devkit-classes")
            labels[DEVKIT_VAL_NAME.format(image)] = devkit[int(tokens[0])]
        return labels
    by_id = {c.id: c.index for c in classes}
    labels = {}
    for n, tokens in rows:
        if n == rows[0][0] and tokens[0].casefold() == "imageid":  # LOC_val_solution.csv's header
            continue
        if len(tokens) < 2 or tokens[1] not in by_id:
            got = tokens[1] if len(tokens) > 1 else "nothing"
            raise UserError(
                f"--val-labels {path} line {n}: expected '<image> <class id>' with a class id of the set, got {got!r}"
            )
        labels[Path(tokens[0]).stem] = by_id[tokens[1]]
    return labels


def val_refs(spec: ValSpec, classes: list[ClassInfo], devkit: dict[int, int] | None) -> tuple[RefTable, int]:
    """A validation set's images with their labels, and how many labelled images are absent (flat sets only)."""
    if spec.labels:
        return flat_refs(spec, classes, devkit)
    if spec.path.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in spec.path.iterdir()):
        raise UserError(
            f"--val {spec.path} holds images directly, not in class folders: give their labels, --val-labels"
            f" [{spec.name}=]FILE ('<image> <wnid>' lines, or the devkit's ground truth with --devkit-classes)"
        )
    return folder_refs(spec.path, classes, "--val"), 0


def flat_refs(spec: ValSpec, classes: list[ClassInfo], devkit: dict[int, int] | None) -> tuple[RefTable, int]:
    """The images directly in `spec.path`, labelled by the labels file; also how many labelled images are absent
    (a partial copy of the set). An image without a label is refused: its accuracy would be a guess."""
    if not spec.path.is_dir():
        raise UserError(f"--val {spec.path} is not a directory")
    labels = read_val_labels(spec.labels, classes, devkit)
    files = sorted(p for p in spec.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--val {spec.path} holds no images directly in it (a labels file labels a flat folder)")
    unlabelled = [p.name for p in files if p.stem not in labels]
    if unlabelled:
        raise UserError(
            f"--val {spec.path}: {len(unlabelled)} image(s) have no label in {spec.labels}, e.g. {unlabelled[0]}"
        )
    rows = _TableBuilder()
    for p in files:
        rows.add(str(spec.path), p.name, labels[p.stem])
    return rows.table(), len(labels) - len(files)


def _rows(path: Path):
    """(line number, tokens) of the non-blank lines of a text file."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens = [t for t in re.split(r"[,\s]+", line.strip()) if t]
        if tokens:
            yield n, tokens
