"""A generated set read by the tools users load it with: torchvision's ImageFolder, Hugging Face datasets'
`imagefolder` (through metadata.jsonl) and the `webdataset` library (over `rf-client pack`'s shards), each
label checked against the manifest. Fashion-MNIST's class order differs from the sorted folder names, which is
what makes the labels easy to get wrong."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import generate_args, rf

pytestmark = pytest.mark.slow

JOB = dict(classes="fashion-mnist", per_class=2, steps=2, seed=1, batch_size=4, quiet=True)


def _manifest(out):
    return {r["path"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def generated(triton, tmp_path_factory):
    out = tmp_path_factory.mktemp("loaders") / "fmnist"
    r = rf("rf-client", *generate_args(out, triton.url, format="jpeg", **{**JOB, "quiet": False}))
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_imagefolder_order_files_and_the_note(generated):
    out, stderr = generated
    rows = _manifest(out)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 10 and len(rows) == 20  # nothing but class folders in OUT
    assert (out / "classes.txt").read_text().split() == folders
    to_idx = json.loads((out / "class_to_idx.json").read_text())
    assert to_idx == {c: i for i, c in enumerate(folders)}
    assert to_idx["t_shirt_top"] == 8 and {
        r["class_index"] for r in rows.values() if r["class_id"] == "t_shirt_top"
    } == {0}
    assert (
        "note: ImageFolder orders the classes by folder name" in stderr
        and "t_shirt_top: class set 0, ImageFolder 8" in stderr
    )


def test_torchvision_imagefolder_reads_every_label(generated):
    from torchvision.datasets import ImageFolder

    out, _ = generated
    rows, to_idx = _manifest(out), json.loads((out / "class_to_idx.json").read_text())
    folder = ImageFolder(str(out))
    assert folder.class_to_idx == to_idx and len(folder) == len(rows)
    for path, label in folder.samples:
        row = rows[os.path.relpath(path, out)]
        assert folder.classes[label] == row["class_id"] and label == to_idx[row["class_id"]]


def test_hugging_face_imagefolder_reads_labels_prompts_and_seeds(generated, tmp_path):
    import datasets

    out, _ = generated
    rows, to_idx = _manifest(out), json.loads((out / "class_to_idx.json").read_text())
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(rows)
    by_seed = {r["seed"]: r for r in rows.values()}
    for example in ds:
        row = by_seed[example["seed"]]
        assert example["label"] == to_idx[row["class_id"]] and example["class_id"] == row["class_id"]
        assert example["class_index"] == row["class_index"] and example["prompt"] == row["prompt"]
        assert example["image"].size == (32, 32)


def test_webdataset_reads_the_packed_shards(generated, tmp_path):
    import webdataset as wds

    out, _ = generated
    rows = _manifest(out)
    r = rf("rf-client", "pack", str(out), "--out", str(tmp_path / "shards"), "--shard-size", "8")
    assert r.returncode == 0, r.stderr
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3
    seen = 0
    for image, cls, meta in wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"):
        row = rows[meta["path"]]
        assert cls == row["class_index"] and meta["class_id"] == row["class_id"] and image.size == (32, 32)
        seen += 1
    assert seen == len(rows)


def test_sharded_job_gets_its_loader_files_from_merge(triton, tmp_path):
    out = tmp_path / "sharded"
    for k in range(2):
        r = rf("rf-client", *generate_args(out, triton.url, shard=f"{k}/2", **JOB))
        assert r.returncode == 0, r.stderr
    assert not (out / "metadata.jsonl").exists()  # no shard writes the whole set's files
    r = rf("rf-client", "merge", str(out))
    assert r.returncode == 0, r.stderr
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 20 and len({json.loads(x)["file_name"] for x in lines}) == 20
    assert (out / "classes.txt").read_text().split() == sorted(p.name for p in out.iterdir() if p.is_dir())


def test_unattended_runs_print_plain_progress_lines(triton, tmp_path):
    """A pod's or a Slurm task's log (no terminal, and the deploy files pass --quiet): before, --quiet printed
    nothing for the whole job, and verify, merge and pack nothing until they ended."""
    env = {"RF_PROGRESS_EVERY": "0"}  # a line at every update (the default is a line a minute)
    out = tmp_path / "quiet"
    r = rf("rf-client", *generate_args(out, triton.url, shard="0/2", **JOB), env=env)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("generate: ")]
    assert lines, r.stderr
    assert re.fullmatch(r"generate: \d+/10 \(\d+\.\d%\), \d+\.\d img/s, ETA \S+, 0 failed, servers up 1/1", lines[-1])
    assert lines[-1].startswith("generate: 10/10") or len(lines) >= 2
    for command in (["merge", str(out)], ["verify", str(out)], ["pack", str(out), "--out", str(tmp_path / "s")]):
        r = rf("rf-client", *command, env=env)
        assert r.returncode == 0, r.stderr
        label = command[0]
        assert re.search(rf"^{label}: \d+", r.stderr, re.M), (command, r.stderr)
