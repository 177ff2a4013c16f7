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
from realfake.serving.tensorrt_plans import GpuInfo

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
    assert eng.plan_name("unet", H100, "10.13.0") == "unet.sm90.h100-80gb-hbm3.10.13.0.plan"
    assert GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0)).model == "a100-sxm4-80gb" and L4.model == "l4"
    profile = eng.component_profiles(TINY_META, [1, 8])["unet"]
    wanted = eng.plan_meta("unet", H100, "10.13.0", "abc", profile, "fp16")
    meta_path = tmp_path / "unet.sm90.h100-80gb-hbm3.10.13.0.json"
    assert eng.rebuild_reason(meta_path, wanted) == "no plan yet"
    meta_path.with_suffix(".plan").write_bytes(b"plan")
    meta_path.write_text(json.dumps(wanted))
    assert eng.rebuild_reason(meta_path, wanted) is None
    changes = {
        "gpu_name": ("NVIDIA H100 PCIe", "GPU model changed"),
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
    assert eng.timing_cache_name(H100) == "timing.sm90.h100-80gb-hbm3.cache" != eng.timing_cache_name(L4)


def test_plan_selection_refuses_stale_or_foreign_plans(tiny_onnx, tmp_path):
    comps = json.loads((tiny_onnx / "export.json").read_text())["components"]
    plans = fake_plans(tiny_onnx, tmp_path / "e")
    picked = trt_plans.select_plans(plans, tiny_onnx, comps, H100)
    assert {p.path.name for p in picked.values()} == {f"{c}.sm90.h100-80gb-hbm3.10.13.0.plan" for c in comps}
    assert {p.max_images for p in picked.values()} == {16}
    with pytest.raises(UserError, match=r"are for NVIDIA H100 80GB HBM3 \(sm90\), not this NVIDIA L4 \(sm89\)"):
        trt_plans.select_plans(plans, tiny_onnx, comps, L4)
    fake_plans(tiny_onnx, plans, (1, 8), gpu=L4)  # a second architecture in the same volume
    assert trt_plans.select_plans(plans, tiny_onnx, comps, L4)["unet"].path.name == "unet.sm89.l4.10.13.0.plan"
    assert trt_plans.select_plans(plans, tiny_onnx, comps, H100)["unet"].max_images == 16
    stale = fake_plans(tiny_onnx, tmp_path / "stale", digest="0" * 64)  # built from an older unet.onnx
    with pytest.raises(UserError, match="built from another image_encoder.onnx"):
        trt_plans.select_plans(stale, tiny_onnx, comps)
    (plans / "unet.sm89.l4.10.13.0.json").unlink()
    (plans / "unet.sm90.h100-80gb-hbm3.10.13.0.json").write_text("{broken")
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
    for r in results:  # every new plan compared with ONNX Runtime on the same inputs, within the fp16 tolerance
        assert r.parity["passed"] and r.parity["rel_rms_error"] <= eng.PARITY_TOLERANCE["fp16"], (r.component, r.parity)
        print(f"parity {r.component}: {eng.parity_line(Path(r.plan).name, r.parity)}")
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


def test_parity_verdict_and_its_tolerances():
    """The comparison's verdict: within the precision's stated tolerance passes; drift, NaN or another shape fails."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert eng.PARITY_TOLERANCE == {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
    half = eng.compare_outputs(ref, ref.astype(np.float16), "fp16")  # fp16 rounding alone: ~3e-4
    assert half["passed"] and 0 < half["rel_rms_error"] < 1e-3 and half["max_abs_error"] > 0
    assert not eng.compare_outputs(ref, ref.astype(np.float16).astype(np.float32) * 1.01 + 0.02, "fp32")["passed"]
    drift = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)  # 5 % relative RMS
    assert eng.compare_outputs(drift, ref, "bf16")["passed"] and not eng.compare_outputs(drift, ref, "fp16")["passed"]
    broken = ref.copy()
    broken[0, 0, 0, 0] = np.inf
    report = eng.compare_outputs(ref, broken, "fp16")
    assert not report["passed"] and "non-finite" in report["reason"]
    assert not eng.compare_outputs(ref, ref[:1], "fp16")["passed"]
    assert "FAILED: non-finite" in eng.parity_line("unet.plan", report)


def test_parity_runs_onnx_runtime_on_the_profiles_inputs(tiny_onnx):
    """check_parity feeds the graph and the plan the same seeded inputs of the profile's smallest shapes (token ids
    and timesteps in range, in the graph's types); a runner that equals ONNX Runtime passes, one that drifts fails."""
    import onnxruntime as ort

    meta = json.loads((tiny_onnx / "export.json").read_text())
    profiles = eng.component_profiles(meta, [1, 4])
    for component in ("text_encoder", "unet", "vae_decoder"):
        session = ort.InferenceSession(str(tiny_onnx / f"{component}.onnx"), providers=["CPUExecutionProvider"])
        seen = {}

        def same(inputs, session=session, seen=seen):
            seen.update(inputs)
            return session.run(None, inputs)[0]

        report = eng.check_parity(tiny_onnx / f"{component}.onnx", profiles[component], "fp16", same)
        assert report["passed"] and report["rel_rms_error"] == 0.0, (component, report)
        assert report["inputs"] == {k: list(v[0]) for k, v in profiles[component].shapes.items()}
        types = {i.name: i.type for i in session.get_inputs()}
        assert all(str(seen[k].dtype) in types[k] or types[k] == "tensor(float)" for k in seen), (seen, types)
        again = eng.parity_inputs(profiles[component], types)
        assert all(np.array_equal(again[k], seen[k]) for k in seen)  # seeded: the same inputs each time
        if "input_ids" in seen:
            assert seen["input_ids"].min() >= 0 and seen["input_ids"].max() < 1000

    def drifting(inputs):
        out = ort.InferenceSession(str(tiny_onnx / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, inputs)
        return out[0] * 1.1

    report = eng.check_parity(tiny_onnx / "unet.onnx", profiles["unet"], "fp16", drifting)
    assert not report["passed"] and report["rel_rms_error"] == pytest.approx(0.1, rel=1e-3)


def test_a_plan_that_failed_parity_is_never_served(tiny_onnx, tmp_path):
    comps = json.loads((tiny_onnx / "export.json").read_text())["components"]
    plans = fake_plans(tiny_onnx, tmp_path / "e")
    meta_path = plans / "unet.sm90.h100-80gb-hbm3.10.13.0.json"
    meta = json.loads(meta_path.read_text())
    meta["parity"] = {"passed": False, "rel_rms_error": 0.31, "max_abs_error": 4.0, "tolerance": 0.02}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"unet .* failed its comparison with ONNX Runtime \(relative RMS error 0.31"):
        trt_plans.select_plans(plans, tiny_onnx, comps, H100)
    assert eng.rebuild_reason(meta_path, meta) == "its last build failed the comparison with ONNX Runtime"
    # an A30 shares the A100's architecture (sm80) but not its plans; another TensorRT cannot load them
    a100, a30 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0)), GpuInfo("NVIDIA A30", (8, 0))
    ampere = fake_plans(tiny_onnx, tmp_path / "ampere", gpu=a100)
    assert trt_plans.select_plans(ampere, tiny_onnx, comps, a100)["unet"].path.name.startswith("unet.sm80.a100-sxm4")
    with pytest.raises(UserError, match=r"are for NVIDIA A100-SXM4-80GB \(sm80\), not this NVIDIA A30 \(sm80\)"):
        trt_plans.select_plans(ampere, tiny_onnx, comps, a30)
    with pytest.raises(UserError, match="built with TensorRT 10.13.0; this server has 10.9.0, which cannot load them"):
        trt_plans.select_plans(ampere, tiny_onnx, comps, a100, tensorrt="10.9.0")
