"""The guidance token end to end: a base bundle whose model_index.json does not list its image_encoder/ (SD-1.5
with the folder added by hand) -> rf-train finetune -> merged bundle -> ONNX -> a real tritonserver, and the
client's refusal when a model trained with the token is served without an encoder."""

import json
import shutil
import warnings

import numpy as np
import pytest
from test_finetune import make_real_set

from realfake.client.server import LocalServer
from realfake.client.triton import PipelineClient
from realfake.core.images import load_real_image
from realfake.core.protocol import PARAM_TRAINED_WITH_GUIDANCE_TOKEN, PIPELINE_MODEL
from realfake.export.onnx_export import export_onnx
from realfake.export.triton_repo import write_repository
from realfake.serving.components import OrtComponents
from realfake.serving.model_bundle import TRAINING_RECORD, check_bundle
from realfake.serving.sampler import Sampler, Settings
from realfake.training.finetune import FinetuneConfig, run_finetune

from conftest import generate_args, rf

pytestmark = pytest.mark.slow

STEPS = 4


def _unlist_image_encoder(bundle):
    index = json.loads((bundle / "model_index.json").read_text())
    del index["image_encoder"]
    (bundle / "model_index.json").write_text(json.dumps(index))


def _export(bundle, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(bundle, out, log=lambda *_: None)
    return out


def _served_flag(url) -> str:
    return PipelineClient(url).client.get_model_config(PIPELINE_MODEL)["parameters"][PARAM_TRAINED_WITH_GUIDANCE_TOKEN][
        "string_value"
    ]


@pytest.fixture(scope="module")
def finetuned(tiny_bundle, tmp_path_factory):
    base = tmp_path_factory.mktemp("base") / "sd"
    shutil.copytree(tiny_bundle, base)
    _unlist_image_encoder(base)  # the folder is there, the index does not name it
    real = make_real_set(tmp_path_factory.mktemp("real") / "train", per=2)
    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = FinetuneConfig(bundle=base, real=real, out=out, classes="cifar10", batch_size=2, max_steps=2, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_finetune(cfg, log=lambda *_: None)
    return base, real, out / "bundle", result


def test_merged_bundle_keeps_the_unlisted_image_encoder_and_records_the_token(finetuned):
    base, _, merged, result = finetuned
    assert result["guidance_token"] is True
    index = json.loads((merged / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    for name in ("config.json", "model.safetensors"):  # the base's encoder, byte for byte
        assert (merged / "image_encoder" / name).read_bytes() == (base / "image_encoder" / name).read_bytes()
    record = json.loads((merged / TRAINING_RECORD).read_text())
    assert record["guidance_token"] is True and record["image_encoder_size"] == 32
    info = check_bundle(merged)
    assert info.has_image_encoder and info.trained_with_guidance_token
    assert not check_bundle(base).trained_with_guidance_token


def test_served_finetuned_model_uses_the_token_exactly_as_in_process(finetuned, tmp_path):
    _, real, merged, _ = finetuned
    onnx_dir = _export(merged, tmp_path / "onnx")
    assert json.loads((onnx_dir / "export.json").read_text())["trained_with_guidance_token"] is True
    repo = write_repository(onnx_dir, tmp_path / "repo")
    init = np.stack([load_real_image(p, 32) for p in sorted((real / "cat").glob("*.png"))])
    prompts, seeds = ["photo of cat, best quality"] * 2, [3, 4]
    with LocalServer(repo) as server:
        card = PipelineClient(server.url).card()
        assert card.has_image_encoder and _served_flag(server.url) == "true"

        def served(token: bool) -> np.ndarray:
            return PipelineClient(server.url).infer(
                {
                    "PROMPT": np.array([[p.encode()] for p in prompts], dtype=object),
                    "SEED": np.array([[s] for s in seeds], dtype=np.int64),
                    "STEPS": np.full((2, 1), STEPS, np.int32),
                    "INIT_IMAGE": init,
                    "STRENGTH": np.full((2, 1), 0.75, np.float32),
                    "GUIDANCE_TOKEN": np.full((2, 1), token, np.bool_),
                }
            )

        with_token, without = served(True), served(False)
    sampler = Sampler(OrtComponents(onnx_dir), onnx_dir)
    expected = sampler.generate(prompts, [""] * 2, seeds, Settings(STEPS, 2.0, 0.75, True), init_images=init)
    assert np.array_equal(with_token, expected)  # the server runs exactly the in-process sampler
    assert np.abs(with_token.astype(int) - without.astype(int)).max() > 0  # and the token changes the images


def test_trained_with_token_but_served_without_encoder_is_refused_under_auto(finetuned, tmp_path):
    _, real, merged, _ = finetuned
    stripped = tmp_path / "bundle"
    shutil.copytree(merged, stripped)
    shutil.rmtree(stripped / "image_encoder")
    _unlist_image_encoder(stripped)
    info = check_bundle(stripped)
    assert info.trained_with_guidance_token and not info.has_image_encoder
    repo = write_repository(_export(stripped, tmp_path / "onnx"), tmp_path / "repo", placement="inprocess")
    job = dict(real=real, steps=2, quiet=True)
    with LocalServer(repo) as server:
        assert _served_flag(server.url) == "true" and not PipelineClient(server.url).card().has_image_encoder
        refused = rf("rf-client", *generate_args(tmp_path / "auto", server.url, **job))
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [
            "error: the served model was finetuned with the guidance token but is served without an image encoder:"
            " export its bundle with image_encoder/ in it, or pass --guidance-token off to generate without it"
        ]
        assert not (tmp_path / "auto" / "job.json").exists()
        allowed = rf("rf-client", *generate_args(tmp_path / "off", server.url, guidance_token="off", **job))
    assert allowed.returncode == 0, allowed.stderr
    rows = [json.loads(line) for line in (tmp_path / "off" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and not any(r["guidance_token"] for r in rows)
