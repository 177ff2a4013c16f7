"""TensorRT plans, tested where they can be without a GPU: profiles and names, the rebuild decision, which plan
a server picks, one-line refusals without a GPU or tensorrt, and the in-process runner's profile check. The test
marked `gpu` builds and serves real plans and skips, with the reason, on machines without one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from realfake.core.errors import UserError
from realfake.export import tensorrt_build as eng
from realfake.export.triton_repo import write_repository
from realfake.serving import tensorrt_plans as trt_plans

from conftest import H100, L4, TINY_META, fake_plans, rf

ROOT = Path(__file__).resolve().parent.parent


def test_profiles_double_the_guided_components():
    p = eng.component_profiles(TINY_META, [1, 4, 8, 16])
    # min: one image without guidance (guidance scale <= 1 sends no unconditional half); max: 16 images, 2 halves
    assert p["unet"].shapes["sample"] == ((1, 4, 16, 16), (16, 4, 16, 16), (32, 4, 16, 16))
    assert p["unet"].shapes["timestep"] == ((1,), (16,), (32,))
    assert p["unet"].shapes["encoder_hidden_states"][2] == (32, 77, 32)
    assert p["text_encoder"].shapes["input_ids"] == ((1, 77), (16, 77), (32, 77))
    assert p["vae_decoder"].shapes["latents"] == ((1, 4, 16, 16), (8, 4, 16, 16), (16, 4, 16, 16))
    assert p["vae_encoder"].shapes["image"][2] == (16, 3, 32, 32)
    assert p["image_encoder"].shapes["pixel_values"][0] == (1, 3, 32, 32)
    no_cfg = eng.component_profiles(TINY_META, [2], cfg=False)
    assert no_cfg["unet"].shapes["sample"] == ((2, 4, 16, 16),) * 3
    with pytest.raises(UserError):
        eng.component_profiles(TINY_META, [0, 4])


def test_plan_names_and_rebuild_decision(tmp_path):
    assert eng.plan_name("unet", H100, "10.13.0") == "unet.sm90.10.13.0.plan"
    profile = eng.component_profiles(TINY_META, [1, 8])["unet"]
    wanted = eng.plan_meta("unet", H100, "10.13.0", "abc", profile, "fp16")
    meta_path = tmp_path / "unet.sm90.10.13.0.json"
    assert eng.rebuild_reason(meta_path, wanted) == "no plan yet"
    meta_path.with_suffix(".plan").write_bytes(b"plan")
    meta_path.write_text(json.dumps(wanted))
    assert eng.rebuild_reason(meta_path, wanted) is None
    changes = {
        "compute_capability": ([8, 9], "GPU architecture changed"),
        "tensorrt_version": ("10.14.0", "TensorRT version changed"),
        "onnx_sha256": ("def", "ONNX graph changed"),
        "profiles": (eng.component_profiles(TINY_META, [1, 16])["unet"].to_json(), "optimisation profiles changed"),
        "precision": ("fp32", "precision changed"),
    }
    for key, (value, message) in changes.items():
        assert eng.rebuild_reason(meta_path, {**wanted, key: value}).startswith(message), key
    meta_path.write_text("{broken")
    assert eng.rebuild_reason(meta_path, wanted) == "metadata unreadable"
    assert wanted["max_images"] == 8 and trt_plans.profile_max_images("unet", wanted["profiles"]) == 8
    assert eng.timing_cache_name(H100) == "timing.sm90.cache" != eng.timing_cache_name(L4)


def test_plan_selection_refuses_stale_or_foreign_plans(tiny_onnx, tmp_path):
    comps = json.loads((tiny_onnx / "export.json").read_text())["components"]
    plans = fake_plans(tiny_onnx, tmp_path / "e")
    picked = trt_plans.select_plans(plans, tiny_onnx, comps, H100)
    assert {p.path.name for p in picked.values()} == {f"{c}.sm90.10.13.0.plan" for c in comps}
    assert {p.max_images for p in picked.values()} == {16}
    with pytest.raises(UserError, match=r"are for sm90, not this NVIDIA L4 \(sm89\)"):
        trt_plans.select_plans(plans, tiny_onnx, comps, L4)
    fake_plans(tiny_onnx, plans, (1, 8), gpu=L4)  # a second architecture in the same volume
    assert trt_plans.select_plans(plans, tiny_onnx, comps, L4)["unet"].path.name == "unet.sm89.10.13.0.plan"
    assert trt_plans.select_plans(plans, tiny_onnx, comps, H100)["unet"].max_images == 16
    stale = fake_plans(tiny_onnx, tmp_path / "stale", digest="0" * 64)  # built from an older unet.onnx
    with pytest.raises(UserError, match="built from another image_encoder.onnx"):
        trt_plans.select_plans(stale, tiny_onnx, comps)
    (plans / "unet.sm89.10.13.0.json").unlink()
    (plans / "unet.sm90.10.13.0.json").write_text("{broken")
    with pytest.raises(UserError, match="another unet.onnx \\(or lack their metadata\\)"):
        trt_plans.select_plans(plans, tiny_onnx, comps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_engines_without_gpu_is_one_clear_line(tiny_onnx, tmp_path):
    r = rf("rf-export", "engines", str(tiny_onnx), "--out", str(tmp_path / "e"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: rf-export engines needs an NVIDIA GPU (none is visible here); on CPU use --runtime python-ort"
    ]


@pytest.fixture
def no_tensorrt(monkeypatch):
    """`import tensorrt` fails, as on machines without it (also when it is installed here)."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_tensorrt_is_one_clear_line(no_tensorrt, tiny_onnx, tmp_path):
    from realfake.serving.tensorrt_components import TrtComponents

    with pytest.raises(UserError, match="needs the `tensorrt` Python package"):
        trt_plans.import_tensorrt()
    with pytest.raises(UserError, match="needs the `tensorrt` Python package"):
        TrtComponents.from_export(fake_plans(tiny_onnx, tmp_path / "e"), tiny_onnx)
    with pytest.raises(UserError, match="needs the `tensorrt` Python package"):
        TrtComponents.from_folder(fake_plans(tiny_onnx, tmp_path / "e"))
    with pytest.raises(UserError, match="no TensorRT plans in"):
        TrtComponents.from_folder(tmp_path)


