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
        "out_of_distribution": _ood(demo, labels, s),
        "scaling": _scaling(demo, s),
        "privacy": {
            # against each classifier; members: the real training set
            "membership_inference": (s.get("membership") or {}).get("attacks"),
            "near_copy_share": (s.get("evaluate_data") or {}).get("near_copy_share"),  # of the synthetic set
        },
        "stage_seconds": stage_times,
        "wall_seconds_this_run": round(wall, 1),
        "settings": demo.cfg.run_key(),
    }
    write_atomic(demo.out / "results.json", json.dumps(table, indent=1).encode())
    write_atomic(demo.out / "results.md", markdown(table).encode())
    picture = grid(demo, Path(s["generate"]["dataset"]))
    if table["scaling"]:
        curve(table["scaling"], demo.out / "scaling.png")
    demo.log("\n" + markdown(table))
    demo.log(f"results: {demo.out / 'results.json'}, {demo.out / 'results.md'}, grid: {picture}")
    return {"results": str(demo.out / "results.json"), "grid": str(picture)}


def _scaling(demo, s: dict) -> dict | None:
    """Top-1 at 1x, 2x, ... versions of each real image, synthetic only and real + synthetic, beside real only."""
    if not demo.cfg.scaling:
        return None
    points = []
    for k in sorted(set(demo.cfg.scaling) | {1}):
        syn, mixed = (
            ("classify_synthetic", "classify_mixed") if k == 1 else (f"classify_synthetic_{k}x", f"classify_mixed_{k}x")
        )
        points.append({"versions": k, "synthetic_top1": s[syn]["top1"], "mixed_top1": s[mixed]["top1"],
                       "synthetic_images": s[syn]["train_images"]})  # fmt: skip
    real = s["classify_real"]["top1"]
    return {
        "real_top1": real,
        "points": points,
        "epochs": demo.cfg.epochs,
        "budget": "same epochs: k versions train k times the steps",
        "synthetic_at_most_reaches_real": max(p["synthetic_top1"] for p in points) >= real,
    }


def curve(scaling: dict, path: Path) -> Path:
    """The scaling curve as a PNG: top-1 against versions, synthetic only (blue), real + synthetic (green), and
    real only at 1x (grey line)."""
    from PIL import Image, ImageDraw

    w, h, pad = 360, 240, 30
    points = scaling["points"]
    values = [p[k] for p in points for k in ("synthetic_top1", "mixed_top1")] + [scaling["real_top1"]]
    lo, hi = min(values) - 0.02, max(values) + 0.02
    ks = [p["versions"] for p in points]

    def xy(k, v):
        x = pad + (w - 2 * pad) * (ks.index(k) / max(len(ks) - 1, 1))
        return x, h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    y = xy(ks[0], scaling["real_top1"])[1]
    draw.line([(pad, y), (w - pad, y)], fill=(150, 150, 150), width=1)
    for key, color in (("synthetic_top1", (40, 90, 200)), ("mixed_top1", (40, 160, 70))):
        line = [xy(p["versions"], p[key]) for p in points]
        draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for k in ks:
        draw.text((xy(k, lo)[0] - 6, h - pad + 6), f"{k}x", fill="black")
    draw.text((4, 4), f"top-1 {lo:.2f}-{hi:.2f}; grey: real only", fill="black")
    image.save(path)
    return path


def _ood(demo, labels: list[tuple[str, str]], s: dict) -> dict | None:
    """Each classifier's top-1 on the clean test set and on its corrupted copy (mean over the corruptions)."""
    if "corrupt" not in s:
        return None
    rows = [{"data": label, "clean_top1": s[key]["top1"], **s[key]["ood"]} for label, key in labels if "ood" in s[key]]
    return {
        "images": s["corrupt"]["images"],
        "severity": demo.cfg.ood_severity,
        "corruptions": len(s["corrupt"]["sets"]),
        "rows": rows,
    }


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
    scaling = table.get("scaling")
    if scaling:
        lines += [
            f"more synthetic data (same {scaling['epochs']} epochs; real only: {scaling['real_top1']:.4f})",
            "",
            "| versions | synthetic images | synthetic only | real + synthetic |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {p['versions']}x | {p['synthetic_images']} | {p['synthetic_top1']:.4f} | {p['mixed_top1']:.4f} |"
            for p in scaling["points"]
        ]
        lines.append("")
    ood = table.get("out_of_distribution")
    if ood:
        lines += [
            f"out of distribution: {ood['images']} test images x {ood['corruptions']} ImageNet-C corruptions at "
            f"severity {ood['severity']}",
            "",
            "| training data | clean top-1 | corrupted top-1 | drop |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['data']} | {r['clean_top1']:.4f} | {r['corrupted_top1']:.4f} | {r['drop']:.4f} |"
            for r in ood["rows"]
        ]
        lines.append("")
    privacy = table.get("privacy") or {}
    if privacy.get("membership_inference"):
        lines += [
            "privacy: membership inference (loss threshold) on the real training images vs held-out ones",
            "",
            "| classifier | AUC | TPR at 1 % FPR |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {m['auc']:.4f} | {m['tpr_at_1pct_fpr']:.4f} |"
            for name, m in privacy["membership_inference"].items()
        ]
        if privacy.get("near_copy_share") is not None:
            lines.append(f"\nsynthetic images that are near-copies of a real one: {privacy['near_copy_share']:.4f}")
        lines.append("")
    lines += [
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in table["stage_seconds"].items()]
    return "\n".join(lines) + "\n"
