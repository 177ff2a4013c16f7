"""A batch that runs out of memory is halved down to single images, and gives the images an unsplit run gives.

The real sampler on the tiny ONNX export, behind components that refuse batches above a limit the way a full
GPU (or host) does; no Triton.
"""

import numpy as np
import pytest
import torch

from realfake.serving.batching import OOM_STATS, is_out_of_memory, run_batch
from realfake.serving.components import OrtComponents
from realfake.serving.sampler import Sampler

from conftest import count_sampler_calls

CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)"


class Refusing:
    """OrtComponents whose `name` component raises `error()` when its batch dimension is above `limit`."""

    def __init__(self, inner: OrtComponents, name: str, limit: int, error):
        self.inner, self.name, self.limit, self.error = inner, name, limit, error
        self.device = inner.device
        self.calls: list[int] = []  # batch sizes the refusing component was called with

    def __getattr__(self, attr):
        component = getattr(self.inner, attr)
        if attr != self.name:
            return component

        def call(first, *rest):
            self.calls.append(int(first.shape[0]))
            if first.shape[0] > self.limit:
                raise self.error()
            return component(first, *rest)

        return call


@pytest.fixture(scope="module")
def ort(tiny_onnx):
    return OrtComponents(tiny_onnx)


def _requests():
    """Three requests, six images with the same settings, so they form one group (one batch when nothing fails)."""

    def request(prompts, seeds):
        n = len(prompts)
        return {
            "PROMPT": np.array([[p.encode()] for p in prompts], dtype=object),
            "NEGATIVE_PROMPT": np.array([[b"blurry"]] * n, dtype=object),
            "SEED": np.array(seeds, np.int64).reshape(n, 1),
            "STEPS": np.full((n, 1), 3, np.int32),
            "GUIDANCE_SCALE": np.full((n, 1), 2.0, np.float32),
        }

    return [
        request(["photo of a dog", "photo of a cat"], [0, 1]),
        request(["photo of tench", "photo of goldfish", "a fish in a bowl"], [7, 1234567890123, 42]),
        request(["photo of a truck"], [5]),
    ]


def _run(tiny_onnx, components):
    """run_batch on a fresh sampler over `components`: results, sampler calls (batch sizes), splits made."""
    sampler = Sampler(components, tiny_onnx)
    calls = count_sampler_calls(sampler)
    before = OOM_STATS.splits
    results = run_batch(sampler, _requests())
    return results, calls, OOM_STATS.splits - before


@pytest.fixture(scope="module")
def unsplit(tiny_onnx, ort):
    results, calls, splits = _run(tiny_onnx, ort)
    assert calls == [6] and splits == 0
    assert [r.shape for r in results] == [(2, 32, 32, 3), (3, 32, 32, 3), (1, 32, 32, 3)]
    return results


@pytest.mark.parametrize(
    "name, limit, error",
    [
        # the UNet sees both guidance halves: 4 rows are 2 images
        ("unet", 4, lambda: RuntimeError(CUDA_OOM)),
        ("vae_decoder", 2, MemoryError),
        ("unet", 4, lambda: RuntimeError("[ONNXRuntimeError] : 6 : Failed to allocate memory for buffer")),
        ("vae_decoder", 2, lambda: torch.cuda.OutOfMemoryError(CUDA_OOM)),
    ],
)
def test_out_of_memory_splits_until_it_fits_and_gives_the_same_images(tiny_onnx, ort, unsplit, name, limit, error):
    refusing = Refusing(ort, name, limit, error)
    results, calls, splits = _run(tiny_onnx, refusing)
    # 6 fails -> 3 fails -> 2 + 1 fit; the other 3 likewise
    assert calls == [6, 3, 2, 1, 3, 2, 1]
    assert splits == 3
    assert not any(isinstance(r, Exception) for r in results), results
    for ours, ref in zip(results, unsplit, strict=True):
        assert ours.shape == ref.shape
        assert np.array_equal(ours, ref)  # bit for bit: each image's noise comes from its own seed
    assert max(refusing.calls) > limit  # the component did refuse


