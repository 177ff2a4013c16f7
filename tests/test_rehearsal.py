"""The recipe rehearsed whole: deploy/node.sh, the script deploy/README.md's commands live in, run stage by stage
at small scale on CPU with 2 processes wherever the recipe has 8 GPUs. An ImageNet-shaped real set (wnid folders;
a flat ILSVRC2012_val folder with LOC_val_solution.csv), a tiny SD-layout base without image_encoder/ (as SD-1.5
ships), a tiny CLIP and a tiny BLIP-2: captions in 2 torchrun processes, the encoder added, finetune in 2 accelerate
processes, export, 2 servers with one Real-Fake shard each as JPEG (stopped by SIGTERM mid-way, then resumed),
verify, merge, pack, torchrun classify in 2 processes from the shards, top-1 on the flat val folder."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_caption import build_tiny_blip2
from test_recipe_joints import _clip_model

from realfake.core.dataset import read_manifest_rows
from realfake.core.files import write_atomic
from realfake.core.images import encode_image
from realfake.training.idx import DEBIAN_DIR, balanced_subset, load_split

from conftest import VENV_BIN

pytestmark = pytest.mark.slow
NODE = Path(__file__).resolve().parents[1] / "deploy" / "node.sh"
WNIDS = ("n01440764", "n01443537", "n01484850")  # three ImageNet classes stand for the 1000
PER_CLASS, VAL_PER_CLASS = 6, 4


def _imagenet_shaped(root: Path) -> None:
    """train/<wnid>/<wnid>_N.JPEG, and val/ flat (ILSVRC2012_val_0000000N.JPEG) with LOC_val_solution.csv."""
    images, labels = load_split(DEBIAN_DIR, "train")
    for n, i in enumerate(balanced_subset(labels, PER_CLASS, seed=2)):
        if labels[i] < len(WNIDS):
            wnid = WNIDS[labels[i]]
            rgb = np.repeat(np.kron(images[i], np.ones((2, 2), np.uint8))[:, :, None], 3, axis=2)[:32, :32]
            write_atomic(root / "train" / wnid / f"{wnid}_{n}.JPEG", encode_image(rgb, "jpeg"))
    test_images, test_labels = load_split(DEBIAN_DIR, "test")
    picked = [i for i in balanced_subset(test_labels, VAL_PER_CLASS, seed=3) if test_labels[i] < len(WNIDS)]
    rows = ["ImageId,PredictionString"]
    for number, i in enumerate(np.random.default_rng(4).permutation(picked), 1):
        stem = f"ILSVRC2012_val_{number:08d}"
        rgb = np.repeat(test_images[i][:, :, None], 3, axis=2)
        write_atomic(root / "val" / f"{stem}.JPEG", encode_image(rgb, "jpeg"))
        rows.append(f"{stem},{WNIDS[test_labels[i]]} 0 0 27 27")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")


def _node(env: dict, *stages: str, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(NODE), *stages], env=env, capture_output=True, text=True, timeout=timeout)
    said = f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert r.returncode == 0, f"node.sh {' '.join(stages)} exited {r.returncode}:\n{said}"
    print(*(line for line in r.stdout.splitlines() if " done in " in line), sep="\n")  # each stage's time
    return r


def _rows(folder: Path) -> list[dict]:
    return [row for f in sorted(folder.glob("manifest*.jsonl")) for row in read_manifest_rows(f)]


def test_the_recipe_runs_whole_on_two_processes_with_a_stop_and_a_resume(tmp_path):
    from realfake.export.tiny_bundle import build_tiny_bundle
    from realfake.serving.model_bundle import check_bundle

    data, models, work = tmp_path / "imagenet", tmp_path / "models", tmp_path / "work"
    _imagenet_shaped(data)
    base = build_tiny_bundle(models / "sd", image_encoder=False)  # as SD-1.5 ships: no image_encoder/
    _clip_model(models / "clip", projection_dim=32)
    build_tiny_blip2(models / "blip2")
    train_images = sorted(p.relative_to(data / "train").as_posix() for p in (data / "train").rglob("*.JPEG"))
    assert len(train_images) == len(WNIDS) * PER_CLASS
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "RF_WORK": str(work),
        "RF_REAL": str(data / "train"),
        "RF_BASE": str(base),
        "RF_CLIP": str(models / "clip"),
        "RF_CAPTIONER": str(models / "blip2"),
        "RF_VAL": str(data / "val"),
        "RF_VAL_LABELS": str(data / "LOC_val_solution.csv"),
        "RF_GPUS": "2",
        "RF_VERSIONS": "2",
        "RF_RUNTIME": "python-ort",
        # the recipe's commands at this size: fewer tokens, steps, epochs; the rest is the recipe's
        "RF_CAPTION_ARGS": "--batch-size 4 --max-new-tokens 6",
        "RF_FINETUNE_ARGS": "--batch-size 2 --max-steps 2",
        "RF_GENERATE_ARGS": "--format jpeg --quality 95 --batch-size 2 --concurrency 2 --steps 4",
        "RF_PACK_ARGS": "--shard-size 10",
        "RF_CLASSIFY_ARGS": "--model resnet-small --image-size 16 --epochs 2 --batch-size 6 --lr 0.05 --workers 0",
        "RF_PROGRESS_EVERY": "1",
    }

    # 1-4: captions (2 processes), the image encoder, finetune (2 processes), export
    r = _node(env, "captions", "encoder", "finetune", "export")
    out = r.stdout + r.stderr
    assert "process 0 of 2" in out and "process 1 of 2" in out, out[-3000:]
    captions = [json.loads(line) for line in (work / "captions.jsonl").read_text().splitlines()]
    assert sorted(c["image"] for c in captions) == train_images  # every image once, parts merged away
    assert not list(work.glob("captions.jsonl.part-*"))
    assert check_bundle(work / "base").has_image_encoder and not check_bundle(base).has_image_encoder
    finetune = json.loads((work / "finetune" / "finetune.json").read_text())
    assert finetune["processes"] == 2 and finetune["guidance_token"] is True and finetune["steps"] == 2
    # the guidance token's image embeddings: each process embedded its half of the images, each image once
    chunks = [np.load(f) for f in sorted((work / "finetune" / "cache").glob("*/*.keys.npy"))]
    assert sorted(len(c) for c in chunks) == [len(train_images) // 2] * 2
    assert len(set(np.concatenate(chunks).tolist())) == len(train_images)
    assert (work / "repo" / "pipeline" / "config.pbtxt").is_file()

    # a re-run of finished stages redoes nothing (a finished finetune: test_finetune.py)
    r = _node(env, "encoder", "export")
    out = r.stdout + r.stderr
    assert "has image_encoder/ already" in out and "is up to date" in out, out[-3000:]

    # 5-6: two servers, one Real-Fake shard each, stopped by SIGTERM once images exist, then resumed
    synthetic = work / "synthetic"
    run = subprocess.Popen(["bash", str(NODE), "generate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(_rows(synthetic)) < 4 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.poll() is None, f"generation ended before the stop:\n{run.stdout.read()[-3000:]}"
    os.kill(run.pid, signal.SIGTERM)  # the scheduler's stop, to the script
    stopped = run.communicate(timeout=120)[0]
    assert run.returncode == 143, stopped[-3000:]
    before = len(_rows(synthetic))
    assert 4 <= before < len(train_images) * 2, before
    alive = subprocess.run(["pgrep", "-af", str(work)], capture_output=True, text=True).stdout  # servers, clients
    assert not alive, f"servers left running after the stop: {alive}"
    r = _node(env, "generate")
    summaries = [json.loads(p.read_text()) for p in sorted(synthetic.glob("summary.shard-*-of-2.json"))]
    assert len(summaries) == 2 and all(s["failed"] == 0 for s in summaries)
    assert sum(s["skipped_already_done"] for s in summaries) == before  # resumed: nothing made twice
    assert sum(s["images"] for s in summaries) == len(train_images) * 2 - before

    # 7: verify, merge, pack
    r = _node(env, "finish")
    rows = [json.loads(line) for line in (synthetic / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == len({(row["class_id"], row["index"]) for row in rows}) == len(train_images) * 2
    assert {row["real_image"] for row in rows} == set(train_images)  # every real image conditions 2 versions
    caption_of = {c["image"]: c["caption"] or None for c in captions}
    assert all(row["path"].endswith(".jpg") and row["guidance_token"] for row in rows)
    assert all(row["caption"] == caption_of[row["real_image"]] for row in rows)  # its image's own caption
    assert {row["class_id"] for row in rows} == set(WNIDS)
    shards = sorted((work / "synthetic.wds").glob("*.tar"))
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == len(rows) and {int(c) for _, c in samples} == {row["class_index"] for row in rows}

    # 8: torchrun classify, 2 processes, on the shards; top-1 on the flat val folder with its labels file
    r = _node(env, "classify")
    result = json.loads((work / "classifier" / "result.json").read_text())
    assert result["processes"] == 2 and result["train"]["synthetic_images"] == len(rows)
    val = result["val"]["in1k"]
    assert val["layout"] == "flat + labels file" and val["images"] == len(WNIDS) * VAL_PER_CLASS
    assert sorted(val["per_class"]) == sorted(WNIDS) and 0.0 <= val["top1"] <= 1.0
