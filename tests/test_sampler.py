"""The sampler against diffusers' own pipelines on the tiny bundle, and request batching, without Triton."""

import numpy as np
import pytest
import torch
from PIL import Image

from realfake.serving.batching import parse_request, run_batch
from realfake.serving.components import OrtComponents
from realfake.serving.sampler import Sampler, Settings

from conftest import count_sampler_calls

# ONNX Runtime and PyTorch kernels differ in float rounding; after uint8 quantisation a pixel may move by one.
MAX_PIXEL_DIFF = 2

PROMPTS = ["photo of tench, best quality", "photo of goldfish, a fish in a bowl, best quality", "photo of a cat"]
NEGATIVE = ["distorted, blurry"] * 3
SEEDS = [3, 1234567890123, 42]


@pytest.fixture(scope="module")
def sampler(tiny_onnx):
    return Sampler(OrtComponents(tiny_onnx), tiny_onnx)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_bundle):
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_bundle, local_files_only=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_text_to_image_matches_diffusers(sampler, diffusers_pipe):
    ours = sampler.generate(PROMPTS, NEGATIVE, SEEDS, Settings(steps=12, guidance_scale=2.0))
    ref = diffusers_pipe(
        PROMPTS,
        negative_prompt=NEGATIVE,
        num_inference_steps=12,
        guidance_scale=2.0,
        generator=_generators(SEEDS),
        output_type="np",
    ).images
    assert ours.shape == (3, 32, 32, 3) and ours.dtype == np.uint8
    assert _diff(ours, _uint8(ref)) <= MAX_PIXEL_DIFF
    assert ours.std() > 5  # not a flat image: the comparison means something


def test_img2img_latent_prior_matches_diffusers(sampler, diffusers_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    ours = sampler.generate(
        PROMPTS, NEGATIVE, SEEDS, Settings(steps=12, guidance_scale=2.0, strength=0.75), init_images=init
    )
    img2img = StableDiffusionImg2ImgPipeline(**diffusers_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    ref = img2img(
        PROMPTS,
        image=[Image.fromarray(x) for x in init],
        negative_prompt=NEGATIVE,
        strength=0.75,
        num_inference_steps=12,
        guidance_scale=2.0,
        generator=_generators(SEEDS),
        output_type="np",
    ).images
    assert _diff(ours, _uint8(ref)) <= MAX_PIXEL_DIFF


def test_no_guidance_path_matches_diffusers(sampler, diffusers_pipe):
    ours = sampler.generate(PROMPTS[:1], [""], SEEDS[:1], Settings(steps=5, guidance_scale=1.0))
    ref = diffusers_pipe(
        PROMPTS[:1], num_inference_steps=5, guidance_scale=1.0, generator=_generators(SEEDS[:1]), output_type="np"
    ).images
    assert _diff(ours, _uint8(ref)) <= MAX_PIXEL_DIFF


def test_seed_alone_determines_the_image(sampler):
    alone = sampler.generate(PROMPTS[1:2], NEGATIVE[1:2], SEEDS[1:2], Settings(steps=6))
    batched = sampler.generate(PROMPTS, NEGATIVE, SEEDS, Settings(steps=6))
    assert _diff(alone[0], batched[1]) <= MAX_PIXEL_DIFF
    other = sampler.generate(PROMPTS[1:2], NEGATIVE[1:2], [SEEDS[1] + 1], Settings(steps=6))
    assert _diff(alone[0], other[0]) > 10


def test_guidance_token_reaches_the_unet(sampler):
    """The image embedding replaces the last conditional token, so it changes the UNet's input context."""
    rng = np.random.default_rng(1)
    init = rng.integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    seen = []
    unet = sampler.components.unet

    def spy(sample, t, ctx):
        seen.append(ctx.clone())
        return unet(sample, t, ctx)

    sampler.components.unet = spy
    try:
        s = Settings(steps=2, guidance_scale=2.0, strength=0.75)
        sampler.generate(PROMPTS[:1], NEGATIVE[:1], SEEDS[:1], s, init_images=init)
        sampler.generate(PROMPTS[:1], NEGATIVE[:1], SEEDS[:1], Settings(2, 2.0, 0.75, True), init_images=init)
    finally:
        del sampler.components.unet
    plain, token = seen[0], seen[-1]
    assert torch.equal(plain[:, :-1], token[:, :-1])  # only the last token differs
    assert torch.equal(plain[0], token[0])  # the unconditional half keeps its text token
    assert not torch.allclose(plain[1, -1], token[1, -1])


def _request(n=2, **extra):
    arrays = {
        "PROMPT": np.array([[b"photo of a dog"]] * n, dtype=object),
        "SEED": np.arange(n, dtype=np.int64).reshape(n, 1),
        "STEPS": np.full((n, 1), 3, np.int32),
    }
    arrays.update(extra)
    return arrays


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"STEPS": np.zeros((2, 1), np.int32)}, "STEPS must be in"),
        ({"GUIDANCE_SCALE": np.full((2, 1), np.nan, np.float32)}, "GUIDANCE_SCALE"),
        ({"STRENGTH": np.full((2, 1), 0.5, np.float32)}, "need INIT_IMAGE"),
        ({"INIT_IMAGE": np.zeros((2, 16, 16, 3), np.uint8)}, "INIT_IMAGE must be uint8 \\[2,32,32,3\\]"),
        ({"SEED": np.full((2, 1), -1, np.int64)}, "SEED must be >= 0"),
    ],
)
def test_bad_requests_are_rejected(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_request(0, _request(**extra), image_size=32)


def test_run_batch_merges_requests_and_isolates_errors(sampler):
    calls = count_sampler_calls(sampler)
    try:
        results = run_batch(sampler, [_request(2), _request(3, STEPS=np.zeros((3, 1), np.int32)), _request(1)])
    finally:
        del sampler.generate
    assert [r.shape[0] if isinstance(r, np.ndarray) else "err" for r in results] == [2, "err", 1]
    assert isinstance(results[1], ValueError)
    assert calls == [3]  # the two valid requests were sampled as one batch
    assert np.array_equal(results[0][0], results[2][0])  # same prompt, same seed 0 -> same image
