"""The joints between the recipe's stages (issue 23) that are cheap to cross without a server: each is a test
that failed on the code before the fix. The costlier joints have their tests beside the stage they belong to
(test_oom_split: a non-finite image fails its request; test_client_units: every packed format reads back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from realfake.client.generate import GenerateConfig, read_inputs
from realfake.core.classes import load_classes
from realfake.core.errors import UserError
from realfake.serving.batching import parse_request
from realfake.training.data import collect_samples

from conftest import rf


def _folder(root, classes=("cat", "dog"), per=3, size=16):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.new("RGB", (size, size), (40 * i, 90, 30)).save(root / c / f"{c}{i}.jpg")
    return root


# -- --steps x --strength that leaves nothing to denoise ----------------------------------------------------


def test_steps_times_strength_under_one_is_one_line_naming_both(tmp_path):
    """Before: the job ran and every image failed with "The size of tensor a (0) must match ... (3)"."""
    real = _folder(tmp_path / "real")
    cfg = GenerateConfig(classes=str(real), out=tmp_path / "out", real=real, steps=1, strength=0.5, urls=["x:1"])
    with pytest.raises(UserError, match=r"--steps 1 with --strength 0.5 leaves no step.*--steps to at least 2"):
        cfg.check()
    GenerateConfig(classes=str(real), out=tmp_path / "o", real=real, steps=2, strength=0.5, urls=["x:1"]).check()
    # through the command: exit 2, one line, before any server is asked (port 1 has none)
    r = rf("rf-client", "generate", "--classes", str(real), "--real", str(real), "--steps", "1", "--strength",
           "0.5", "--url", "127.0.0.1:1", "--out", str(tmp_path / "cli"))  # fmt: skip
    assert r.returncode == 2 and "--steps 1 with --strength 0.5" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cli").exists()
    # and the server refuses such a request the same way, for clients that are not rf-client
    request = {
        "PROMPT": np.array([[b"a cat"]], dtype=object),
        "SEED": np.array([[1]], np.int64),
        "STEPS": np.array([[1]], np.int32),
        "STRENGTH": np.array([[0.5]], np.float32),
        "INIT_IMAGE": np.zeros((1, 32, 32, 3), np.uint8),
    }
    with pytest.raises(ValueError, match="leaves no step to denoise"):
        parse_request(0, request, 32)


# -- a captions file that matches only some images ----------------------------------------------------------


def _captions(path, names):
    path.write_text("".join(json.dumps({"image": n, "caption": f"a photo {n}"}) + "\n" for n in names))
    return path


def test_captions_for_some_images_only_are_reported_and_refused_unless_accepted(tmp_path):
    """Before: images without a caption silently fell back to the class prompt, in generation and finetune."""
    real = _folder(tmp_path / "real")
    partial = _captions(tmp_path / "partial.jsonl", ["cat/cat0.jpg", "cat1", "dog/dog0.jpg", "dog2"])
    cfg = GenerateConfig(classes=str(real), out=tmp_path / "out", real=real, captions=partial, urls=["x:1"])
    with pytest.raises(UserError, match=r"captions 4 of the 6 real images; 2 have no caption \(cat/cat2.jpg"):
        read_inputs(cfg, log=lambda m: None)
    notes = []
    cfg.partial_captions = True
    inputs = read_inputs(cfg, log=notes.append)
    assert inputs.captions["cat1"] == "a photo cat1"
    assert len(notes) == 1 and "--partial-captions" in notes[0] and "4 of the 6" in notes[0]
    classes = load_classes(str(real))
    with pytest.raises(UserError, match="captions 4 of the 6 real images"):
        collect_samples(real, classes, partial)
    assert len(collect_samples(real, classes, partial, partial_captions=True, log=notes.append)) == 6
    whole = _captions(tmp_path / "whole.jsonl", [f"{c}{i}" for c in ("cat", "dog") for i in range(3)])
    assert all(s.caption for s in collect_samples(real, classes, whole))
    # the command line carries the option
    r = rf("rf-client", "generate", "--help")
    assert "--partial-captions" in r.stdout


# -- rf-demo --real DIR that cannot make a demo -------------------------------------------------------------


@pytest.mark.parametrize(
    "classes, per, says",
    [(("cat",), 20, "holds 1 class folder"), (("cat", "dog"), 1, "fewer than 2 images")],
)
def test_demo_refuses_own_data_that_cannot_make_a_demo_before_any_stage(tmp_path, classes, per, says):
    """Before: one class trained the base model for minutes, then failed in the classifier."""
    real = _folder(tmp_path / "real", classes, per)
    out = tmp_path / "demo"
    r = rf("rf-demo", "--real", str(real), "--out", str(out), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert says in r.stderr and "Traceback" not in r.stderr
    assert not (out / "stages").exists() and not (out / "real_train").exists()


# -- the guidance token on a stock SD-1.5 (no image_encoder/) -----------------------------------------------


def _clip_model(path, projection_dim):
    """A tiny whole CLIPModel (both towers), saved as a local copy of openai/clip-vit-large-patch14 is laid out."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),  # fmt: skip
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_a_bundle_without_image_encoder_gets_one_and_nothing_runs_without_it_unasked(tmp_path):
    """Before: finetune and `--guidance-token auto` ran without the token on such a bundle (one log line)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from realfake.client.generate import build_job
    from realfake.client.triton import ModelCard
    from realfake.export.tiny_bundle import build_tiny_bundle
    from realfake.serving.model_bundle import check_bundle
    from realfake.training.finetune import run_finetune
    from realfake.training.finetune_config import FinetuneConfig

    base = build_tiny_bundle(tmp_path / "base", image_encoder=False)
    real = _folder(tmp_path / "real", size=32)
    # 1. finetune and generation refuse, naming the command that fixes it
    cfg = FinetuneConfig(bundle=base, real=real, out=tmp_path / "ft", classes=str(real), max_steps=1)
    with pytest.raises(UserError, match="has no image_encoder/.*rf-train add-image-encoder.*--guidance-token off"):
        run_finetune(cfg, log=lambda m: None)
    gen = GenerateConfig(classes=str(real), out=tmp_path / "gen", real=real, urls=["x:1"])
    card = ModelCard("127.0.0.1:1", "tiny", 32, False, 4)
    with pytest.raises(UserError, match="no image encoder.*rf-train add-image-encoder.*--guidance-token off"):
        build_job(gen, read_inputs(gen), card, log=lambda m: None)
    gen.guidance_token = "off"  # asked for explicitly: allowed
    spec, _ = build_job(gen, read_inputs(gen), card, log=lambda m: None)
    assert spec.guidance_token is False
    # 2. the command: a whole CLIPModel's vision tower and projection, checked against the text width (32)
    clip = _clip_model(tmp_path / "clip", projection_dim=32)
    out = tmp_path / "with-encoder"
    r = rf("rf-train", "add-image-encoder", "--bundle", str(base), "--image-encoder", str(tmp_path / "clip"),
           "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "image_encoder/ added" in r.stderr and check_bundle(out).has_image_encoder
    assert (out / "unet").stat().st_ino == (base / "unet").stat().st_ino or (
        (out / "unet" / "config.json").stat().st_ino == (base / "unet" / "config.json").stat().st_ino
    )  # hard links, not copies of the base's GBs
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, local_files_only=True)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert torch.equal(pipe.image_encoder.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(
        pipe.image_encoder.vision_model.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.patch_embedding.weight,
    )
    # 3. refused: a projection of another width, a bundle that has one already, a folder that is no CLIP
    _clip_model(tmp_path / "clip16", projection_dim=16)
    r = rf("rf-train", "add-image-encoder", "--bundle", str(base), "--image-encoder", str(tmp_path / "clip16"),
           "--out", str(tmp_path / "bad"))  # fmt: skip
    assert r.returncode == 2 and "projects to 16" in r.stderr and "32 wide" in r.stderr
    r = rf("rf-train", "add-image-encoder", "--bundle", str(out), "--image-encoder", str(tmp_path / "clip"),
           "--out", str(tmp_path / "again"))  # fmt: skip
    assert r.returncode == 2 and "already has an image_encoder" in r.stderr
    r = rf("rf-train", "add-image-encoder", "--bundle", str(base), "--image-encoder", str(base / "unet"),
           "--out", str(tmp_path / "notclip"))  # fmt: skip
    assert r.returncode == 2 and "CLIP model" in r.stderr


# -- GPU serving outside Docker: the repository's backends against the server's ----------------------------


def test_rf_serve_refuses_a_repository_whose_backends_the_server_lacks(tiny_onnx, tmp_path):
    """Before: rf-serve started pytriton's tritonserver (Python backend only) on a native-backend repository,
    which then failed model by model inside Triton's log."""
    from realfake.client.server import find_triton, repository_backends, triton_installs
    from realfake.export.triton_repo import write_repository

    repo = write_repository(tiny_onnx, tmp_path / "repo", runtime="onnxruntime")
    needed = repository_backends(repo)
    assert set(needed) == {"python", "onnxruntime"} and "unet" in needed["onnxruntime"]
    bundled = triton_installs()[0]
    assert bundled.backend_names == {"python"}  # what nvidia-pytriton's server has
    r = rf("rf-serve", "--repo", str(repo), "--http-port", "0", timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs the Triton backend(s) onnxruntime (" in r.stderr and "has: python" in r.stderr
    assert "--triton-bin" in r.stderr
    # an explicit binary is the only candidate; one that is not there is one line too
    r = rf("rf-serve", "--repo", str(repo), "--triton-bin", str(tmp_path / "nope"), timeout=60)
    assert r.returncode == 2 and "is not an executable tritonserver" in r.stderr
    # a full install's layout (bin/ beside backends/) is read for its backends
    full = tmp_path / "opt" / "tritonserver"
    for backend in ("python", "onnxruntime", "tensorrt"):
        (full / "backends" / backend).mkdir(parents=True)
    (full / "bin").mkdir()
    (full / "bin" / "tritonserver").symlink_to(bundled.binary)
    install = find_triton(repo, full / "bin" / "tritonserver")
    assert install.backends == full / "backends" and install.backend_names >= {"onnxruntime", "python"}
    assert find_triton(tmp_path / "empty-repo-is-fine").binary == bundled.binary  # nothing needed: the first
