"""`rf-train corrupt`: a corrupted copy of a real test ImageFolder with the ImageNet-C corruptions (Hendrycks &
Dietterich, 2019), as the `imagecorruptions` package implements them, laid out as ImageNet-C is:
OUT/<corruption>/<severity>/<class folder>/<image>. Each OUT/<corruption>/<severity> is an ImageFolder of the
source's classes, so `rf-train classify --val NAME=DIR` scores it (out-of-distribution robustness: the top-1 drop
from the clean set).

Images with a side under 32 px are enlarged (bicubic) to 32 first, the package's smallest size.
Deterministic (each image's corruption is seeded by (seed, corruption, severity, image)), resumable (finished
files are kept, each written atomically) and spread over worker processes; OUT/corrupt.json records what was made.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.images import IMAGE_SUFFIXES, centre_crop, encode_image, resize_short_side
from realfake.core.progress import ProgressLines
from realfake.training.classify_config import default_workers

SEVERITIES = (1, 2, 3, 4, 5)
GROUPS = ("common", "validation", "all")  # imagecorruptions' sets: the 15 of the benchmark, its 4 held-out, both
SUFFIX = {"png": ".png", "jpeg": ".JPEG", "webp": ".webp"}
MIN_SIDE = 32  # imagecorruptions' smallest side: smaller images (28-px Fashion-MNIST) are enlarged to it first


@dataclass
class CorruptConfig:
    real: Path  # an ImageFolder: one folder per class
    out: Path
    corruptions: str = "common"  # a GROUPS name, or comma-separated corruption names
    severities: Sequence[int] = SEVERITIES
    image_size: int | None = None  # ImageNet-C's protocol: short side to size / 0.875, centre crop (None: as is)
    image_format: str = "jpeg"  # ImageNet-C ships JPEG; png keeps every pixel
    quality: int = 95
    seed: int = 0
    workers: int | None = None  # None: classify_config.default_workers()
    limit_per_class: int | None = None  # the first N images of each class only (a quicker, smaller set)

    def names(self) -> list[str]:
        available = corruption_names("all")
        if self.corruptions in GROUPS:
            return corruption_names(self.corruptions)
        names = [n.strip() for n in self.corruptions.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            raise UserError(
                f"unknown corruption(s) {', '.join(unknown) or repr(self.corruptions)}: give {', '.join(GROUPS)} or "
                f"names from {', '.join(available)}"
            )
        return names


def corruption_names(group: str = "common") -> list[str]:
    return list(_imagecorruptions().get_corruption_names(group))


def _imagecorruptions():
    """The `imagecorruptions` module, working on today's scikit-image: it still passes `multichannel=True` to
    `skimage.filters.gaussian`, which scikit-image 0.19 renamed to `channel_axis`."""
    try:
        with warnings.catch_warnings():  # its own imports of deprecated scipy and setuptools names
            warnings.simplefilter("ignore")
            import imagecorruptions
            from imagecorruptions import corruptions
    except ImportError as exc:
        raise UserError(f"rf-train corrupt needs the `imagecorruptions` package ({exc})") from None
    if not getattr(corruptions, "_realfake_shim", False):
        from skimage.filters import gaussian

        def compatible_gaussian(image, *args, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault("channel_axis", -1)
            return gaussian(image, *args, **kwargs)

        corruptions.gaussian = compatible_gaussian
        corruptions._realfake_shim = True
    return imagecorruptions


def list_images(root: Path, limit_per_class: int | None = None) -> list[str]:
    """Image paths under `root`'s class folders, relative to it, in sorted order."""
    if not Path(root).is_dir():
        raise UserError(f"--real {root} is not a directory (expected an ImageFolder: one folder per class)")
    rels = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        rels += [f"{folder.name}/{f.name}" for f in files[:limit_per_class]]
    if not rels:
        raise UserError(f"--real {root} holds no images in class folders")
    return rels


def _seed(seed: int, corruption: str, severity: int, rel: str) -> int:
    digest = hashlib.sha256(f"{seed}/{corruption}/{severity}/{rel}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _corrupt_one(task: tuple) -> int:
    """Every asked (corruption, severity) of one image that is not on disk yet; returns how many it wrote."""
    from PIL import Image

    root, out, rel, names, severities, size, fmt, quality, seed = task
    targets = [(c, s, Path(out) / c / str(s) / Path(rel).with_suffix(SUFFIX[fmt])) for c in names for s in severities]
    targets = [t for t in targets if not t[2].exists()]
    if not targets:
        return 0
    with Image.open(Path(root) / rel) as im:
        image = im.convert("RGB")
    if size:
        image = centre_crop(resize_short_side(image, round(size / 0.875)), size)
    if min(image.size) < MIN_SIDE:  # imagecorruptions refuses smaller images
        image = resize_short_side(image, MIN_SIDE)
    pixels = np.asarray(image)
    corrupt = _imagecorruptions().corrupt
    for c, s, path in targets:
        np.random.seed(_seed(seed, c, s, rel))  # imagecorruptions draws from numpy's global generator
        result = np.asarray(corrupt(pixels, corruption_name=c, severity=s))
        result = np.clip(result, 0, 255).astype(np.uint8)[: pixels.shape[0], : pixels.shape[1]]
        write_atomic(path, encode_image(result, fmt, quality))
    return len(targets)


def run_corrupt(cfg: CorruptConfig, log: Callable[[str], None] = print) -> dict:
    """Writes the corrupted copies; returns (and writes to OUT/corrupt.json) what OUT holds."""
    names = cfg.names()
    severities = sorted({int(s) for s in cfg.severities})
    if not severities or any(s not in SEVERITIES for s in severities):
        raise UserError(f"--severities take values of {SEVERITIES}, got {list(cfg.severities)}")
    if cfg.image_format not in SUFFIX:
        raise UserError(f"--format must be one of {', '.join(SUFFIX)}, got {cfg.image_format!r}")
    rels = list_images(Path(cfg.real), cfg.limit_per_class)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    total = len(rels) * len(names) * len(severities)
    log(
        f"corrupting {len(rels)} images x {len(names)} corruptions x {len(severities)} severities = {total} files "
        f"-> {out} ({workers} worker(s))"
    )
    tasks = [
        (str(cfg.real), str(out), rel, names, severities, cfg.image_size, cfg.image_format, cfg.quality, cfg.seed)
        for rel in rels
    ]
    progress = ProgressLines("corrupt", len(rels), unit="images", write=log)
    written = done = 0
    if workers <= 1:
        results = map(_corrupt_one, tasks)
        for n in results:
            written, done = written + n, done + 1
            progress.update(done)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for n in pool.map(_corrupt_one, tasks, chunksize=16):
                written, done = written + n, done + 1
                progress.update(done)
    progress.close()
    summary = {
        "source": str(cfg.real),
        "images": len(rels),
        "corruptions": names,
        "severities": severities,
        "files": total,
        "written_now": written,
        "sets": {f"{c}-{s}": f"{c}/{s}" for c in names for s in severities},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    write_atomic(out / "corrupt.json", json.dumps(summary, indent=1).encode())
    log(f"{written} file(s) written, {total - written} already there -> {out / 'corrupt.json'}")
    return summary
