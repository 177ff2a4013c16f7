"""rf-train evaluate-data on small 32-px sets with tiny random-weight encoders: identical sets score perfectly,
a shifted and noised set measurably worse, copies of real images are found and drawn, and bad input is one line."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from realfake.core.errors import UserError
from realfake.training.evaluate_data import EvaluateDataConfig, run_evaluate_data

from conftest import rf

CLASSES = ("cat", "dog", "bird")


def blob_image(rng, size=32) -> np.ndarray:
    """A random background with three discs of random colours: images that differ from each other."""
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3)) + rng.integers(0, 255, 3)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 10)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return img + rng.normal(0, 8, img.shape)


def make_set(root, seed, per=16, shift=0.0, noise=0.0):
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per):
            img = blob_image(rng) + shift + rng.normal(0, noise, (32, 32, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{c}{i}.png")
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    real = make_set(root / "real", 0)
    same = shutil.copytree(real, root / "same")
    shifted = make_set(root / "shifted", 1, shift=60, noise=40)
    copies = make_set(root / "copies", 1)  # fresh images of the same kind, plus copies of real ones
    for i in range(3):
        shutil.copy(real / "cat" / f"cat{i}.png", copies / "cat" / f"copy{i}.png")
        Image.open(real / "dog" / f"dog{i}.png").save(copies / "dog" / f"jpeg{i}.jpg", quality=90)
    return {"real": real, "same": same, "shifted": shifted, "copies": copies}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A checkpoint in rf-train classify's best.pt format: a random-weight resnet-small."""
    from realfake.training.classify import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cls") / "best.pt"
    model = build_model("resnet-small", 10)
    torch.save({"model": model.state_dict(), "epoch": 1, "config": {"model": "resnet-small", "image_size": None}}, path)
    return path


