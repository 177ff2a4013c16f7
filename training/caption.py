"""`rf-train caption`: one caption per real image (BLIP-2 in the paper) for the Real-Fake prompts, written as the
captions JSONL that `rf-train finetune --captions` and `rf-client generate --captions` read:
`{"image": <path relative to the ImageFolder>, "caption": <text>}`, one object a line.

Resumable: lines are appended and fsync'd a batch at a time, so a crash loses at most the batch in flight, and
re-running the same command captions only the images the file does not name yet. The captioner that wrote a file
is recorded beside it (`<out>.captioner.json`); a file made by another captioner or other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from realfake.core.classes import ClassInfo, load_classes
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.precision import resolve_precision
from realfake.core.real_folder import scan_real
from realfake.training.image_batches import image_batches

PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: realfake.core.precision
# settings that change the captions: a file is only continued under the same ones
CAPTION_SETTINGS = ("prompt", "max_new_tokens", "num_beams")


@dataclass
class CaptionConfig:
    real: Path  # real ImageFolder: one folder per class
    model: Path  # local transformers image-to-text model directory (BLIP-2, BLIP, ...)
    out: Path  # captions JSONL
    classes: str | None = None  # class set the folders must match (as finetune/generate read them); None: any
    prompt: str = ""  # text the caption continues, e.g. BLIP-2's "a photo of"; empty: plain captioning
    # METHOD.md names no caption length; 20 new tokens is BLIP-2's usual captioning length (one short sentence)
    max_new_tokens: int = 20
    num_beams: int = 1  # greedy decoding: deterministic, so a resumed file reads like an uninterrupted one
    batch_size: int = 16
    precision: str = "auto"  # PRECISIONS
    workers: int | None = None  # image-decoding threads (default: up to 4)

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise UserError("--max-new-tokens, --num-beams and --batch-size must be >= 1")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in CAPTION_SETTINGS}


def record_path(out: Path) -> Path:
    """Where the captioner that wrote `out` is recorded."""
    return out.with_name(out.name + ".captioner.json")


def captioner_identity(model_dir: Path) -> dict:
    """Which captioner this is: a digest of its small files (configs, tokenizer: content) and of its weights (name,
    size, first and last MiB: cheap on a 15 GB BLIP-2, and other weights of the same shapes differ there), so the
    same model copied elsewhere is the same, and a finetuned one or another tokenizer is not."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise UserError(
            f"captioner {model_dir} has no config.json: pass a local transformers image-to-text model directory "
            "(e.g. BLIP-2 saved with save_pretrained)"
        )
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise UserError(f"captioner {model_dir} has no weights (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for p in files:
        rel = p.relative_to(model_dir).as_posix()
        digest.update(f"{rel}\n".encode())
        digest.update(_sample(p))
    arch = (json.loads(config.read_text()).get("architectures") or ["unknown"])[0]
    return {"digest": digest.hexdigest()[:16], "architecture": arch}


def _sample(path: Path, chunk: int = 1 << 20) -> bytes:
    """A file's bytes when small, else its size with its first and last `chunk` bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= 2 * chunk:
            return f.read()
        head = f.read(chunk)
        f.seek(size - chunk)
        return f"{size}\n".encode() + head + f.read()


def folder_images(root: Path, classes: str | None) -> list[str]:
    """Every image of the ImageFolder, as the relative paths finetune and generate key captions by."""
    if classes:
        class_list = load_classes(classes)
    else:  # any folder is a class, named by itself
        folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        class_list = [ClassInfo(i, name, name) for i, name in enumerate(folders)]
    return [rel for rels in scan_real(root, class_list, "--data").values() for rel in rels]


def read_captions_file(out: Path) -> dict[str, str]:
    """Captions already written. A torn last line (crash mid-write) is cut off the file; any other bad line is
    an error, since then the file is not what this command wrote."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(out, "r+b") as f:
            f.truncate(len(whole))
    done: dict[str, str] = {}
    for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[str(row["image"])] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{out} line {n} is not a caption row: pass another --out") from None
    return done


def check_record(out: Path, identity: dict, cfg: CaptionConfig) -> None:
    """Refuse to continue a captions file that another captioner, or other settings, began."""
    path = record_path(out)
    if not path.is_file():
        raise UserError(
            f"{out} exists but has no {path.name}: it was not written by rf-train caption; pass another --out"
        )
    rec = json.loads(path.read_text())
    theirs, mine = rec.get("captioner", {}), identity
    if theirs.get("digest") != mine["digest"]:
        raise UserError(
            f"{out} was written by another captioner ({theirs.get('architecture')} {theirs.get('digest')}, "
            f"not {mine['architecture']} {mine['digest']}): pass another --out, or delete it to start over"
        )
    changed = [k for k in CAPTION_SETTINGS if rec.get(k) != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"{k}={rec.get(k)!r}" for k in changed)
        raise UserError(f"{out} was written with {was}: use the same settings, or pass another --out")


class Captioner:
    """A transformers image-to-text model and its processor, loaded from a local directory."""

    def __init__(self, model_dir: Path, precision: str = "auto"):
        import torch
        import transformers

        from realfake.serving.model_bundle import quiet_loading

        quiet_loading()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gpu = self.device.type == "cuda"
        precision = resolve_precision(precision, gpu=gpu, bf16=gpu and torch.cuda.is_bf16_supported())
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
            model = auto.from_pretrained(model_dir, local_files_only=True, **{dtype_arg: self.dtype})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"captioner {model_dir} could not be loaded: {first}") from None
        self.model = model.to(self.device).eval()

    def caption(self, images: list, prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = self.processor(**kwargs)
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()
        }
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        return [" ".join(text.split()) for text in self.processor.batch_decode(out, skip_special_tokens=True)]


