"""bundle_identity: it hashes exactly the files loading the bundle reads, and an unchanged bundle is not read again."""

import json
import shutil

import pytest

from realfake.serving import model_bundle
from realfake.serving.model_bundle import TRAINING_RECORD, bundle_files, bundle_identity


@pytest.fixture
def reads(monkeypatch, tmp_path):
    """Every file whose bytes bundle_identity hashes, by path; the digest cache in a fresh RF_HOME."""
    monkeypatch.setenv("RF_HOME", str(tmp_path / "home"))
    seen: list = []
    digest = model_bundle.file_sha256

    def counting(path):
        seen.append(path)
        return digest(path)

    monkeypatch.setattr(model_bundle, "file_sha256", counting)
    return seen


def test_identity_hashes_what_loads_and_is_cached(tiny_bundle, tmp_path, reads):
    bundle = tmp_path / "sd"
    shutil.copytree(tiny_bundle, bundle)
    first = bundle_identity(bundle)
    everything = {p for p in bundle.resolve().rglob("*") if p.is_file()}
    assert set(reads) == everything and len(reads) == len(everything)  # a clean bundle: every file, once each

    # leftovers loading never reads: a 3 GB checkpoint (sparse), a fp16 variant, .bin beside safetensors, a README
    with open(bundle / "v1-5-pruned.ckpt", "wb") as f:
        f.truncate(3 << 30)
    (bundle / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"half")
    (bundle / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (bundle / "unet" / "README.md").write_text("notes")
    reads.clear()
    assert bundle_identity(bundle) == first
    assert reads == []  # nothing changed that loads: nothing read again (the digests are cached)

    weights = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = bundle_identity(bundle)
    assert changed != first and reads == [weights.resolve()]  # only the changed file is read again

    (bundle / TRAINING_RECORD).write_text(json.dumps({"guidance_token": True}))
    assert bundle_identity(bundle) != changed  # how it was trained is part of the model


def test_unlisted_image_encoder_counts_and_bin_weights_when_no_safetensors(tiny_bundle, tmp_path, reads):
    bundle = tmp_path / "sd"
    shutil.copytree(tiny_bundle, bundle)
    index = json.loads((bundle / "model_index.json").read_text())
    del index["image_encoder"]
    (bundle / "model_index.json").write_text(json.dumps(index))
    (bundle / "vae" / "diffusion_pytorch_model.safetensors").rename(bundle / "vae" / "diffusion_pytorch_model.bin")
    names = {p.relative_to(bundle).as_posix() for p in bundle_files(bundle)}
    assert {"image_encoder/model.safetensors", "image_encoder/config.json", "vae/diffusion_pytorch_model.bin"} <= names


def test_unwritable_cache_still_gives_the_identity(tiny_bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RF_HOME", str(blocker))  # the cache cannot be written: computed every time, no error
    assert bundle_identity(tiny_bundle) == bundle_identity(tiny_bundle)
