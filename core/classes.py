"""Class sets: the labels a dataset is made of, each with a stable id (its folder name) and a readable name.

ImageNet's readable names are distinct prompt names (the `prompt_name` column of data/imagenet.tsv): the first
WordNet lemma where it is unique and unambiguous, a clearer synonym or a short disambiguation where it is shared
("crane" the bird and the machine) or misleading ("kite" the bird of prey). The WordNet lemma stays in `lemma`.

Built in: `imagenet` (ILSVRC-2012, 1000 classes in the standard index order, WordNet ids), `cifar10`,
`cifar100`, `fashion-mnist`. Or a file of one's own: text (one name a line), JSON or CSV with id,name.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from realfake.core.errors import UserError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
FASHION_MNIST = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
BUILTIN = ("imagenet", "cifar10", "cifar100", "fashion-mnist")


@dataclass(frozen=True)
class ClassInfo:
    index: int  # position in the set: the label a classifier learns
    id: str  # stable, filesystem-safe identifier: the dataset folder name
    name: str  # readable name used in prompts (and the manifest's class_name)
    lemma: str = ""  # the source name: ImageNet's first WordNet lemma; elsewhere the name itself

    def __post_init__(self) -> None:
        if not self.lemma:
            object.__setattr__(self, "lemma", self.name)


def slug(name: str) -> str:
    """A filesystem-safe id from a readable name: 'T-shirt/top' -> 't_shirt_top'."""
    s = re.sub(r"[^0-9a-zA-Z]+", "_", name.strip()).strip("_").lower()
    if not s:
        raise ValueError(f"class name {name!r} has no letters or digits")
    return s


def _from_names(names: list[str]) -> list[ClassInfo]:
    return [ClassInfo(i, slug(n), n.replace("_", " ")) for i, n in enumerate(names)]


def _imagenet() -> list[ClassInfo]:
    # rows in sorted-wnid order (torchvision's and ImageFolder's indices), not the devkit's ILSVRC2012_ID order
    text = resources.files("realfake.core").joinpath("data/imagenet.tsv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    col = {c: n for n, c in enumerate(lines[0].split("\t"))}
    rows = [line.split("\t") for line in lines[1:]]
    return [ClassInfo(i, r[col["wnid"]], r[col["prompt_name"]], r[col["name"]]) for i, r in enumerate(rows)]


def load_classes(spec: str) -> list[ClassInfo]:
    """A built-in set by name, a path to a class file, or an ImageFolder (a folder per class: the classes are its
    folder names); raises UserError with the reason otherwise."""
    key = spec.strip().lower()
    if key == "imagenet":
        return _imagenet()
    if key == "cifar10":
        return _from_names(CIFAR10)
    if key == "cifar100":
        return _from_names(CIFAR100)
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _from_names(FASHION_MNIST)
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"unknown class set {spec!r}: use one of {', '.join(BUILTIN)}, a path to a class file, or an ImageFolder"
        )
    if path.is_dir():
        return classes_from_folder(path)
    return load_class_file(path)


def classes_from_folder(root: Path) -> list[ClassInfo]:
    """An ImageFolder's classes: one per sub-folder, in sorted order (ImageFolder's indices). The id is the folder
    name (so datasets mirror the user's folders); the prompt name reads it with '_' and '-' as spaces."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root} has no class folders: an ImageFolder holds one folder of images per class")
    out = []
    for i, folder in enumerate(folders):
        safe = re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._-]*", folder) is not None
        name = re.sub(r"[_-]+", " ", folder).strip() or folder
        out.append(ClassInfo(i, folder if safe else slug(folder), name))
    return out


def load_class_file(path: Path) -> list[ClassInfo]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"class file {path}: cannot read it ({exc})") from exc
    if not text.strip():
        raise UserError(f"class file {path} is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            pairs = _json_pairs(json.loads(text))
        elif suffix == ".csv":
            pairs = _csv_pairs(text)
        else:
            names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            pairs = [(slug(n), n) for n in names]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"class file {path} is malformed: {exc}") from exc
    if not pairs:
        raise UserError(f"class file {path} names no classes")
    ids = [i for i, _ in pairs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"class file {path}: duplicate class ids {', '.join(dupes[:5])}")
    for cid, _ in pairs:
        if slug(cid) != cid.lower() and not re.fullmatch(r"[0-9A-Za-z_.-]+", cid):
            raise UserError(f"class file {path}: id {cid!r} is not filesystem-safe (letters, digits, _ . - only)")
    return [ClassInfo(i, cid, name) for i, (cid, name) in enumerate(pairs)]


def _json_pairs(data) -> list[tuple[str, str]]:
    if isinstance(data, dict):
        return [(str(k), str(v)) for k, v in data.items()]
    if isinstance(data, list):
        out = []
        for n, row in enumerate(data, 1):
            if isinstance(row, str):
                out.append((slug(row), row))
            elif isinstance(row, dict) and "name" in row:
                out.append((str(row.get("id") or slug(row["name"])), str(row["name"])))
            else:
                raise ValueError(f"entry {n} is neither a name nor an object with 'name'")
        return out
    raise ValueError("expected a JSON list of names/objects or an object id -> name")


def _csv_pairs(text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "name" not in reader.fieldnames:
        raise ValueError("CSV needs a header with a 'name' column (and optionally 'id')")
    out = []
    for n, row in enumerate(reader, 2):
        name = (row.get("name") or "").strip()
        if not name:
            raise ValueError(f"line {n} has an empty name")
        out.append(((row.get("id") or "").strip() or slug(name), name))
    return out