def test_images_that_do_not_fit_alone_fail_with_an_error_saying_so(tiny_onnx, ort):
    refusing = Refusing(ort, "vae_decoder", 0, MemoryError)  # refuses even one image
    failed_before = OOM_STATS.failed_images
    results, calls, splits = _run(tiny_onnx, refusing)
    assert OOM_STATS.failed_images - failed_before == 6
    assert calls == [6, 3, 2, 1, 1, 1, 3, 2, 1, 1, 1]  # halved down to each of the 6 images
    assert splits == 5 and refusing.calls == calls
    assert all(isinstance(r, MemoryError) and "out of memory" in str(r) for r in results), results


def test_only_the_requests_of_an_image_that_does_not_fit_alone_fail(tiny_onnx, ort, unsplit):
    """The decoder runs out of memory whenever the call holds one image (seed 7, in request 1)."""
    sampler = Sampler(ort, tiny_onnx)
    generate = sampler.generate

    def generate_without_seed_7(prompts, negatives, seeds, *a, **k):
        if 7 in seeds:
            raise RuntimeError("CUDA failure 2: CUDA_ERROR_OUT_OF_MEMORY ; GPU=0")
        return generate(prompts, negatives, seeds, *a, **k)

    sampler.generate = generate_without_seed_7
    results = run_batch(sampler, _requests())
    assert isinstance(results[1], MemoryError) and "CUDA_ERROR_OUT_OF_MEMORY" in str(results[1])
    assert np.array_equal(results[0], unsplit[0]) and np.array_equal(results[2], unsplit[2])


def test_other_errors_are_not_split(tiny_onnx, ort):
    refusing = Refusing(ort, "unet", 0, lambda: RuntimeError("Got invalid dimensions for input: sample"))
    results, calls, splits = _run(tiny_onnx, refusing)
    assert calls == [6] and refusing.calls == [12] and splits == 0
    assert all(isinstance(r, RuntimeError) and "invalid dimensions" in str(r) for r in results)
    assert results[0] is results[1] is results[2]


