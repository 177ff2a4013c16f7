"""rf-train classify on real Fashion-MNIST images: learns, DDP agrees with one process, mixing is counted,
class identity comes from ids, bad input is one line."""

import hashlib
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from realfake.client.verify import pack_webdataset
from realfake.core.classes import load_classes
from realfake.core.dataset import ManifestWriter
from realfake.core.files import write_atomic
from realfake.core.images import encode_image
from realfake.training.idx import DEBIAN_DIR, balanced_subset, load_split, write_imagefolder

from conftest import cli_args, rf

pytestmark = pytest.mark.slow
CLASSES = load_classes("fashion-mnist")
TRAIN_PER_CLASS, VAL_PER_CLASS = 60, 30
COMMON = dict(classes="fashion-mnist", model="resnet-small", epochs=3, batch_size=32, lr=0.05)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """Small real train / held-out test ImageFolders from the real Fashion-MNIST idx files."""
    root = tmp_path_factory.mktemp("fmnist")
    images, labels = load_split(DEBIAN_DIR, "train")
    write_imagefolder(images, labels, CLASSES, root / "train", balanced_subset(labels, TRAIN_PER_CLASS, seed=1))
    test_images, test_labels = load_split(DEBIAN_DIR, "test")
    write_imagefolder(test_images, test_labels, CLASSES, root / "val", balanced_subset(test_labels, VAL_PER_CLASS))
    return root


@pytest.fixture(scope="module")
def fake_synthetic(fmnist, tmp_path_factory):
    """An rf-client-format dataset (manifest + PNGs) made of other real images, in folders whose names and
    order say nothing: labels must come from the manifest's class ids."""
    out = tmp_path_factory.mktemp("syn")
    images, labels = load_split(DEBIAN_DIR, "train")
    writer = ManifestWriter(out / "manifest.jsonl")
    for n, i in enumerate(balanced_subset(labels, 60, seed=7)):
        cls = CLASSES[int(labels[i])]
        png = encode_image(np.repeat(images[i][:, :, None], 3, axis=2), "png")
        rel = f"z{9 - cls.index}/{n:05d}.png"
        write_atomic(out / rel, png)
        writer.append(
            {
                "path": rel,
                "class_id": cls.id,
                "class_index": cls.index,
                "index": n,
                "sha256": hashlib.sha256(png).hexdigest(),
            }
        )
    writer.close()
    return out


def _result(out):
    return json.loads((out / "result.json").read_text())


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _classify(*defaults, **options):
    """rf-train classify with these options (dicts first: defaults the keywords override, as in cli_args)."""
    return rf("rf-train", "classify", *cli_args(*defaults, **options))


def _classify_real(fmnist, run, *defaults, **options):
    """rf-train classify on the real Fashion-MNIST subset, validated on the held-out one."""
    r = _classify(*defaults, **options, real=fmnist / "train", val=fmnist / "val", out=run)
    assert r.returncode == 0, r.stderr[-2000:]


def test_real_training_beats_chance_clearly(fmnist, tmp_path):
    _classify_real(fmnist, tmp_path / "run", COMMON)
    result = _result(tmp_path / "run")
    assert result["top1"] > 0.45, result  # chance is 0.10
    assert result["top5"] >= result["top1"] and result["val"]["images"] == 10 * VAL_PER_CLASS
    assert (tmp_path / "run" / "best.pt").is_file()
    epochs = _metrics(tmp_path / "run")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(e["samples_seen"] == e["unique_samples"] == 10 * TRAIN_PER_CLASS for e in epochs)


def test_eval_every_validates_only_those_epochs_and_the_last(fmnist, tmp_path):
    _classify_real(fmnist, tmp_path / "run", classes="fashion-mnist", model="resnet-small", epochs=3, eval_every=2)
    epochs = _metrics(tmp_path / "run")
    validated = [e["epoch"] for e in epochs if not math.isnan(e["val_top1"])]
    assert validated == [2, 3]


def test_ddp_two_processes_matches_one(fmnist, tmp_path):
    args = cli_args(COMMON, real=fmnist / "train", val=fmnist / "val")
    single = rf("rf-train", "classify", *args, *cli_args(out=tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "realfake.training.cli",
            "classify",
            *args,
            *cli_args(out=tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _result(tmp_path / "one"), _result(tmp_path / "two")
    assert two["processes"] == 2
    # stated margin: BatchNorm statistics are per process under DDP, so runs differ slightly
    assert abs(one["top1"] - two["top1"]) <= 0.12, (one["top1"], two["top1"])
    for e in _metrics(tmp_path / "two"):
        assert e["samples_seen"] == e["unique_samples"] == 10 * TRAIN_PER_CLASS  # no sample twice, none lost


def test_synthetic_plus_fraction_of_real_is_counted(fmnist, fake_synthetic, tmp_path):
    r = _classify(
        COMMON,
        epochs=2,
        synthetic=fake_synthetic,
        real=fmnist / "train",
        real_fraction=0.25,
        val=fmnist / "val",
        out=tmp_path / "mix",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    train = _result(tmp_path / "mix")["train"]
    assert train["synthetic_images"] == 600
    assert train["real_available"] == 10 * TRAIN_PER_CLASS and train["real_images"] == 10 * 15  # 0.25 x 60 per class
    assert train["total_images"] == 750


def test_synthetic_only_from_ids_and_from_webdataset(fmnist, fake_synthetic, tmp_path):
    """Folder names of the synthetic set are scrambled: only manifest class ids can make this learn."""
    r = _classify(COMMON, synthetic=fake_synthetic, val=fmnist / "val", out=tmp_path / "syn")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _result(tmp_path / "syn")["top1"] > 0.4
    shards = tmp_path / "wds"
    pack_webdataset(fake_synthetic, shards, shard_size=150)
    r = _classify(COMMON, epochs=1, synthetic=shards, val=fmnist / "val", out=tmp_path / "wdsrun")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _result(tmp_path / "wdsrun")["train"]["synthetic_images"] == 600


def test_bad_input(fmnist, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(fmnist / "val", val)
    shutil.rmtree(val / "bag")
    r = _classify(COMMON, real=fmnist / "train", val=val, out=tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: class mismatch between training and validation sets: only in training: bag; only in validation: none"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _classify(COMMON, real=empty, val=fmnist / "val", out=tmp_path / "o")
    assert r.returncode == 2 and "holds no images" in r.stderr
    r = _classify(COMMON, model="vgg11", real=fmnist / "train", val=fmnist / "val", out=tmp_path / "o")
    assert r.returncode == 2 and "unknown model 'vgg11'" in r.stderr


def test_corrupt_idx_file(tmp_path):
    from realfake.core.errors import UserError

    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(DEBIAN_DIR / name, tmp_path / name)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(UserError, match="is not a valid idx file"):
        load_split(tmp_path, "train")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz is missing"):
        load_split(tmp_path, "test")


def test_imagefolder_export_matches_idx(tmp_path):
    images, labels = load_split(DEBIAN_DIR, "test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    write_imagefolder(images, labels, CLASSES, tmp_path, np.array([0, 1]))
    for i in (0, 1):
        path = tmp_path / CLASSES[labels[i]].id / f"{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(path)), images[i])
