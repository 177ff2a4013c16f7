"""What resuming a 1.3 M-image job costs before its first new image: build the job's work items, compact the
manifest (check each row's image), and find what is left. Runs over a synthetic manifest of ROWS rows and as many
small real files (1000 class folders), on this disk.

Two checks of a finished image are measured in the same run: `stat` against the size and mtime a row records
(what resume does), and the sha256 of the whole file (what it did before rows recorded them; `rf-client verify`
still does it). The files here are tiny, so the hash column is a floor: with 512-px images (0.1-0.6 MB each) a
hashing resume reads the whole dataset, 0.1-0.8 TB at ImageNet scale.

    python bench/resume_bench.py [--rows 1300000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from realfake.core import dataset as ds
from realfake.core.classes import load_classes


def make_dataset(root: Path, rows: int, with_stat: bool) -> None:
    """ROWS small files in 1000 class folders and their manifest rows (about the size of real ones)."""
    classes = load_classes("imagenet")
    per_class = -(-rows // len(classes))
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        n = 0
        for c in classes:
            folder = root / c.id
            folder.mkdir(exist_ok=True)
            for i in range(per_class):
                if n == rows:
                    break
                data = f"{c.id}/{i}".encode() * 8
                rel = f"{c.id}/{i:05d}.png"
                path = root / rel
                path.write_bytes(data)
                row = {
                    "path": rel,
                    "class_index": c.index,
                    "class_id": c.id,
                    "class_name": c.name,
                    "index": i,
                    "prompt": f"photo of {c.name}, best quality",
                    "negative_prompt": "distorted, unrealistic, blurry, out of frame, cropped, deformed",
                    "seed": ds.image_seed(0, c.id, i),
                    "steps": 30,
                    "guidance_scale": 2.0,
                    "model": "0123456789abcdef",
                    "engine": "tensorrt-10.13.0 sm90 fp16 0123456789ab, unipc",
                    "server": "10.0.0.1:8000",
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                if with_stat:
                    st = path.stat()
                    row |= {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
                manifest.write(json.dumps(row, sort_keys=True) + "\n")
                n += 1


def prepare_resume(root: Path, rows: int) -> tuple[float, int]:
    """Seconds for what `rf-client generate` does before its first new request, and the images left."""
    classes = load_classes("imagenet")
    per_class = -(-rows // len(classes))
    t0 = time.perf_counter()
    items = [
        ds.WorkItem(c, i, ds.image_seed(0, c.id, i), ds.render_prompt("photo of {class}, best quality", c.name))
        for c in classes
        for i in range(per_class)
    ]
    ds.remove_stale_temporaries(root, (0, 1))
    done = ds.compact_manifest(root, "manifest.jsonl")
    pending = [it for it in items if it.key not in done]
    return time.perf_counter() - t0, len(pending)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_300_000)
    parser.add_argument("--dir", type=Path, default=None, help="Where to build the dataset (default: a temp dir).")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rf-resume-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        make_dataset(root, args.rows, with_stat=True)
        print(f"{args.rows} rows and files written in {time.perf_counter() - t0:.0f}s under {root}")
        stat_s, left = prepare_resume(root, args.rows)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # the same manifest without size/mtime: every image is hashed
        manifest = root / "manifest.jsonl"
        stripped = root / "manifest.tmp"
        with open(manifest, encoding="utf-8") as src, open(stripped, "w", encoding="utf-8") as dst:
            for line in src:
                row = json.loads(line)
                row.pop("size"), row.pop("mtime_ns")
                dst.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(stripped, manifest)
        hash_s, left_hash = prepare_resume(root, args.rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert left == left_hash, (left, left_hash)
    print(f"resume preparation, {args.rows} rows ({left} images left to make):")
    print(f"  stat check (size + mtime in the row): {stat_s:7.1f} s   peak memory {peak_mb:.0f} MB")
    print(f"  hash check (every image read):        {hash_s:7.1f} s   ({hash_s / stat_s:.2f}x the stat check)")


if __name__ == "__main__":
    main()
