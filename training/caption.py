"""`rf-train caption`: one caption per real image (BLIP-2 in the paper) for the Real-Fake prompts, written as the
captions JSONL that `rf-train finetune --captions` and `rf-client generate --captions` read:
`{"image": <path relative to the ImageFolder>, "caption": <text>}`, one object a line.

Resumable: lines are appended and fsync'd a batch at a time, so a crash loses at most the batch in flight, and
re-running the same command captions only the images the file does not name yet. The captioner that wrote a file
is recorded beside it (`<out>.captioner.json`); a file made by another captioner or other settings is refused.

At ImageNet scale (1.28 M images) the work is split over processes: `--shard I/N` (a cluster array task each), or
the ranks of `torchrun`/`accelerate launch` (RANK, WORLD_SIZE; each rank on its own GPU, LOCAL_RANK). Process I
captions every N-th image of the folder's order into its own part file `<out>.part-I-of-N`, resumable as above;
the process that finishes last merges every part into `<out>` (under a lock, atomically, each image once) and
removes the parts. A crashed process is re-run with the same command; nothing another process wrote is redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from realfake.core.classes import ClassInfo, load_classes
from realfake.core.dataset import parse_shard
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.precision import resolve_precision
from realfake.core.progress import ProgressLines, is_terminal
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
    shard: str | None = None  # "I/N": this process's share (default: the torchrun rank, else the whole folder)

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise UserError("--max-new-tokens, --num-beams and --batch-size must be >= 1")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.shard is not None:
            parse_shard(self.shard)

    def part(self) -> tuple[int, int]:
        """(I, N): --shard, else the launcher's RANK/WORLD_SIZE (torchrun, accelerate launch), else (0, 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if self.shard is not None:
            if world > 1:
                raise UserError("--shard and a multi-process launch (WORLD_SIZE > 1) exclude each other: use one")
            return parse_shard(self.shard)
        return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in CAPTION_SETTINGS}


def record_path(out: Path) -> Path:
    """Where the captioner that wrote `out` is recorded."""
    return out.with_name(out.name + ".captioner.json")


def part_path(out: Path, index: int, count: int) -> Path:
    """Process `index` of `count`'s captions file, beside `out`."""
    return out.with_name(f"{out.name}.part-{index:05d}-of-{count:05d}")


def part_files(out: Path) -> list[Path]:
    """Every part beside `out` that a process began (its record exists; its file may not, when its whole share
    was captioned already), of any split: a job re-split from N to M processes loses nothing."""
    suffix = ".captioner.json"
    return sorted(p.with_name(p.name[: -len(suffix)]) for p in out.parent.glob(f"{out.name}.part-*{suffix}"))


