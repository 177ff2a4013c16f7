"""rf-demo, reduced: the whole loop on real Fashion-MNIST through a real Triton server, with an accuracy floor;
and its failure handling (missing/corrupt data, busy port, resume from the last finished stage)."""

import json
import shutil
import socket

import pytest

from realfake.training.idx import DEBIAN_DIR

from conftest import rf

pytestmark = pytest.mark.slow

REDUCED = [
    "--per-class",
    "30",
    "--test-images",
    "1000",
    "--base-vae-steps",
    "40",
    "--base-unet-steps",
    "120",
    "--finetune-steps",
    "10",
    "--steps",
    "12",
    "--epochs",
    "6",
    "--ood-per-class",
    "10",
    "--scaling",
    "1,2",
]
# without the corrupted set and the 2x rows: for the tests of stages and errors, not of the findings
BASIC = [*REDUCED[: REDUCED.index("--ood-per-class")], "--ood-per-class", "0"]
# Chance is 0.10. The reduced run trains its base model for seconds (measured here: synthetic 0.39, real 0.51),
# so its floor is far below the full run's ratio.
SYNTHETIC_FLOOR = 0.30


@pytest.fixture(scope="module")
def rf_home_demo(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_home")


def test_reduced_demo_end_to_end(tmp_path, rf_home_demo):
    out = tmp_path / "demo"
    r = rf("rf-demo", *REDUCED, "--out", str(out), env={"RF_HOME": str(rf_home_demo)}, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((out / "results.json").read_text())
    rows = {row["data"]: row for row in table["rows"]}
    real, syn = rows["real only"], rows["synthetic only (Real-Fake)"]
    assert real["train_images"] == syn["train_images"] == 300  # same image count
    assert rows["real + synthetic"]["train_images"] == 600
    assert table["test_images"] == 1000
    assert syn["top1"] > SYNTHETIC_FLOOR, table
    assert real["top1"] > SYNTHETIC_FLOOR, table
    assert table["synthetic_over_real_top1"] == pytest.approx(syn["top1"] / real["top1"])
    assert table["generation_images_per_sec"] > 0
    assert set(table["stage_seconds"]) >= {
        "data",
        "base",
        "finetune",
        "export",
        "generate",
        "classify_real",
        "classify_synthetic",
        "classify_mixed",
        "evaluate_data",
    }
    md = (out / "results.md").read_text()
    assert f"{syn['top1']:.4f}" in md and "synthetic / real top-1" in md
    # the synthetic set against the real training images, on the real-only classifier's features
    quality = table["synthetic_vs_real"]
    assert quality["fid"] > 0 and 0 < quality["precision"] <= 1 and 0 < quality["recall"] <= 1
    assert 0 <= quality["near_copy_share"] <= 1 and "classifier resnet-small" in quality["encoder"]
    assert f"| {quality['fid']:.4f} |" in md and (out / "evaluate_data" / "near_copies.png").is_file()
    assert (out / "real_vs_synthetic.png").stat().st_size > 1000
    # out of distribution: every classifier on the corrupted test set too (15 corruptions at severity 3)
    ood = table["out_of_distribution"]
    assert ood["corruptions"] == 15 and ood["images"] == 100 and ood["severity"] == 3
    assert {r["data"] for r in ood["rows"]} == set(rows)
    for r in ood["rows"]:
        assert len(r["per_corruption"]) == 15 and r["drop"] == pytest.approx(r["clean_top1"] - r["corrupted_top1"])
        assert r["corrupted_top1"] < r["clean_top1"], r  # the corruptions are harder than the clean images
    # privacy: membership inference against the real-only and the synthetic-only classifiers
    attacks = table["privacy"]["membership_inference"]
    assert set(attacks) == {"real only", "synthetic only (Real-Fake)"}
    assert all(0 <= a["auc"] <= 1 and a["members"] == a["non_members"] == 300 for a in attacks.values())
    assert "membership inference" in md and "corrupted top-1" in md
    # more synthetic data: the set made with 2 versions of each real image, classifiers on 1x and 2x
    scaling = table["scaling"]
    assert [p["versions"] for p in scaling["points"]] == [1, 2]
    assert [p["synthetic_images"] for p in scaling["points"]] == [300, 600]
    assert rows["synthetic only, 2x"]["train_images"] == 600 and rows["real + synthetic, 2x"]["train_images"] == 900
    assert scaling["points"][0]["synthetic_top1"] == syn["top1"] and (out / "scaling.png").stat().st_size > 500
    # every synthetic image was made by the server from a real one, and the dataset is whole
    verify = rf("rf-client", "verify", str(out / "synthetic"))
    assert verify.returncode == 0, verify.stdout
    # a second run finds every stage done (and the cached base model)
    again = rf("rf-demo", *REDUCED, "--out", str(out), env={"RF_HOME": str(rf_home_demo)})
    assert again.returncode == 0 and again.stderr.count("done in an earlier run") == 14


def test_missing_and_corrupt_data(tmp_path):
    r = rf("rf-demo", *REDUCED, "--out", str(tmp_path / "a"), "--fmnist", str(tmp_path / "nothing"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: stage data failed: ")
    assert "train-images-idx3-ubyte.gz is missing" in lines[-1]
    bad = tmp_path / "bad"
    shutil.copytree(DEBIAN_DIR, bad)
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    r = rf("rf-demo", *REDUCED, "--out", str(tmp_path / "b"), "--fmnist", str(bad))
    assert r.returncode == 2 and "stage data failed" in r.stderr and "is not a valid idx file" in r.stderr
    r = rf("rf-demo", *REDUCED, "--out", str(tmp_path / "c"), "--runtime", "openvino-int4")
    assert r.returncode == 2 and "'openvino-int4' is not one of 'python-ort', 'openvino'" in r.stderr
    r = rf("rf-demo", *REDUCED, "--out", str(tmp_path / "c"), "--runtime", "python-ort", "--precision", "int8")
    assert r.stderr.strip().splitlines() == ["error: --runtime python-ort takes --precision auto, fp32, not 'int8'"]
    assert r.returncode == 2 and not (tmp_path / "c").exists()


def test_busy_port_fails_the_generate_stage_and_rerun_resumes(tmp_path, rf_home_demo):
    out = tmp_path / "demo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = rf("rf-demo", *BASIC, "--out", str(out), "--http-port", str(port), env={"RF_HOME": str(rf_home_demo)})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: stage generate failed: port ")
    done = sorted(p.stem for p in (out / "stages").glob("*.json"))
    assert done == ["base", "data", "export", "finetune"]
    again = rf("rf-demo", *BASIC, "--out", str(out), "--http-port", str(port), env={"RF_HOME": str(rf_home_demo)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("done in an earlier run") == 4