def test_tensorrt_components_refuse_shapes_outside_the_profile():
    from realfake.serving.tensorrt_components import shape_outside_profile

    unet = eng.component_profiles(TINY_META, [1, 4, 8, 16])["unet"].to_json()
    assert shape_outside_profile("unet", "sample", (1, 4, 16, 16), unet) is None  # one image, no guidance
    assert shape_outside_profile("unet", "sample", (32, 4, 16, 16), unet) is None  # 16 images, both halves
    assert shape_outside_profile("unet", "sample", (34, 4, 16, 16), unet) == (
        "unet: sample of shape [34, 4, 16, 16] is outside the plan's profile (min [1, 4, 16, 16], max "
        "[32, 4, 16, 16]); rebuild the plans with `rf-export engines --batch-sizes` covering this batch"
    )
    assert "outside" in shape_outside_profile("unet", "sample", (2, 4, 32, 32), unet)  # another resolution
    assert "outside" in shape_outside_profile("unet", "sample", (2, 4, 16), unet)
    assert shape_outside_profile("unet", "latents", (2, 4, 16, 16), unet) == "unet has no input 'latents'"


@pytest.mark.gpu
def test_tensorrt_engines_serve_the_pipeline(tiny_onnx, tmp_path):
    """On a GPU: build fp16 plans, serve them natively, and compare images with the CPU path."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import PipelineClient

    results = eng.build_plans(tiny_onnx, tmp_path / "engines", [1, 4], precision="fp16")
    assert all(r.built for r in results)
    again = eng.build_plans(tiny_onnx, tmp_path / "engines", [1, 4], precision="fp16")
    assert not any(r.built for r in again)  # kept: same GPU, TensorRT, graphs, profiles
    repo = write_repository(tiny_onnx, tmp_path / "repo", runtime="tensorrt", engines=tmp_path / "engines")
    cpu_repo = write_repository(tiny_onnx, tmp_path / "cpu_repo")
    request = {
        "PROMPT": np.array([[b"photo of a cat"]] * 2, dtype=object),
        "SEED": np.array([[1], [2]]),
        "STEPS": np.full((2, 1), 10, np.int32),
    }
    unguided = {"PROMPT": request["PROMPT"][:1], "SEED": request["SEED"][:1], "STEPS": request["STEPS"][:1],
                "GUIDANCE_SCALE": np.ones((1, 1), np.float32)}  # fmt: skip
    inproc_repo = write_repository(
        tiny_onnx, tmp_path / "inproc", runtime="tensorrt", engines=tmp_path / "engines", placement="inprocess"
    )
    with LocalServer(inproc_repo) as server:  # the plans inside the pipeline instance, on its GPU
        inproc_images = PipelineClient(server.url).infer(request)
    with LocalServer(repo) as gpu_server, LocalServer(cpu_repo) as cpu_server:
        gpu_images = PipelineClient(gpu_server.url).infer(request)
        cpu_images = PipelineClient(cpu_server.url).infer(request)
        gpu_one = PipelineClient(gpu_server.url).infer(unguided)  # batch 1 without guidance: the profile's min
        cpu_one = PipelineClient(cpu_server.url).infer(unguided)
    assert np.abs(gpu_images.astype(int) - cpu_images.astype(int)).mean() < 4  # fp16 vs fp32
    assert np.abs(inproc_images.astype(int) - gpu_images.astype(int)).mean() < 1  # the same plans
    assert np.abs(gpu_one.astype(int) - cpu_one.astype(int)).mean() < 4

    from realfake.serving.sampler import Sampler, Settings
    from realfake.serving.tensorrt_components import TrtComponents

    inprocess = Sampler(TrtComponents.from_export(tmp_path / "engines", tiny_onnx), tiny_onnx)
    images = inprocess.generate(["photo of a cat"] * 2, [""] * 2, [1, 2], Settings(steps=10, guidance_scale=2.0))
    assert np.abs(images.astype(int) - cpu_images.astype(int)).mean() < 4
    with pytest.raises(ValueError, match="outside the plan's profile"):
        inprocess.generate(["a"] * 5, [""] * 5, list(range(5)), Settings(steps=2))  # plans built for 1..4 images
