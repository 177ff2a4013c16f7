"""The client's write path and its resume check, without a server: deterministic encoding per format, the
writer pool (facts, a failed batch recorded whole or not at all, nothing queued after a failure), and a resume
that trusts a row by `stat` alone."""

import hashlib
import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from realfake.client.throughput import textured_images
from realfake.client.verify import verify
from realfake.client.writer import ImageWriter
from realfake.core import dataset as ds
from realfake.core.images import FORMATS, encode_image

IMAGES = textured_images(4, size=64, seed=1)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_encodes_deterministically_and_decodes_back(fmt):
    a, b = encode_image(IMAGES[0], fmt, 95), encode_image(IMAGES[0].copy(), fmt, 95)
    assert a == b  # re-runs of a job give byte-identical files
    decoded = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"))
    assert decoded.shape == IMAGES[0].shape
    error = np.abs(decoded.astype(int) - IMAGES[0]).mean()
    # lossless, or close at quality 95 (WebP subsamples colour: more error on this grainy texture)
    assert error == 0 if fmt == "png" else 0 < error < {"jpeg": 6, "webp": 10}[fmt]


def _write(writer, rels, images):
    results = []
    writer.write_batch(rels, images, lambda facts, error: results.append((facts, error)))
    writer.close()
    assert len(results) == 1  # the callback runs once per batch
    return results[0]


def test_writer_reports_what_it_wrote(tmp_path):
    facts, error = _write(ImageWriter(tmp_path, "jpeg", 90, workers=2), ["a/0.jpg", "a/1.jpg"], IMAGES[:2])
    assert error is None
    for rel, f in zip(["a/0.jpg", "a/1.jpg"], facts, strict=True):
        data = (tmp_path / rel).read_bytes()
        st = os.stat(tmp_path / rel)
        assert f == {"sha256": hashlib.sha256(data).hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_batch_lands_nothing_and_stops_the_writer(tmp_path):
    (tmp_path / "blocked").write_text("a file where a class folder should be")
    writer = ImageWriter(tmp_path, "png", workers=2)
    rels = ["a/0.png", "blocked/1.png", "a/2.png", "a/3.png"]
    results, first_done = [], threading.Event()

    def record(facts, error):
        results.append((facts, error))
        first_done.set()

    writer.write_batch(rels, IMAGES, record)
    assert first_done.wait(30)
    writer.write_batch(["a/9.png"], IMAGES[:1], record)  # after the failure: refused, not written
    writer.close()
    assert not (tmp_path / "a" / "9.png").exists()
    assert [facts for facts, _ in results] == [None, None]
    assert "cannot write" in str(results[0][1]) and "blocked/1.png" in str(results[0][1])
    assert not list(tmp_path.glob("a/*.png"))  # the batch's images that did land were removed
    late = []
    writer.write_batch(["a/10.png"], IMAGES[:1], lambda facts, error: late.append(error))
    assert late and late[0] is not None  # after close, batches are refused, not lost


def _dataset(out, n=6):
    writer = ImageWriter(out, "png", workers=2)
    rels = [f"c/{i:05d}.png" for i in range(n)]
    facts, error = _write(writer, rels, textured_images(n, size=16, seed=2))
    assert error is None
    manifest = ds.ManifestWriter(out / "manifest.jsonl")
    for i, (rel, f) in enumerate(zip(rels, facts, strict=True)):
        manifest.append({"path": rel, "class_id": "c", "class_index": 0, "index": i, **f})
    manifest.close()
    return rels


def test_resume_trusts_a_row_by_stat_and_hashes_only_when_mtime_differs(tmp_path, monkeypatch):
    rels = _dataset(tmp_path)
    read = []
    real_hash = ds.file_sha256
    monkeypatch.setattr(ds, "file_sha256", lambda path: read.append(path) or real_hash(path))
    os.utime(tmp_path / rels[1], ns=(1, 1))  # copied without its mtime, same bytes: kept, after a hash
    (tmp_path / rels[2]).write_bytes(b"\x89PNG torn")  # another size: dropped without a read
    (tmp_path / rels[3]).unlink()
    with open(tmp_path / "manifest.jsonl", "a") as f:  # a row listed twice is kept once
        f.write((tmp_path / "manifest.jsonl").read_text().splitlines()[0] + "\n")
    done = ds.compact_manifest(tmp_path, "manifest.jsonl")
    assert sorted(i for _, i in done) == [0, 1, 4, 5]
    assert read == [tmp_path / rels[1]]  # only the image whose mtime changed was read
    kept = [json.loads(line)["index"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert kept == [0, 1, 4, 5]


def test_verify_sees_every_format(tmp_path):
    _dataset(tmp_path, n=2)
    assert verify(tmp_path).ok
    (tmp_path / "c" / "99.jpg").write_bytes(encode_image(IMAGES[0], "jpeg"))
    (tmp_path / "c" / "98.webp").write_bytes(encode_image(IMAGES[0], "webp"))
    assert verify(tmp_path).unlisted == ["c/98.webp", "c/99.jpg"]
