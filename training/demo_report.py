"""The demo's report: the accuracy table (JSON and Markdown) and a picture of real images beside the synthetic
images conditioned on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from realfake.core.dataset import read_manifest_rows
from realfake.core.files import write_atomic

# what the report shows of `rf-train evaluate-data` (synthetic vs real, overall)
DATA_METRICS = ("fid", "kid_mean", "precision", "recall", "density", "coverage", "near_copy_share", "near_copies")


def write_report(demo, labels: list[tuple[str, str]], s: dict, wall: float) -> dict:
    """OUT/results.json and results.md (accuracies per training set, generation rate, stage times) and the grid.

    `demo`: the running Demo (its out, cfg, classes, log); `labels`: (row label, classifier stage) in table order;
    `s`: every stage's result by name.
    """
    real, syn = s["classify_real"], s["classify_synthetic"]
    rows = [{"data": label, **{k: s[key][k] for k in ("train_images", "top1", "top5")}} for label, key in labels]
    stage_times = {k: v["wall_seconds"] for k, v in s.items()}
    table = {
        "class_set": demo.class_set,
        "classifier": demo.cfg.model,
        "epochs": demo.cfg.epochs,
        "test_images": s["data"]["real_test"],
        "rows": rows,
        "synthetic_over_real_top1": syn["top1"] / real["top1"] if real["top1"] else None,
        "generation_images_per_sec": s["generate"]["images_per_sec"],
        "synthetic_vs_real": s.get("evaluate_data"),
        "stage_seconds": stage_times,
        "wall_seconds_this_run": round(wall, 1),
        "settings": demo.cfg.run_key(),
    }
    write_atomic(demo.out / "results.json", json.dumps(table, indent=1).encode())
    write_atomic(demo.out / "results.md", markdown(table).encode())
    picture = grid(demo, Path(s["generate"]["dataset"]))
    demo.log("\n" + markdown(table))
    demo.log(f"results: {demo.out / 'results.json'}, {demo.out / 'results.md'}, grid: {picture}")
    return {"results": str(demo.out / "results.json"), "grid": str(picture)}


def grid(demo, synthetic: Path, per: int = 4) -> Path:
    """Rows = classes; pairs of columns = a real image and the synthetic image conditioned on it."""
    from PIL import Image

    rows = read_manifest_rows(synthetic / "manifest.jsonl")
    by_class: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["index"]):
        by_class.setdefault(r["class_id"], []).append(r)
    tiles = []
    for c in demo.classes:
        row_tiles = []
        for r in by_class.get(c.id, [])[:per]:
            real = Image.open(demo.out / "real_train" / r["real_image"]).convert("RGB").resize((32, 32))
            fake = Image.open(synthetic / r["path"]).convert("RGB").resize((32, 32))
            row_tiles += [np.asarray(real), np.asarray(fake), np.full((32, 4, 3), 255, np.uint8)]
        if row_tiles:
            tiles.append(np.concatenate(row_tiles, axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    image = Image.fromarray(np.concatenate(tiles, axis=0))
    path = demo.out / "real_vs_synthetic.png"
    image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(path)
    return path


def markdown(table: dict) -> str:
    class_set = table.get("class_set", "fashion-mnist")
    data = "Fashion-MNIST" if class_set == "fashion-mnist" else f"real images of {class_set}"
    lines = [
        f"{data}, {table['classifier']} x {table['epochs']} epochs, top-1 on {table['test_images']} real test images",
        "",
        "| training data | images | top-1 | top-5 |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['data']} | {r['train_images']} | {r['top1']:.4f} | {r['top5']:.4f} |" for r in table["rows"]]
    ratio = table["synthetic_over_real_top1"]
    lines += [
        "",
        f"synthetic / real top-1: **{ratio:.3f}**" if ratio is not None else "synthetic / real top-1: n/a",
        f"generation: {table['generation_images_per_sec']:.2f} images/sec (rf-client -> local Triton, CPU)",
        "",
    ]
    quality = table.get("synthetic_vs_real")
    if quality:
        shown = [k for k in DATA_METRICS if k != "near_copies"]
        lines += [
            f"synthetic vs real training images ({quality['encoder']}):",
            "",
            "| " + " | ".join(shown) + " |",
            "|" + "---:|" * len(shown),
            "| " + " | ".join(f"{quality[k]:.4f}" if quality.get(k) is not None else "n/a" for k in shown) + " |",
            "",
        ]
    lines += [
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in table["stage_seconds"].items()]
    return "\n".join(lines) + "\n"
