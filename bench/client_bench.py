"""The client's own ceiling: images/sec one `rf-client generate` process can take from its servers, with no
model in the loop (response copied out -> encoded -> hashed -> written and fsync'd -> manifest row), per image
format and writer-pool size, at 512 px on photo-like images.

Ratios are against the single-worker PNG row measured in the same run. Divide a fleet's images/sec by a row's
rate for the number of client processes (or cores) the job needs.

    python bench/client_bench.py [--size 512] [--seconds 4] [--json bench-client.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from realfake.client.throughput import client_ceiling, textured_images
from realfake.client.writer import default_workers
from realfake.core.defaults import DEFAULT_QUALITY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--batch", type=int, default=8, help="Images per simulated response.")
    parser.add_argument("--seconds", type=float, default=4.0, help="Seconds measured per row.")
    parser.add_argument("--formats", default="png,jpeg,webp")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG/WebP quality.")
    parser.add_argument("--dir", type=Path, default=None, help="Where to write (default: a temporary folder).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()

    cores = default_workers()
    worker_counts = sorted({1, cores})
    images = textured_images(args.batch, args.size)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="rf-client-bench-", dir=args.dir))
    try:
        for fmt in args.formats.split(","):
            for workers in worker_counts:
                folder = root / f"{fmt}-{workers}"
                rows.append(client_ceiling(folder, fmt, args.quality, workers, images, args.seconds))
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = next(r for r in rows if r.image_format == "png" and r.workers == 1).images_per_sec
    single = {r.image_format: r.images_per_sec for r in rows if r.workers == 1}
    print(f"client ceiling, {args.size} px, {cores} cores ({os.cpu_count()} CPUs), batch {args.batch}")
    header = ("format", "quality", "workers", "images/s", "KB/image", "vs 1 worker", "vs png/1")
    print(f"{header[0]:8} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (7, 7, 9, 9, 11, 8), strict=True)))
    for r in rows:
        print(
            f"{r.image_format:8} {r.quality or '-':>7} {r.workers:>7} {r.images_per_sec:>9.1f} "
            f"{r.mean_bytes / 1024:>9.0f} {r.images_per_sec / single[r.image_format]:>10.2f}x "
            f"{r.images_per_sec / base:>7.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "cores": cores, "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
