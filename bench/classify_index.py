"""The classifier's training index, before and after, in one run: resident memory per rank and start-up time of
`synthetic_refs` on a manifest of ImageNet-shaped rows (the rows rf-client writes, ~700 bytes of JSON each).

- before: the manifest's rows as dicts ({path: row}), then a `Ref` object per row (the code this replaced, kept
  here as the baseline);
- now: rows streamed into `RefTable`'s arrays.

Each variant runs in a fresh process; the peak is the process's high-water mark less its start-up, the resident
size what stays after the build. Rows above --rows are built for the new index only, from generated names
without a manifest (parsing 13 M JSON rows would take minutes and ~9 GB of disk; the index is the same).

    python bench/classify_index.py [--rows 1300000] [--index-only-rows 13000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _write_manifest(folder: Path, rows: int) -> None:
    from realfake.core.classes import load_classes

    wnids = [c.id for c in load_classes("imagenet")]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.jsonl", "w") as f:
        for k in range(rows):
            wnid = wnids[k % 1000]
            row = {
                "path": f"{wnid}/{wnid}_{k // 10:05d}.v{k % 10}.jpg", "class_index": k % 1000, "class_id": wnid,
                "class_name": "tench", "index": k, "prompt": f"photo of tench, a fish held by a man {k}, best quality",
                "negative_prompt": "", "seed": 1234567 + k, "steps": 30, "guidance_scale": 2.0, "strength": 0.75,
                "guidance_token": True, "real_image": f"{wnid}/{wnid}_{k // 10}.JPEG",
                "caption": "a fish held by a man on a boat", "model": "sd15-ft-0123456789ab",
                "engine": "tensorrt fp16, unipc", "server": "10.0.0.17:8000", "sha256": "0" * 64, "size": 291234,
                "mtime_ns": 1764700000000000000 + k,
            }  # fmt: skip
            f.write(json.dumps(row) + "\n")


def _old_refs(root: Path, classes):
    """The index as it was built before this change."""
    from realfake.core.dataset import manifest_files, read_manifest_rows
    from realfake.training.image_sets import Ref

    by_id = {c.id: c.index for c in classes}
    rows = {r["path"]: r for f in manifest_files(root) for r in read_manifest_rows(f)}
    return [Ref(str(root / p), by_id[r["class_id"]]) for p, r in sorted(rows.items())]


def _child(variant: str, root: str, rows: int) -> None:
    from realfake.core.classes import load_classes
    from realfake.training.image_sets import _TableBuilder, synthetic_refs

    classes = load_classes("imagenet")
    base, peak0 = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if variant == "before":
        index = _old_refs(Path(root), classes)
    elif variant == "now":
        index = synthetic_refs(Path(root), classes)
    else:  # the new index from generated names, no manifest
        wnids = [c.id for c in classes]
        builder = _TableBuilder()
        for k in range(rows):
            wnid = wnids[k % 1000]
            builder.add(root, f"{wnid}/{wnid}_{k // 10:05d}.v{k % 10}.jpg", k % 1000)
        index = builder.table()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(peak0, base)
    print(json.dumps({"rows": len(index), "seconds": seconds, "resident": _rss() - base, "peak": max(peak, 0)}))


def _measure(variant: str, root: Path, rows: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(root), str(rows)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_300_000, help="Manifest rows (1x ImageNet: 1.3 M).")
    parser.add_argument("--index-only-rows", type=int, default=13_000_000, help="The new index alone (10x).")
    args = parser.parse_args()

    gb = 1e9
    with tempfile.TemporaryDirectory(prefix="rf-index-bench-") as tmp:
        root = Path(tmp) / "syn"
        t0 = time.perf_counter()
        _write_manifest(root, args.rows)
        size = (root / "manifest.jsonl").stat().st_size
        print(f"manifest: {args.rows:,} rows, {size / gb:.2f} GB, written in {time.perf_counter() - t0:.0f} s")
        before, now = _measure("before", root, args.rows), _measure("now", root, args.rows)
    print(f"{'index':32} {'rows':>12} {'start-up s':>11} {'resident GB':>12} {'bytes/row':>10} {'peak GB':>8}")
    for label, r in (("before (dicts, then Refs)", before), ("now (RefTable)", now)):
        print(f"{label:32} {r['rows']:>12,} {r['seconds']:>11.1f} {r['resident'] / gb:>12.3f} "
              f"{r['resident'] / r['rows']:>10.0f} {r['peak'] / gb:>8.2f}")  # fmt: skip
    ratios = [now[k] / max(before[k], 1e-9) for k in ("resident", "peak", "seconds")]
    print("ratios now/before: resident {:.3f}, peak {:.3f}, start-up {:.2f}".format(*ratios))
    if args.index_only_rows:
        big = _measure("generated", Path("in1k-rf-10x"), args.index_only_rows)
        per_row = big["resident"] / big["rows"]
        print(f"{'now, generated names (no JSON)':32} {big['rows']:>12,} {big['seconds']:>11.1f} "
              f"{big['resident'] / gb:>12.3f} {per_row:>10.0f} {big['peak'] / gb:>8.2f}")  # fmt: skip
        scaled = before["resident"] / before["rows"] * big["rows"] / gb
        print(f"before at {big['rows']:,} rows (its bytes/row x rows, not run: it would not fit): resident "
              f"{scaled:.1f} GB, peak {before['peak'] / before['rows'] * big['rows'] / gb:.1f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
