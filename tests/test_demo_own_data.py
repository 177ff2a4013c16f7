"""The loop on your own data in one command: `rf-demo --real DIR --bundle BASE --captioner DIR` on a small data set
of rendered shapes (not Fashion-MNIST): captions, finetune, export, a real Triton, generation with the captions in
the prompts, the data-quality report, the classifiers and the table."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_caption import build_tiny_blip2

from conftest import cli_args, rf

pytestmark = pytest.mark.slow

SHAPES = ("circle", "square", "triangle")


def render_shapes(root, per: int = 9, size: int = 40):
    """A folder per shape: one shape per image, random colour, place and size, on a random background."""
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for k in range(per):
            bg, fg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
            image = Image.new("RGB", (size, size), bg)
            r = int(rng.integers(8, 15))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
            elif shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
            image.save(root / shape / f"{shape}_{k}.png")
    return root


def test_own_data_loop_in_one_command(tiny_bundle, tmp_path):
    real = render_shapes(tmp_path / "shapes")
    captioner = build_tiny_blip2(tmp_path / "blip2")
    out = tmp_path / "run"
    args = dict(
        real=real,
        bundle=tiny_bundle,
        captioner=captioner,
        per_class=6,
        test_images=9,
        finetune_steps=4,
        steps=4,
        epochs=2,
        out=out,
    )
    r = rf("rf-demo", *cli_args(args), env={"RF_HOME": str(tmp_path / "home")}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    # the classes are the folder names; 6 of each trained on, 3 of each held out for the test
    assert sorted(p.name for p in (out / "real_train").iterdir()) == list(SHAPES)
    assert all(len(list((out / "real_train" / s).iterdir())) == 6 for s in SHAPES)
    assert all(len(list((out / "real_test" / s).iterdir())) == 3 for s in SHAPES)
    train = {p.name for p in (out / "real_train").rglob("*.png")}
    assert not train & {p.name for p in (out / "real_test").rglob("*.png")}  # held out means not trained on

    # no base model was trained: the given bundle was finetuned, with the captions
    stages = {p.stem for p in (out / "stages").glob("*.json")}
    assert {"data", "base", "caption", "finetune", "export", "generate", "evaluate_data", "report"} <= stages
    assert json.loads((out / "stages" / "base.json").read_text())["given"] is True
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 18 and all(c["caption"] for c in captions)

    # every synthetic image was made from a real one with its caption in the prompt
    rows = [json.loads(line) for line in (out / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and {row["class_id"] for row in rows} == set(SHAPES)
    by_image = {c["image"]: c["caption"] for c in captions}
    for row in rows:
        assert row["caption"] == by_image[row["real_image"]] and row["caption"] in row["prompt"]
        assert row["class_name"] in row["prompt"]
    assert rf("rf-client", "verify", str(out / "synthetic")).returncode == 0

    table = json.loads((out / "results.json").read_text())
    assert table["class_set"] == str(real.resolve()) and table["test_images"] == 9
    by_data = {row["data"]: row for row in table["rows"]}
    assert by_data["real only"]["train_images"] == by_data["synthetic only (Real-Fake)"]["train_images"] == 18
    assert all(0.0 <= row["top1"] <= 1.0 for row in table["rows"])
    quality = table["synthetic_vs_real"]
    assert quality["fid"] is not None and np.isfinite(quality["fid"]) and 0.0 <= quality["precision"] <= 1.0
    assert "real images of" in (out / "results.md").read_text()
