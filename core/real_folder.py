"""The real images of the conditioned (Real-Fake) mode: an ImageFolder scan (class folders by id or name) and
per-image captions (JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

from realfake.core.classes import ClassInfo
from realfake.core.errors import UserError
from realfake.core.images import IMAGE_SUFFIXES


def scan_real(root: Path, classes: list[ClassInfo], option: str = "--real") -> dict[str, list[str]]:
    """Class id -> sorted image paths relative to `root`. Class folders are matched by class id, or by a name
    (the prompt name or the lemma, case-insensitively) that exactly one class of the set carries; a folder whose
    name more than one class carries ("crane": the bird and the machine) is refused, naming the candidates.
    `option` names the folder in errors (`--real`, `--val`)."""
    if not root.is_dir():
        raise UserError(f"{option} {root} is not a directory (expected an ImageFolder: one folder per class)")
    by_id = {c.id: c for c in classes}
    by_name: dict[str, list[ClassInfo]] = {}
    for c in classes:
        for key in {c.name.casefold(), c.lemma.casefold()}:
            by_name.setdefault(key, []).append(c)
    found: dict[str, list[str]] = {}
    unknown = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cls = by_id.get(folder.name)
        if cls is None:
            candidates = by_name.get(folder.name.casefold(), [])
            if len(candidates) > 1:
                named = " or ".join(f"{c.id} ({c.name})" for c in candidates)
                raise UserError(f"{option} {root}: folder {folder.name!r} could be {named}: name folders by class id")
            if not candidates:
                unknown.append(folder.name)
                continue
            cls = candidates[0]
        files = sorted(
            p.relative_to(root).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if files:
            found.setdefault(cls.id, []).extend(files)
    if unknown:
        raise UserError(
            f"{option} {root}: folder(s) {', '.join(unknown[:5])} match no class of the set "
            "(folders must be named by class id or class name)"
        )
    if not found:
        raise UserError(f"{option} {root} holds no images in class folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def load_captions(path: Path) -> dict[str, str]:
    """JSONL, one object a line: {"image": <id or relative path>, "caption": <text>}; ids are also keyed by stem."""
    if not path.is_file():
        raise UserError(f"captions file {path} does not exist")
    captions: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, text = str(row["image"]), str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f'captions file {path} line {n} is malformed: expected {{"image": ..., "caption": ...}}'
            ) from None
        captions[key] = text.strip()
    if not captions:
        raise UserError(f"captions file {path} is empty")
    return captions


def check_caption_coverage(
    captions: dict[str, str], real: dict[str, list[str]], path: Path, accept_partial: bool, log=print
) -> None:
    """Every real image should have its caption: an image without one falls back to the class prompt, so a
    captions file made for another folder (or cut short by a crash) would silently change what is generated or
    trained. Refused, saying how many matched and which did not, unless `accept_partial` (--partial-captions),
    when it is one note instead."""
    images = [rel for rels in real.values() for rel in rels]
    missing = [rel for rel in images if rel not in captions and Path(rel).stem not in captions]
    if not missing:
        return
    matched = len(images) - len(missing)
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    text = (
        f"captions file {path} captions {matched} of the {len(images)} real images; {len(missing)} have no "
        f"caption ({shown})"
    )
    if matched == 0:
        raise UserError(f"{text}: it names none of them (is it the captions file of this --real?)")
    if not accept_partial:
        raise UserError(
            f"{text}: caption the rest (`rf-train caption` resumes where it stopped), or pass --partial-captions "
            "to accept that those use the class prompt alone"
        )
    log(f"note: {text}; those use the class prompt alone (--partial-captions)")


def caption_for(captions: dict[str, str], relpath: str) -> str:
    if relpath in captions:
        return captions[relpath]
    return captions.get(Path(relpath).stem, "")