def _raised_from(inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as exc:
            raise RuntimeError("pipeline component call failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "exc, oom",
    [
        (MemoryError(), True),
        (torch.cuda.OutOfMemoryError("x"), True),
        (RuntimeError(CUDA_OOM), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA failure 2: CUDA_ERROR_OUT_OF_MEMORY ; GPU=0"), True),
        (
            RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"),
            True,
        ),
        (RuntimeError("std::bad_alloc"), True),
        (_raised_from(MemoryError()), True),
        (ValueError("STEPS must be in 1..1000, got 0"), False),
        (RuntimeError("Got invalid dimensions for input: sample"), False),
        (_raised_from(KeyError("unet")), False),
    ],
)
def test_is_out_of_memory(exc, oom):
    assert is_out_of_memory(exc) is oom


def test_vae_in_slices_gives_the_unsliced_images(tiny_onnx, ort, unsplit):
    """vae_slice=1 (CPU servers): each VAE call sees one image, whatever the batch, and the images are those of
    whole-batch VAE calls within 1/255 (only the kernels' batch differs)."""
    watched = Refusing(ort, "vae_decoder", 1, MemoryError)  # any call above one image would fail the test
    sampler = Sampler(watched, tiny_onnx, vae_slice=1)
    results = run_batch(sampler, _requests())
    assert watched.calls == [1] * 6
    for got, want in zip(results, unsplit, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_a_batch_over_the_budget_is_split_before_it_runs(tiny_onnx, ort, unsplit):
    """The pipeline's max images per run (from the memory budget) splits a batch before any call: no failed
    attempt, and the same images as one call within 2/255."""
    sampler = Sampler(ort, tiny_onnx)
    calls = count_sampler_calls(sampler)
    before = OOM_STATS.splits
    results = run_batch(sampler, _requests(), max_batch=4)
    assert calls == [4, 2] and OOM_STATS.splits == before
    for got, want in zip(results, unsplit, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_repository_max_images_from_a_memory_budget(tiny_onnx, tmp_path):
    from realfake.core.errors import UserError
    from realfake.export.memory import SAFETY, server_memory
    from realfake.export.triton_repo import write_repository
    from realfake.serving.pipeline_params import PipelineParams

    from conftest import parse_config

    def params(repo):
        config = parse_config(repo / "pipeline" / "config.pbtxt")
        return PipelineParams.from_parameters({k: v.string_value for k, v in config.parameters.items()})

    model = server_memory(tiny_onnx, processes=6)  # bls: five component processes and the pipeline
    assert model.base_bytes > 0 and model.per_image_bytes > 0 and model.at(3) > model.at(2)
    for images in (1, 3, 7):
        budget = (model.at(images) + 0.5 * model.per_image_bytes) / SAFETY
        p = params(write_repository(tiny_onnx, tmp_path / f"b{images}", memory_budget_gb=budget / 1e9))
        assert (p.max_images_per_run, p.vae_slice) == (images, 1)
    with pytest.raises(UserError, match=r"needs about .* GB to sample one image .* raise --memory-budget"):
        write_repository(tiny_onnx, tmp_path / "tiny", memory_budget_gb=model.base_bytes / 2e9)
    roomy = params(write_repository(tiny_onnx, tmp_path / "roomy", memory_budget_gb=1e4, max_batch=16))
    assert roomy.max_images_per_run == 16 and roomy.memory_budget_gb == 1e4  # never above the batcher's bound
    gpu = params(write_repository(tiny_onnx, tmp_path / "gpu", runtime="onnxruntime"))
    assert (gpu.max_images_per_run, gpu.vae_slice) == (0, 0)  # GPU servers: their own OOM halving, whole batches

    # a server killed mid-work says what the repository allows and what to change
    from types import SimpleNamespace

    from realfake.client.server import LocalServer

    server = LocalServer(tmp_path / "b3")
    server.process = SimpleNamespace(returncode=-9)
    reason = server.exit_reason()
    assert reason.startswith("Triton exited with code -9 (killed by a signal): most often the kernel's out-of-memory")
    assert "samples at most 3 images per call for a memory budget of" in reason and "--memory-budget" in reason
    server.process = SimpleNamespace(returncode=1)
    assert server.exit_reason() == "Triton exited with code 1"


def test_sd15_memory_model_picks_the_batch_that_fits():
    """The model as measured at SD-1.5 shapes (8.66 GB ready, 8.19 GB per image of a sampler call): a 24 GB
    machine samples one image a call (two measured 23.06 GB, within reach of the OOM killer), 32 GB two."""
    from realfake.export.memory import ServerMemory

    sd15 = ServerMemory(base_bytes=8.66e9, per_image_bytes=8.19e9)
    assert [sd15.images_within(gb * 1e9) for gb in (16, 24, 25.3, 32, 64)] == [0, 1, 1, 2, 5]


def test_the_budget_default_is_the_containers_limit(tmp_path):
    from realfake.export.memory import machine_memory

    physical = machine_memory(limits=())
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")  # no limit (cgroup v2 says so in words)
    v1.write_text(f"{48 * 2**30}\n")
    assert machine_memory(limits=(v2,)) == physical
    assert machine_memory(limits=(tmp_path / "absent", v1)) == min(physical, 48 * 2**30)
    v2.write_text(f"{8 * 2**30}\n")
    assert machine_memory(limits=(v2, v1)) == 8 * 2**30


class Corrupting:
    """OrtComponents whose VAE decoder output is NaN for the image of seed 7 and all -1 (black) for seed 5."""

    def __init__(self, inner: OrtComponents):
        self.inner, self.device = inner, inner.device
        self.seeds: list[int] = []

    def __getattr__(self, attr):
        component = getattr(self.inner, attr)
        if attr != "vae_decoder":
            return component

        def call(latents):
            out = component(latents).clone()
            for k, seed in enumerate(self.seeds):
                if seed == 7:
                    out[k, :, 3, 3] = float("nan")
                elif seed == 5:
                    out[k] = -1.0
            return out

        return call


def test_a_non_finite_or_constant_image_fails_its_request_not_the_others(tiny_onnx, ort, unsplit):
    """to_uint8 clamps NaN into a valid-looking pixel: without the check both would be written and listed."""
    corrupting = Corrupting(ort)
    sampler = Sampler(corrupting, tiny_onnx)
    generate = sampler.generate

    def seeing_seeds(prompts, negatives, seeds, *a, **k):
        corrupting.seeds = list(seeds)
        return generate(prompts, negatives, seeds, *a, **k)

    sampler.generate = seeing_seeds
    results = run_batch(sampler, _requests())
    assert isinstance(results[1], ValueError) and "seed 7" in str(results[1]) and "NaN or inf" in str(results[1])
    assert isinstance(results[2], ValueError) and "seed 5" in str(results[2]) and "constant" in str(results[2])
    assert np.array_equal(results[0], unsplit[0])  # the sound request of the same batch is served as before
