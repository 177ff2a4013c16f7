"""Image operations every stage shares: decode checks, the short-side resize and centre crop used for latent
priors, finetuning and CLIP's preprocessing, and deterministic PNG encoding. numpy and Pillow only."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from realfake.core.defaults import DEFAULT_FORMAT, DEFAULT_QUALITY

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# CLIP image preprocessing constants (OpenAI CLIP), for the guidance-token image embedding.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """PIL image with its short side resized (bicubic) to `size`, aspect kept."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    return image.resize((w, h), Image.BICUBIC)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_real_image(path: Path, size: int) -> np.ndarray:
    """Decode, convert to RGB, resize the short side to `size` and centre-crop: uint8 [size, size, 3]."""
    with Image.open(path) as im:
        return np.asarray(centre_crop(resize_short_side(im.convert("RGB"), size), size), dtype=np.uint8)


def check_decodes(path: Path) -> str | None:
    """None when the image decodes, else the reason."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reason to skip the image
        return f"{type(exc).__name__}: {exc}"
    return None


def clip_preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B,H,W,3] -> CLIP pixel values [B,3,size,size]: bicubic resize of the short side, centre crop."""
    out = []
    for img in images:
        pil = centre_crop(resize_short_side(Image.fromarray(img), size), size)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        out.append(((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


# dataset image formats: name -> file suffix
FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def encode_image(image: np.ndarray, fmt: str = DEFAULT_FORMAT, quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 HxWx3 -> file bytes in `fmt`. Deterministic for every format (no timestamps or metadata, fixed
    encoder settings), so re-running a job gives byte-identical files."""
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=False)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return buf.getvalue()