def run_caption(cfg: CaptionConfig, log=print) -> dict:
    """Caption every image of `cfg.real` the captions file does not name yet; returns the run's summary."""
    from tqdm.auto import tqdm

    cfg.validate()
    data, out, model_dir = Path(cfg.real), Path(cfg.out), Path(cfg.model)
    # 1. what there is to do, and whether this file may be continued
    identity = captioner_identity(model_dir)
    images = folder_images(data, cfg.classes)
    if out.exists():
        check_record(out, identity, cfg)
    done = read_captions_file(out)
    todo = [rel for rel in images if rel not in done]
    log(f"{len(images)} images in {data}: {len(images) - len(todo)} already captioned, {len(todo)} to do")
    record = {"captioner": {**identity, "path": str(model_dir.resolve())}, **cfg.settings()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record_path(out), json.dumps(record, indent=1).encode())
    # 2. caption batch by batch, each batch appended and fsync'd before the next starts
    unreadable: list[tuple[str, str]] = []
    written, seconds = 0, 0.0
    if todo:
        captioner = Captioner(model_dir, cfg.precision)
        log(f"captioning on {captioner.device.type} ({str(captioner.dtype).removeprefix('torch.')})")
        bar = tqdm(total=len(todo), unit="img", desc="caption", disable=not sys.stderr.isatty())
        t0 = time.perf_counter()
        with open(out, "a", encoding="utf-8") as f:
            for batch in image_batches(data, todo, cfg.batch_size, cfg.workers):
                unreadable += batch.unreadable
                if batch.images:
                    texts = captioner.caption(batch.images, cfg.prompt, cfg.max_new_tokens, cfg.num_beams)
                    lines = [
                        json.dumps({"image": k, "caption": t}) + "\n" for k, t in zip(batch.keys, texts, strict=True)
                    ]
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
                    written += len(texts)
                bar.update(len(batch.keys) + len(batch.unreadable))
        seconds = time.perf_counter() - t0
        bar.close()
    # 3. the summary; images that did not decode are named, and a re-run tries them again
    rate = written / seconds if seconds else 0.0
    log(f"captioned {written} images in {seconds:.1f} s ({rate:.1f} images/sec) -> {out}")
    if unreadable:
        shown = "; ".join(f"{k} ({why})" for k, why in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        log(f"warning: {len(unreadable)} image(s) did not decode and have no caption: {shown}{more}")
    summary = {
        "images": len(images),
        "captioned": len(done) + written,
        "new": written,
        "unreadable": [k for k, _ in unreadable],
        "seconds": round(seconds, 2),
        "images_per_sec": round(rate, 2),
    }
    write_atomic(record_path(out), json.dumps({**record, "last_run": summary}, indent=1).encode())
    return summary
