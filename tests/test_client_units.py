"""The client's dataset machinery without a server: class sets, prompts, seeds, shards, manifest, real images."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from realfake.client.verify import pack_webdataset, verify
from realfake.core import dataset as ds
from realfake.core.classes import ClassInfo, load_classes
from realfake.core.defaults import DEFAULT_TEMPLATE
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.images import encode_image, load_real_image
from realfake.core.real_folder import caption_for, load_captions, scan_real

from conftest import generate_args, rf


def test_imagenet_is_the_standard_1000():
    classes = load_classes("imagenet")
    assert len(classes) == 1000 and len({c.id for c in classes}) == 1000
    assert (classes[0].id, classes[0].name) == ("n01440764", "tench")
    assert (classes[999].id, classes[999].name) == ("n15075141", "toilet tissue")
    assert [c.index for c in classes] == list(range(1000))
    assert all(c.id.startswith("n") and len(c.id) == 9 for c in classes)


@pytest.mark.parametrize(
    "name, n, first, last",
    [
        ("cifar10", 10, "airplane", "truck"),
        ("cifar100", 100, "apple", "worm"),
        ("fashion-mnist", 10, "T-shirt/top", "Ankle boot"),
    ],
)
def test_builtin_sets(name, n, first, last):
    classes = load_classes(name)
    assert len(classes) == n and classes[0].name == first and classes[-1].name == last
    assert len({c.id for c in classes}) == n and all("/" not in c.id for c in classes)


def test_class_files(tmp_path):
    (tmp_path / "a.txt").write_text("red fox\n# comment\n\ngray wolf\n")
    assert [(c.id, c.name) for c in load_classes(str(tmp_path / "a.txt"))] == [
        ("red_fox", "red fox"),
        ("gray_wolf", "gray wolf"),
    ]
    (tmp_path / "b.csv").write_text("id,name\nn1,fox\nn2,wolf\n")
    assert [c.id for c in load_classes(str(tmp_path / "b.csv"))] == ["n1", "n2"]
    (tmp_path / "c.json").write_text(json.dumps([{"id": "x1", "name": "cat"}, "dog"]))
    assert [(c.id, c.name) for c in load_classes(str(tmp_path / "c.json"))] == [("x1", "cat"), ("dog", "dog")]


@pytest.mark.parametrize(
    "fname, text, message",
    [
        ("empty.txt", "  \n", "is empty"),
        ("bad.json", "{not json", "is malformed"),
        ("bad.csv", "label\nfox\n", "needs a header with a 'name'"),
        ("dup.csv", "id,name\nn1,fox\nn1,wolf\n", "duplicate class ids n1"),
        ("list.json", "[1, 2]", "entry 1 is neither"),
    ],
)
def test_bad_class_files(tmp_path, fname, text, message):
    (tmp_path / fname).write_text(text)
    with pytest.raises(UserError, match=message):
        load_classes(str(tmp_path / fname))


def test_unknown_class_set():
    with pytest.raises(UserError, match="unknown class set 'imagenet22k'"):
        load_classes("imagenet22k")


def test_prompt_template():
    assert ds.render_prompt(DEFAULT_TEMPLATE, "tench") == "photo of tench, best quality"
    assert ds.render_prompt(DEFAULT_TEMPLATE, "tench", "a man holding a fish") == (
        "photo of tench, a man holding a fish, best quality"
    )
    assert ds.render_prompt("{caption}, a {class}", "dog") == "a dog"


def test_seeds_are_stable_and_distinct():
    assert ds.image_seed(0, "n01440764", 0) == ds.image_seed(0, "n01440764", 0)
    # a fixed value: a change here silently changes every dataset ever made
    assert ds.image_seed(0, "n01440764", 0) == int.from_bytes(
        __import__("hashlib").sha256(b"0/n01440764/0").digest()[:8], "big"
    ) & (2**63 - 1)
    seeds = {ds.image_seed(1, c, i) for c in ("a", "b") for i in range(500)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


def test_shards_partition_the_job():
    cls = ClassInfo(0, "c", "c")
    items = [ds.WorkItem(cls, i, 0, "p") for i in range(400)]
    parts = [[it for it in items if ds.shard_of(it, 3) == k] for k in range(3)]
    assert sorted(it.index for p in parts for it in p) == list(range(400))
    assert all(len(p) > 80 for p in parts)
    assert ds.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(UserError):
            ds.parse_shard(bad)


def test_manifest_torn_last_line_is_dropped_other_damage_is_an_error(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert ds.read_manifest_rows(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        ds.read_manifest_rows(path)


def _fake_dataset(out, n=4, classes=("c",), fmt="png"):
    writer = ds.ManifestWriter(out / "manifest.jsonl")
    suffix = {"png": "png", "jpeg": "jpg", "webp": "webp"}[fmt]
    for i in range(n):
        png = encode_image(np.full((8, 8, 3), i * 40, np.uint8), fmt)
        cls = classes[i * len(classes) // n]
        rel = f"{cls}/{i:05d}.{suffix}"
        write_atomic(out / rel, png)
        writer.append(
            {
                "path": rel,
                "class_id": cls,
                "class_index": classes.index(cls),
                "index": i,
                "sha256": __import__("hashlib").sha256(png).hexdigest(),
            }
        )
    writer.close()


def test_compact_manifest_keeps_only_whole_images(tmp_path):
    _fake_dataset(tmp_path)
    (tmp_path / "c/00001.png").unlink()
    (tmp_path / "c/00002.png").write_bytes(b"\x89PNG truncated")
    done = ds.compact_manifest(tmp_path, "manifest.jsonl")
    assert sorted(done) == [("c", 0), ("c", 3)]
    assert len(ds.read_manifest_rows(tmp_path / "manifest.jsonl")) == 2


def test_verify_finds_every_kind_of_hole(tmp_path):
    _fake_dataset(tmp_path)
    assert verify(tmp_path).ok
    (tmp_path / "c/00000.png").unlink()
    (tmp_path / "c/00001.png").write_bytes(b"junk")
    write_atomic(tmp_path / "c/00009.png", encode_image(np.zeros((4, 4, 3), np.uint8), "png"))
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write((tmp_path / "manifest.jsonl").read_text().splitlines()[3] + "\n")
    report = verify(tmp_path)
    assert not report.ok
    assert report.missing == ["c/00000.png"] and report.hash_mismatch == ["c/00001.png"]
    assert report.unlisted == ["c/00009.png"] and report.duplicate_rows == ["c/00003.png"]


def test_pack_webdataset(tmp_path):
    import tarfile

    (tmp_path / "d").mkdir()
    _fake_dataset(tmp_path / "d", n=5)
    shards = pack_webdataset(tmp_path / "d", tmp_path / "wds", shard_size=2)
    assert [p.name for p in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            keys += [n[: -len(".png")] for n in names if n.endswith(".png")]
            for key in keys[-2:] if shard != shards[-1] else keys[-1:]:
                assert [n for n in names if n.startswith(key + ".")] == [f"{key}.png", f"{key}.cls", f"{key}.json"]
                rel = key.replace("__", "/") + ".png"
                assert tar.extractfile(f"{key}.png").read() == (tmp_path / "d" / rel).read_bytes()
    assert sorted(keys) == [f"c__{i:05d}" for i in range(5)]


def test_pack_mixes_the_classes_in_every_shard_and_every_format_reads_back(tmp_path):
    """Packed in class order, a shard would hold one class (a streaming shuffle buffer then feeds one class at a
    time); and classify read only .png members, so a JPEG set packed into shards it read as empty."""
    import tarfile

    from realfake.training.image_sets import synthetic_refs

    classes = [ClassInfo(0, "a", "a"), ClassInfo(1, "b", "b")]
    (tmp_path / "d").mkdir()
    _fake_dataset(tmp_path / "d", n=8, classes=("a", "b"), fmt="jpeg")
    shards = pack_webdataset(tmp_path / "d", tmp_path / "wds", shard_size=4, seed=3)
    for shard in shards:
        with tarfile.open(shard) as tar:
            labels = {tar.extractfile(n).read() for n in tar.getnames() if n.endswith(".cls")}
        assert labels == {b"0", b"1"}, f"{shard.name} holds one class: {labels}"
    again = pack_webdataset(tmp_path / "d", tmp_path / "wds2", shard_size=4, seed=3)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in again]
    refs = synthetic_refs(tmp_path / "wds", classes)
    assert len(refs) == 8 and sorted(r.label for r in refs) == [0] * 4 + [1] * 4
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "shard-00000.tar", "w") as tar:
        info = tarfile.TarInfo("x.txt")
        tar.addfile(info)
    with pytest.raises(UserError, match="hold no image member"):
        synthetic_refs(empty, classes)


def test_real_folder_scan_and_loading(tmp_path):
    classes = load_classes("cifar10")
    for cls, n in (("airplane", 2), ("cat", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (40, 30), (i * 50, 10, 10)).save(tmp_path / cls / f"img{i}.jpg")
    found = scan_real(tmp_path, classes)
    assert found == {"airplane": ["airplane/img0.jpg", "airplane/img1.jpg"], "cat": ["cat/img0.jpg"]}
    img = load_real_image(tmp_path / "airplane/img0.jpg", 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    (tmp_path / "zebra").mkdir()
    (tmp_path / "zebra" / "z.png").write_bytes(b"")
    with pytest.raises(UserError, match="folder\\(s\\) zebra match no class"):
        scan_real(tmp_path, classes)


def test_real_folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        scan_real(tmp_path, load_classes("cifar10"))


def test_captions(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"image": "cat/img0.jpg", "caption": "a cat on a sofa"}\n{"image": "img7", "caption": "x"}\n')
    caps = load_captions(path)
    assert caption_for(caps, "cat/img0.jpg") == "a cat on a sofa"
    assert caption_for(caps, "dog/img7.png") == "x" and caption_for(caps, "dog/none.png") == ""
    path.write_text('{"image": "a", "caption": "b"}\n{"image": "a"}\n')
    with pytest.raises(UserError, match="line 2 is malformed"):
        load_captions(path)


def test_url_names_and_addresses():
    from realfake.client.discovery import Fleet, is_name, split_url

    assert split_url("http://[::1]:8000/") == ("::1", 8000)
    assert not is_name("127.0.0.1") and not is_name("::1") and not is_name("localhost")
    assert is_name("realfake-headless.default.svc.cluster.local")
    fixed = Fleet(["127.0.0.1:8000", "localhost:8001", "127.0.0.1:8000"])
    assert not fixed.dynamic and fixed.addresses() == ["127.0.0.1:8000", "localhost:8001"]
    missing = Fleet(["no-such-server.invalid:8000", "127.0.0.1:9"])
    assert missing.dynamic and missing.addresses() == ["127.0.0.1:9"]  # a name with no address adds none
    with pytest.raises(UserError, match="resolved to no address for 0s"):
        Fleet(["no-such-server.invalid:8000"]).wait(0, log=lambda _m: None)


def test_dry_run_plans_without_writing(tmp_path):
    """`--dry-run` counts the job per shard, says what OUT already holds, estimates disk, and writes nothing."""
    out = tmp_path / "out"
    r = rf("rf-client", *generate_args(out, per_class=7, shard="1/3", format="jpeg", dry_run=True))
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    text = r.stdout
    assert "images        70 (text-only)" in text
    counts = re.search(r"shard         1/3: (\d+) images \(the 3 shards hold (\d+) to (\d+)", text)
    assert counts and int(counts[2]) <= int(counts[1]) <= int(counts[3])
    assert re.search(r"disk, jpeg q95 +~[\d.]+ KB/image: .* <- --format", text)

    from realfake.client.generate import GenerateConfig
    from realfake.client.plan import plan_dataset

    cfg = GenerateConfig(classes="cifar10", out=out, per_class=7, shard="1/3")
    plan = plan_dataset(cfg, log=lambda _m: None)
    assert sum(plan.per_shard) == 70 and plan.mine == int(counts[1]) and plan.finished == 0
    # an OUT that already lists some of this shard's images: they are counted, not planned again
    c = load_classes("cifar10")[0]
    mine = [i for i in range(7) if ds.shard_of(ds.WorkItem(c, i, 0, ""), 3) == 1]
    out.mkdir()
    (out / "manifest.shard-1-of-3.jsonl").write_text(
        "".join(json.dumps({"class_id": c.id, "index": i}) + "\n" for i in mine)
    )
    assert plan_dataset(cfg, log=lambda _m: None).finished == len(mine) > 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.shard-1-of-3.jsonl"]  # still nothing written

    bad = rf("rf-client", *generate_args(out, per_class=0, dry_run=True))
    assert bad.returncode == 2 and "--per-class must be >= 1" in bad.stderr


def test_merge_manifests_folds_shards_and_can_run_again(tmp_path):
    rows = [{"class_id": "cat", "index": i, "path": f"cat/{i}.png"} for i in range(5)]
    (tmp_path / "manifest.shard-0-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "manifest.shard-1-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    assert ds.merge_manifests(tmp_path) == (5, 2)
    assert [p.name for p in ds.manifest_files(tmp_path)] == ["manifest.jsonl"]
    assert ds.read_manifest_rows(tmp_path / "manifest.jsonl") == rows
    # a crash after the merged file was written but before a shard file went: merging again keeps each row once
    (tmp_path / "manifest.shard-1-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    assert ds.merge_manifests(tmp_path) == (5, 1)
    assert ds.read_manifest_rows(tmp_path / "manifest.jsonl") == rows
    assert ds.merge_manifests(tmp_path) == (5, 0)


def test_an_imagefolder_is_a_class_set(tmp_path):
    """`--classes DIR`: the folder names are the classes, in sorted order; an id is the folder name when it is
    filesystem-safe, and its prompt name reads '_' and '-' as spaces."""
    for name in ("golden_retriever", "n01440764", "Red Square", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a class")
    classes = load_classes(str(tmp_path))
    assert [(c.index, c.id, c.name) for c in classes] == [
        (0, "red_square", "Red Square"),
        (1, "golden_retriever", "golden retriever"),
        (2, "n01440764", "n01440764"),
    ]
    for c in classes:  # every folder matches its own class (hidden folders are no class)
        folder = tmp_path / ("Red Square" if c.id == "red_square" else c.id)
        Image.new("RGB", (4, 4)).save(folder / "a.png")
    assert scan_real(tmp_path, classes) == {
        "red_square": ["Red Square/a.png"],
        "golden_retriever": ["golden_retriever/a.png"],
        "n01440764": ["n01440764/a.png"],
    }
    empty = tmp_path / "empty"
    (empty / ".git").mkdir(parents=True)
    with pytest.raises(UserError, match="has no class folders"):
        load_classes(str(empty))


def test_server_time_from_triton_counters():
    """Per request: the pipeline's time; per execution: its components' (one batched execution of 2 requests
    charges each request the whole 100 ms and made one UNet call of 80 ms)."""
    from realfake.client.server_metrics import parse, server_time

    text = "\n".join(
        [
            "# TYPE nv_inference_request_success counter",
            'nv_inference_request_success{model="pipeline",version="1"} 5',
            'nv_inference_request_success{model="unet",version="1"} 3',
            'nv_inference_request_duration_us{model="pipeline",version="1"} 400000',
            'nv_inference_request_duration_us{model="unet",version="1"} 240000',
            'nv_inference_queue_duration_us{model="pipeline",version="1"} 20000',
            'nv_inference_compute_infer_duration_us{model="pipeline",version="1"} 380000',
            'nv_inference_exec_count{model="pipeline",version="1"} 4',
            'nv_gpu_utilization{gpu_uuid="x"} 0.5',
            "",
        ]
    )
    before = parse(text)
    assert before["pipeline"]["success"] == 5 and before["unet"]["request_us"] == 240000 and "" not in before
    after = {
        "pipeline": {
            **before["pipeline"],
            "success": 7,
            "request_us": 620000,
            "queue_us": 40000,
            "infer_us": 580000,
            "executions": 5,
        },
        "unet": {**before["unet"], "success": 4, "request_us": 320000},
    }
    t = server_time(before, after)
    assert t.requests == 2 and t.batch == 2.0
    assert t.request_ms == 110.0 and t.queue_ms == 10.0 and t.compute_ms == 100.0
    assert t.components == {"unet": 80.0} and t.pipeline_own_ms == 20.0
    assert server_time(before, before) is None  # nothing finished in between
