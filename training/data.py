"""Labelled real images for finetuning: an ImageFolder matched to a class set, with captions and prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from realfake.core.classes import ClassInfo
from realfake.core.dataset import render_prompt
from realfake.core.defaults import DEFAULT_TEMPLATE
from realfake.core.errors import UserError
from realfake.core.images import IMAGE_SUFFIXES, resize_short_side
from realfake.core.real_folder import caption_for, check_caption_coverage, load_captions, scan_real

FINETUNE_TEMPLATE = DEFAULT_TEMPLATE  # "photo of {class}, {caption}, best quality"


@dataclass(frozen=True)
class RealSample:
    relpath: str
    cls: ClassInfo
    caption: str

    @property
    def prompt(self) -> str:
        return render_prompt(FINETUNE_TEMPLATE, self.cls.name, self.caption)


def collect_samples(
    root: Path, classes: list[ClassInfo], captions: Path | None = None, partial_captions: bool = False, log=print
) -> list[RealSample]:
    """Every image of the ImageFolder with its class and caption; empty class folders and captions that
    name no image are errors (they mean the data is not what the user thinks it is)."""
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
                raise UserError(f"class folder {folder} has no images")
    found = scan_real(root, classes)
    by_id = {c.id: c for c in classes}
    caption_map = load_captions(captions) if captions else {}
    if caption_map:
        known = {rel for rels in found.values() for rel in rels}
        known |= {Path(rel).stem for rel in known}
        unknown = sorted(k for k in caption_map if k not in known)
        if unknown:
            raise UserError(
                f"captions file {captions} names {len(unknown)} image(s) that do not exist under {root}"
                f" (first: {unknown[0]!r})"
            )
        check_caption_coverage(caption_map, found, captions, partial_captions, log)
    return [
        RealSample(rel, by_id[cid], caption_for(caption_map, rel))
        for cid, rels in sorted(found.items())
        for rel in rels
    ]


def jsonable(d: dict) -> dict:
    """A config dataclass's asdict() with paths as strings, for run records."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Resize the short side to `size`, random crop to size x size, random horizontal flip (the reference aug)."""
    from PIL import Image

    pil = resize_short_side(Image.fromarray(image), size)
    w, h = pil.size
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    out = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return out[:, ::-1] if rng.random() < 0.5 else out


class FinetuneDataset(torch.utils.data.Dataset):
    """Items: pixels [-1,1] 3xSxS (augmented), prompt, its token ids (with a tokenizer), sample index (for the
    cached image embedding). Indexed by i (no augmentation salt) or by (i, salt), as the finetune's StepBatches
    sampler gives them, so DataLoader workers do the decoding, cropping and tokenising."""

    def __init__(self, root: Path, samples: list[RealSample], size: int, seed: int = 0, tokenizer=None):
        self.root, self.samples, self.size, self.seed, self.tokenizer = root, samples, size, seed, tokenizer

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, salt = key if isinstance(key, tuple) else (key, 0)
        return self.item(i, salt)

    def item(self, i: int, salt: int):
        """Sample i with the augmentation drawn from (seed, salt, i): a resumed run sees the same crops."""
        rng = np.random.default_rng([self.seed, salt, i])
        image = random_crop_flip(load_rgb(self.root / self.samples[i].relpath), self.size, rng)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        item = {"pixels": pixels, "prompt": self.samples[i].prompt, "index": i}
        if self.tokenizer is not None:
            item["input_ids"] = token_ids(self.tokenizer, [item["prompt"]])[0]
        return item


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP token ids [B, 77]: padded to the tokenizer's length, truncated."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