def evaluate(sets, synthetic, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_evaluate_data(
            EvaluateDataConfig(sets["real"], sets[synthetic], out, "cifar10", **kw), log=lambda m: None
        )


@pytest.mark.parametrize("encoder", ["classifier", "bundle"])
def test_identical_sets_score_perfectly_and_a_shifted_set_worse(sets, classifier, tiny_bundle, tmp_path, encoder):
    source = {"classifier": classifier, "bundle": tiny_bundle}[encoder]
    same = evaluate(sets, "same", tmp_path / "same", **{encoder: source})
    shifted = evaluate(sets, "shifted", tmp_path / "shifted", **{encoder: source})
    s, w = same["overall"], shifted["overall"]
    assert s["real_images"] == s["synthetic_images"] == 48
    # KID's unbiased estimate of a set against itself is slightly negative (the cross term holds each image's
    # kernel with itself); a shifted set's is positive and far larger
    assert s["fid"] < 1e-6 and s["kid_mean"] <= 1e-9 and w["kid_mean"] > 5 * abs(s["kid_mean"])
    assert s["precision"] == s["recall"] == s["coverage"] == 1.0 and s["density"] == pytest.approx(1.0)
    assert s["near_copy_share"] == 1.0  # every image is its own real twin
    assert w["fid"] > 1000 * max(s["fid"], 1e-9) and w["kid_mean"] > 0
    assert w["recall"] < 0.95 and w["coverage"] < 0.95 and w["near_copy_share"] < 0.9
    # per class too, and the report's files
    assert list(same["per_class"]) == ["bird", "cat", "dog"]
    for row in same["per_class"].values():
        assert row["fid"] < 1e-6 and row["precision"] == row["recall"] == 1.0 and row["real_images"] == 16
    for row in shifted["per_class"].values():
        assert row["fid"] > 1000 * max(same["per_class"]["cat"]["fid"], 1e-9)
    report = json.loads((tmp_path / "shifted" / "evaluate.json").read_text())
    assert report["overall"]["fid"] == pytest.approx(w["fid"])
    md = (tmp_path / "shifted" / "evaluate.md").read_text()
    assert "| **overall** |" in md and "| cat (cat) |" in md
    with Image.open(tmp_path / "shifted" / "per_class.png") as chart:
        assert chart.size == (900, 160 * 7)


def test_copies_of_real_images_are_flagged_and_drawn(sets, classifier, tmp_path):
    report = evaluate(sets, "copies", tmp_path, classifier=classifier, copy_threshold=0.005, worst_pairs=8)
    assert report["feature_dim"] == 128  # resnet-small's pooled features: its last Linear layer is gone
    # the six closest pairs are the copies, each next to the image it copies
    pairs = {(p["synthetic"], p["real"]) for p in report["worst_pairs"][:6]}
    assert pairs == {(f"cat/copy{i}.png", f"cat/cat{i}.png") for i in range(3)} | {
        (f"dog/jpeg{i}.jpg", f"dog/dog{i}.png") for i in range(3)
    }
    # exact copies sit at distance 0, re-encoded ones just above; a random-weight encoder crowds other images
    # close together, hence this test's low threshold (the default, 0.05, is for trained encoders): what it flags
    # are copies, all of them exact ones included
    flagged = report["overall"]["near_copies"]
    assert max(p["distance"] for p in report["worst_pairs"][:3]) < 1e-6
    assert 3 <= flagged <= 6 and report["worst_pairs"][flagged]["distance"] >= 0.005
    assert report["per_class"]["cat"]["near_copies"] == 3 and report["per_class"]["bird"]["near_copies"] == 0
    assert report["overall"]["near_copy_share"] == pytest.approx(flagged / 54)
    with Image.open(tmp_path / "near_copies.png") as sheet:
        assert sheet.size == (4 * (2 * 128 + 8) + 8, 2 * (128 + 18) + 8)
        # the first pair's two halves are the same picture
        left, right = np.asarray(sheet)[4:132, 8:136], np.asarray(sheet)[4:132, 136:264]
        assert np.abs(left.astype(int) - right.astype(int)).max() == 0


def test_rf_client_output_and_torchvision_weights(sets, tmp_path):
    """A synthetic set read by its manifest (rows outside it are not part of it), an image that does not decode
    reported, and a torchvision model from a local weights file."""
    import torchvision

    out = tmp_path / "syn"
    rows = []
    for c in CLASSES:
        (out / c).mkdir(parents=True)
        for i in range(4):
            shutil.copy(sets["shifted"] / c / f"{c}{i}.png", out / c / f"{i:05d}.png")
            rows.append({"class_id": c, "index": i, "path": f"{c}/{i:05d}.png"})
    shutil.copy(sets["shifted"] / "cat" / "cat9.png", out / "cat" / "00000-stray.png")  # not in the manifest
    (out / "dog" / "00001.png").write_bytes(b"torn")
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_evaluate_data(
            EvaluateDataConfig(
                sets["real"], out, tmp_path / "eval", "cifar10", torchvision="resnet18", weights=weights, per_class=3
            ),
            log=lambda m: None,
        )
    assert report["feature_dim"] == 512 and "torchvision resnet18" in report["encoder"]
    assert report["synthetic"]["images"] == 8 and report["synthetic"]["unreadable"] == ["dog/00001.png"]
    assert report["real"]["images"] == 9 and report["overall"]["synthetic_images"] == 8

    with pytest.raises(UserError, match="do not fit torchvision squeezenet1_1"):
        run_evaluate_data(
            EvaluateDataConfig(
                sets["real"], out, tmp_path / "e", "cifar10", torchvision="squeezenet1_1", weights=weights
            )
        )


def test_cli_runs_and_bad_input_is_one_line(sets, classifier, tmp_path):
    args = ["rf-train", "evaluate-data", "--real", str(sets["real"]), "--classes", "cifar10"]
    r = rf(*args, "--synthetic", str(sets["same"]), "--out", str(tmp_path / "e"), "--classifier", str(classifier))
    assert r.returncode == 0, r.stderr
    assert "overall: FID 0.0000" in r.stderr and "precision 1.000, recall 1.000" in r.stderr
    assert "real: 48 images in" in r.stderr and "images/sec" in r.stderr
    assert (tmp_path / "e" / "evaluate.json").is_file()

    r = rf(*args, "--synthetic", str(sets["same"]), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: give exactly one feature encoder: --bundle DIR, --classifier best.pt, "
        "or --torchvision NAME --weights FILE"
    ]
    for kw, message in (
        ({"torchvision": "resnet18"}, "--torchvision NAME and --weights FILE go together"),
        ({"classifier": tmp_path / "none.pt"}, "--classifier"),
        ({"torchvision": "resnet9000", "weights": classifier}, "unknown torchvision model 'resnet9000'"),
    ):
        with pytest.raises(UserError, match=message):
            run_evaluate_data(EvaluateDataConfig(sets["real"], sets["same"], tmp_path / "x", "cifar10", **kw))


def test_the_demo_reports_its_synthetic_sets_quality(sets, classifier, tmp_path):
    """The demo's evaluate_data stage on a demo-shaped run directory, and the report's table of it."""
    from realfake.training.demo import Demo, DemoConfig
    from realfake.training.demo_report import markdown

    out = tmp_path / "demo"
    ids = ("t_shirt_top", "trouser", "pullover")
    for c, cid in zip(CLASSES, ids, strict=True):
        shutil.copytree(sets["real"] / c, out / "real_train" / cid)
        shutil.copytree(sets["shifted"] / c, out / "synthetic" / cid)
    rows = [
        {"class_id": cid, "index": i, "path": f"{cid}/{c}{i}.png"}
        for c, cid in zip(CLASSES, ids, strict=True)
        for i in range(16)
    ]
    (out / "synthetic" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "classify" / "real").mkdir(parents=True)
    shutil.copy(classifier, out / "classify" / "real" / "best.pt")

    demo = Demo(DemoConfig(out=out), tmp_path / "cache", log=lambda m: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quality = demo.evaluate_data({"generate": {"dataset": str(out / "synthetic")}})
    report = json.loads((out / "evaluate_data" / "evaluate.json").read_text())
    assert quality["fid"] == pytest.approx(report["overall"]["fid"]) and quality["fid"] > 0
    assert 0 <= quality["recall"] < 0.95 and quality["near_copies"] == report["overall"]["near_copies"]
    table = {
        "classifier": "resnet-small",
        "epochs": 1,
        "test_images": 10,
        "rows": [],
        "synthetic_over_real_top1": None,
        "generation_images_per_sec": 1.0,
        "synthetic_vs_real": quality,
        "stage_seconds": {},
    }
    md = markdown(table)
    assert "| fid | kid_mean | precision | recall | density | coverage | near_copy_share |" in md
    assert f"| {quality['fid']:.4f} | {quality['kid_mean']:.4f} | {quality['precision']:.4f} |" in md