@contextmanager
def _locked(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def read_captions_file(out: Path, repair: bool = True) -> dict[str, str]:
    """Captions already written. A torn last line (crash mid-write) is ignored, and with `repair` (the file is
    this process's own) cut off the file; any other bad line is an error, since then the file is not what this
    command wrote."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if repair and len(whole) < len(data):
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
        # a launcher's process LOCAL_RANK has the GPU of that index (torchrun, accelerate launch)
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
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
    """Caption every image of this process's share of `cfg.real` that no captions file names yet (see the module
    docstring for the split over processes); returns the run's summary."""
    from tqdm.auto import tqdm

    cfg.validate()
    data, out, model_dir = Path(cfg.real), Path(cfg.out), Path(cfg.model)
    index, count = cfg.part()
    mine = part_path(out, index, count) if count > 1 else out
    # 1. what there is to do, and whether these files may be continued
    identity = captioner_identity(model_dir)
    images = folder_images(data, cfg.classes)
    share = images[index::count]
    with _locked(out):
        done = _read_checked([out, *part_files(out)], identity, cfg, own=mine)
    todo = [rel for rel in share if rel not in done]
    where = f" (process {index} of {count}: every {count}th image)" if count > 1 else ""
    log(f"{len(share)} images in {data}{where}: {len(share) - len(todo)} already captioned, {len(todo)} to do")
    if count > 1 and not todo and not part_files(out) and out.exists():
        # a re-run after the merge: OUT holds this share already; a part record now would wait for a merge forever
        return {"images": len(share), "captioned": len(share), "new": 0, "unreadable": [], "seconds": 0.0,
                "images_per_sec": 0.0, "part": [index, count], "merged": False}  # fmt: skip
    record = {"captioner": {**identity, "path": str(model_dir.resolve())}, **cfg.settings()}
    mine.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record_path(mine), json.dumps({**record, "complete": False}, indent=1).encode())
    # 2. caption batch by batch, each batch appended and fsync'd before the next starts
    unreadable: list[tuple[str, str]] = []
    written, seconds = 0, 0.0
    if todo:
        captioner = Captioner(model_dir, cfg.precision)
        log(f"captioning on {captioner.device} ({str(captioner.dtype).removeprefix('torch.')})")
        bar = tqdm(total=len(todo), unit="img", desc="caption", disable=not is_terminal())
        lines = None if is_terminal() else ProgressLines(f"caption {index}/{count}", len(todo), write=log)
        t0 = time.perf_counter()
        with open(mine, "a", encoding="utf-8") as f:
            for batch in image_batches(data, todo, cfg.batch_size, cfg.workers):
                unreadable += batch.unreadable
                if batch.images:
                    texts = captioner.caption(batch.images, cfg.prompt, cfg.max_new_tokens, cfg.num_beams)
                    rows = [
                        json.dumps({"image": k, "caption": t}) + "\n" for k, t in zip(batch.keys, texts, strict=True)
                    ]
                    f.write("".join(rows))
                    f.flush()
                    os.fsync(f.fileno())
                    written += len(texts)
                bar.update(len(batch.keys) + len(batch.unreadable))
                if lines:
                    lines.update(written, len(unreadable))
        seconds = time.perf_counter() - t0
        bar.close()
        if lines:
            lines.close()
    # 3. the summary; images that did not decode are named, and a re-run tries them again
    rate = written / seconds if seconds else 0.0
    log(f"captioned {written} images in {seconds:.1f} s ({rate:.1f} images/sec) -> {mine}")
    if unreadable:
        shown = "; ".join(f"{k} ({why})" for k, why in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        log(f"warning: {len(unreadable)} image(s) did not decode and have no caption: {shown}{more}")
    summary = {
        "images": len(share),
        "captioned": len(share) - len(todo) + written,
        "new": written,
        "unreadable": [k for k, _ in unreadable],
        "seconds": round(seconds, 2),
        "images_per_sec": round(rate, 2),
        "part": [index, count],
    }
    write_atomic(record_path(mine), json.dumps({**record, "complete": True, "last_run": summary}, indent=1).encode())
    # 4. the last process to finish merges every part into OUT (a single process folds in any earlier parts)
    with _locked(out):
        summary["merged"] = _merge_parts(out, images, record, identity, cfg, log, force=count == 1)
    return summary


def _read_checked(paths: list[Path], identity: dict, cfg: CaptionConfig, own: Path | None = None) -> dict[str, str]:
    """The captions of every file in `paths` that exists, each checked to be this captioner's with these settings.
    Only `own` (this process's file) has a torn last line cut off: the others may be mid-write."""
    done: dict[str, str] = {}
    for path in paths:
        if path.exists():
            check_record(path, identity, cfg)
            done.update(read_captions_file(path, repair=path == own))
    return done


def _merge_parts(
    out: Path, images: list[str], record: dict, identity: dict, cfg: CaptionConfig, log, force: bool = False
) -> bool:
    """Fold every part file into `out` once each part's process has finished its share (its record says so):
    one row per image, in the folder's order, written atomically, then the parts removed. Returns whether it
    merged; a process that finishes before the others leaves the merge to the last one. `force`: a single
    process that went over the whole folder (reading the parts) folds them in whatever their state."""
    parts = part_files(out)
    if not parts:
        return False
    unfinished = [p.name for p in parts if not _complete(p)]
    if unfinished and not force:
        log(f"{len(unfinished)} part(s) still being captioned ({unfinished[0]}, ...): the last to finish merges")
        return False
    splits = {int(p.name.rsplit("-of-", 1)[1]) for p in parts}
    if not force and len(splits) == 1 and len(parts) < min(splits):
        log(f"{len(parts)} of {min(splits)} parts have finished: the last to finish merges")
        return False
    captions = _read_checked([out, *parts], identity, cfg)
    covered = [rel for rel in images if rel in captions]
    order = covered + sorted(set(captions) - set(images))
    body = "".join(json.dumps({"image": k, "caption": captions[k]}) + "\n" for k in order)
    write_atomic(out, body.encode("utf-8"), durable=True)
    write_atomic(record_path(out), json.dumps({**record, "complete": True}, indent=1).encode())
    for p in parts:
        p.unlink(missing_ok=True)  # a part whose share was captioned already has a record and no file
        record_path(p).unlink(missing_ok=True)
    missing = len(images) - len(covered)
    log(
        f"merged {len(parts)} part(s) into {out}: {len(order)} captions"
        + (f"; {missing} images have none (re-run to retry them)" if missing else "")
    )
    return True


def _complete(part: Path) -> bool:
    try:
        return bool(json.loads(record_path(part).read_text()).get("complete"))
    except (OSError, ValueError):
        return False
