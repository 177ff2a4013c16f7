"""The GPU production path, tested where it can be without a GPU: engine profiles and names, the rebuild
decision, repository configs per runtime (parsed back), the PyTorch runtime's parity on CPU, the Dockerfile.
Tests marked `gpu` build and serve real TensorRT engines and skip, with the reason, on machines without one."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from realfake.core.errors import UserError
from realfake.export import tensorrt_build as eng
from realfake.export.triton_repo import write_repository
from realfake.serving import tensorrt_plans as trt_plans

from conftest import rf

ROOT = Path(__file__).resolve().parent.parent
META = {
    "image_size": 32,
    "vae_scale_factor": 2,
    "latent_channels": 4,
    "text_hidden_size": 32,
    "image_encoder_size": 32,
    "components": ["text_encoder", "unet", "vae_decoder", "vae_encoder", "image_encoder"],
}
H100 = trt_plans.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
L4 = trt_plans.GpuInfo("NVIDIA L4", (8, 9))


def _fake_plans(onnx_dir: Path, folder: Path, batch_sizes=(1, 4, 8, 16), gpu=H100, digest=None) -> Path:
    """Plan files with the metadata `rf-export engines` writes (the plan bytes are not an engine)."""
    from realfake.serving.export_files import graph_sha256

    folder.mkdir(exist_ok=True)
    meta = json.loads((onnx_dir / "export.json").read_text())
    for name, profile in eng.component_profiles(meta, list(batch_sizes)).items():
        plan = folder / eng.plan_name(name, gpu, "10.13.0")
        plan.write_bytes(b"plan " + name.encode())
        wanted = eng.plan_meta(name, gpu, "10.13.0", digest or graph_sha256(onnx_dir / f"{name}.onnx"), profile, True)
        plan.with_suffix(".json").write_text(json.dumps(wanted))
    return folder


def test_profiles_double_the_guided_components():
    p = eng.component_profiles(META, [1, 4, 8, 16])
    # min: one image without guidance (guidance scale <= 1 sends no unconditional half); max: 16 images, 2 halves
    assert p["unet"].shapes["sample"] == ((1, 4, 16, 16), (16, 4, 16, 16), (32, 4, 16, 16))
    assert p["unet"].shapes["timestep"] == ((1,), (16,), (32,))
    assert p["unet"].shapes["encoder_hidden_states"][2] == (32, 77, 32)
    assert p["text_encoder"].shapes["input_ids"] == ((1, 77), (16, 77), (32, 77))
    assert p["vae_decoder"].shapes["latents"] == ((1, 4, 16, 16), (8, 4, 16, 16), (16, 4, 16, 16))
    assert p["vae_encoder"].shapes["image"][2] == (16, 3, 32, 32)
    assert p["image_encoder"].shapes["pixel_values"][0] == (1, 3, 32, 32)
    no_cfg = eng.component_profiles(META, [2], cfg=False)
    assert no_cfg["unet"].shapes["sample"] == ((2, 4, 16, 16),) * 3
    with pytest.raises(UserError):
        eng.component_profiles(META, [0, 4])


def test_plan_names_and_rebuild_decision(tmp_path):
    assert eng.plan_name("unet", H100, "10.13.0") == "unet.sm90.10.13.0.plan"
    profile = eng.component_profiles(META, [1, 8])["unet"]
    wanted = eng.plan_meta("unet", H100, "10.13.0", "abc", profile, True)
    meta_path = tmp_path / "unet.sm90.10.13.0.json"
    assert eng.rebuild_reason(meta_path, wanted) == "no plan yet"
    meta_path.with_suffix(".plan").write_bytes(b"plan")
    meta_path.write_text(json.dumps(wanted))
    assert eng.rebuild_reason(meta_path, wanted) is None
    changes = {
        "compute_capability": ([8, 9], "GPU architecture changed"),
        "tensorrt_version": ("10.14.0", "TensorRT version changed"),
        "onnx_sha256": ("def", "ONNX graph changed"),
        "profiles": (eng.component_profiles(META, [1, 16])["unet"].to_json(), "optimisation profiles changed"),
        "fp16": (False, "precision changed"),
    }
    for key, (value, message) in changes.items():
        assert eng.rebuild_reason(meta_path, {**wanted, key: value}).startswith(message), key
    meta_path.write_text("{broken")
    assert eng.rebuild_reason(meta_path, wanted) == "metadata unreadable"
    assert wanted["max_images"] == 8 and trt_plans.profile_max_images("unet", wanted["profiles"]) == 8
    assert eng.timing_cache_name(H100) == "timing.sm90.cache" != eng.timing_cache_name(L4)


def test_plan_selection_refuses_stale_or_foreign_plans(tiny_onnx, tmp_path):
    comps = json.loads((tiny_onnx / "export.json").read_text())["components"]
    plans = _fake_plans(tiny_onnx, tmp_path / "e")
    picked = trt_plans.select_plans(plans, tiny_onnx, comps, H100)
    assert {p.path.name for p in picked.values()} == {f"{c}.sm90.10.13.0.plan" for c in comps}
    assert {p.max_images for p in picked.values()} == {16}
    with pytest.raises(UserError, match=r"are for sm90, not this NVIDIA L4 \(sm89\)"):
        trt_plans.select_plans(plans, tiny_onnx, comps, L4)
    _fake_plans(tiny_onnx, plans, (1, 8), gpu=L4)  # a second architecture in the same volume
    assert trt_plans.select_plans(plans, tiny_onnx, comps, L4)["unet"].path.name == "unet.sm89.10.13.0.plan"
    assert trt_plans.select_plans(plans, tiny_onnx, comps, H100)["unet"].max_images == 16
    stale = _fake_plans(tiny_onnx, tmp_path / "stale", digest="0" * 64)  # built from an older unet.onnx
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
        TrtComponents.from_export(_fake_plans(tiny_onnx, tmp_path / "e"), tiny_onnx)
    with pytest.raises(UserError, match="needs the `tensorrt` Python package"):
        TrtComponents.from_folder(_fake_plans(tiny_onnx, tmp_path / "e"))
    with pytest.raises(UserError, match="no TensorRT plans in"):
        TrtComponents.from_folder(tmp_path)


def test_tensorrt_components_refuse_shapes_outside_the_profile():
    from realfake.serving.tensorrt_components import shape_outside_profile

    unet = eng.component_profiles(META, [1, 4, 8, 16])["unet"].to_json()
    assert shape_outside_profile("unet", "sample", (1, 4, 16, 16), unet) is None  # one image, no guidance
    assert shape_outside_profile("unet", "sample", (32, 4, 16, 16), unet) is None  # 16 images, both halves
    assert shape_outside_profile("unet", "sample", (34, 4, 16, 16), unet) == (
        "unet: sample of shape [34, 4, 16, 16] is outside the plan's profile (min [1, 4, 16, 16], max "
        "[32, 4, 16, 16]); rebuild the plans with `rf-export engines --batch-sizes` covering this batch"
    )
    assert "outside" in shape_outside_profile("unet", "sample", (2, 4, 32, 32), unet)  # another resolution
    assert "outside" in shape_outside_profile("unet", "sample", (2, 4, 16), unet)
    assert shape_outside_profile("unet", "latents", (2, 4, 16, 16), unet) == "unet has no input 'latents'"


def _config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_per_runtime(tiny_onnx, tiny_bundle, tmp_path):
    onnx_rt = write_repository(tiny_onnx, tmp_path / "ort", runtime="onnxruntime")
    unet = _config(onnx_rt / "unet" / "config.pbtxt")
    assert (
        unet.platform == "onnxruntime_onnx"
        and unet.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    )
    assert (onnx_rt / "unet" / "1" / "model.onnx").is_file() and not (onnx_rt / "unet" / "1" / "model.py").exists()
    pipe = _config(onnx_rt / "pipeline" / "config.pbtxt")
    assert list(pipe.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert pipe.parameters["engine"].string_value == "onnxruntime-cuda fp32, unipc"
    assert pipe.parameters["device"].string_value == "cuda" and pipe.parameters["components"].string_value == "bls"

    plans = _fake_plans(tiny_onnx, tmp_path / "engines")
    trt = write_repository(tiny_onnx, tmp_path / "trt", runtime="tensorrt", engines=plans)
    vae = _config(trt / "vae_decoder" / "config.pbtxt")
    assert vae.platform == "tensorrt_plan" and vae.default_model_filename == "model.plan"
    assert [list(i.dims) for i in vae.input] == [[-1, 4, -1, -1]] and vae.max_batch_size == 0
    assert (trt / "vae_decoder" / "1" / "model.plan").read_bytes() == b"plan vae_decoder"
    pipe = _config(trt / "pipeline" / "config.pbtxt")
    assert pipe.max_batch_size == 16 and list(pipe.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    engine = pipe.parameters["engine"].string_value
    assert re.fullmatch(r"tensorrt-10\.13\.0 sm90 fp16 [0-9a-f]{12}, unipc", engine), engine
    again = tmp_path / "engines_again"
    shutil.copytree(plans, again)
    (again / "unet.sm90.10.13.0.plan").write_bytes(b"plan unet, built again")  # two TensorRT builds differ
    rebuilt = write_repository(tiny_onnx, tmp_path / "trt_re", runtime="tensorrt", engines=again)
    assert _config(rebuilt / "pipeline" / "config.pbtxt").parameters["engine"].string_value != engine
    smaller = _config(
        write_repository(tiny_onnx, tmp_path / "trt8", runtime="tensorrt", engines=plans, max_batch=8)
        / "pipeline"
        / "config.pbtxt"
    )
    assert smaller.max_batch_size == 8 and list(smaller.dynamic_batching.preferred_batch_size) == [4, 8]
    with pytest.raises(UserError, match=r"--max-batch 32 is larger than the TensorRT plans' profile allows \(16"):
        write_repository(tiny_onnx, tmp_path / "trt32", runtime="tensorrt", engines=plans, max_batch=32)
    inproc = write_repository(tiny_onnx, tmp_path / "trt_in", runtime="tensorrt", engines=plans, components="inprocess")
    assert sorted(p.name for p in inproc.iterdir()) == ["pipeline"]
    pipe = _config(inproc / "pipeline" / "config.pbtxt")
    assert pipe.parameters["components"].string_value == "tensorrt" and pipe.max_batch_size == 16
    assert pipe.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    held = inproc / "pipeline" / "1" / "model_files" / "engines"
    assert sorted(p.name for p in held.iterdir()) == sorted(
        f"{c}.{x}" for c in META["components"] for x in ("json", "plan")
    )
    assert (held / "unet.plan").read_bytes() == b"plan unet"
    assert json.loads((held / "unet.json").read_text())["max_images"] == 16
    with pytest.raises(UserError, match="no TensorRT plan for unet"):
        (plans / "unet.sm90.10.13.0.plan").unlink()
        write_repository(tiny_onnx, tmp_path / "trt2", runtime="tensorrt", engines=plans)

    torch_repo = write_repository(tiny_onnx, tmp_path / "pt", runtime="pytorch", bundle=tiny_bundle)
    assert sorted(p.name for p in torch_repo.iterdir()) == ["pipeline"]
    params = _config(torch_repo / "pipeline" / "config.pbtxt").parameters
    assert (
        params["components"].string_value == "pytorch" and Path(params["bundle"].string_value) == tiny_bundle.resolve()
    )
    assert params["engine"].string_value == "pytorch-cuda fp16, unipc"
    with pytest.raises(UserError, match="needs --bundle"):
        write_repository(tiny_onnx, tmp_path / "pt2", runtime="pytorch")
    with pytest.raises(UserError, match="unknown runtime"):
        write_repository(tiny_onnx, tmp_path / "x", runtime="tvm")


def test_each_gpu_instance_of_the_pipeline_uses_its_own_gpu():
    from realfake.serving.components import instance_device

    assert instance_device("cuda", "GPU", "3") == "cuda:3"  # instance_group KIND_GPU: one instance per GPU
    assert instance_device("cuda", "GPU", 0) == "cuda:0"
    assert instance_device("cuda", "CPU", "0") == "cuda"
    assert instance_device("cpu", "CPU", "0") == "cpu"
    assert instance_device("cpu", "GPU", "1") == "cpu"  # an explicit CPU pipeline stays on the CPU


def test_onnxruntime_io_binding_matches_the_numpy_path(tiny_onnx):
    """The GPU path of OrtComponents (inputs and outputs bound by address) run on the CPU: every component's
    output shape is predicted right and the values equal the plain run's, and so do the images."""
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings

    plain, bound = OrtComponents(tiny_onnx), OrtComponents(tiny_onnx, io_binding=True)
    assert not plain.io_binding and bound.io_binding
    g = torch.Generator().manual_seed(0)
    calls = {
        "text_encoder": (torch.randint(0, 1000, (3, 77), generator=g),),
        "unet": (torch.randn(3, 4, 16, 16, generator=g), torch.full((3,), 500.0), torch.randn(3, 77, 32, generator=g)),
        "vae_decoder": (torch.randn(3, 4, 16, 16, generator=g),),
        "vae_encoder": (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,),
        "image_encoder": (torch.randn(3, 3, 32, 32, generator=g),),
    }
    for name, args in calls.items():
        expected = plain._run(name, *args)
        assert bound.output_shape(name, args) == tuple(expected.shape), name
        assert torch.equal(bound._run(name, *args), expected), name
    init = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    args = (["photo of a cat", "photo of a ship"], ["blurry"] * 2, [5, 6], Settings(6, 2.0, 0.75, True), init)
    assert np.array_equal(Sampler(bound, tiny_onnx).generate(*args), Sampler(plain, tiny_onnx).generate(*args))
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(RuntimeError, match="needs the onnxruntime-gpu package"):
            OrtComponents(tiny_onnx, device="cuda")


def test_pytorch_runtime_matches_onnxruntime_on_cpu(tiny_bundle, tiny_onnx):
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings
    from realfake.serving.torch_components import TorchComponents

    prompts, negatives, seeds = ["photo of a cat", "photo of a ship"], ["blurry"] * 2, [1, 2]
    init = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    settings = Settings(steps=8, guidance_scale=2.0, strength=0.75, guidance_token=True)
    ort_images = Sampler(OrtComponents(tiny_onnx), tiny_onnx).generate(prompts, negatives, seeds, settings, init)
    torch_images = Sampler(TorchComponents(tiny_bundle, "cpu"), tiny_onnx).generate(
        prompts, negatives, seeds, settings, init
    )
    assert np.abs(ort_images.astype(int) - torch_images.astype(int)).max() <= 2


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    base = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base[0]), base
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*=", text)
    entry = re.search(r'^ENTRYPOINT\s+\["([^"]+)"\]', text, flags=re.M).group(1)
    copied = re.search(rf"^COPY\s+(\S+)\s+{re.escape(entry)}$", text, flags=re.M).group(1)
    script = ROOT / copied
    assert script.is_file() and script.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for path in re.findall(r"^COPY\s+(\S+)\s", text, flags=re.M):
        assert (ROOT / path).exists(), path
    # one onnxruntime build (the GPU one), and the TensorRT Python package of the image's own libnvinfer
    assert text.index("pip uninstall -y onnxruntime") < text.index("install 'onnxruntime-gpu")
    assert "getInferLibVersion" in text and "tensorrt-cu12==${trt}.*" in text
    assert not re.search(r"'tensorrt>=", text)


@pytest.mark.gpu
def test_tensorrt_engines_serve_the_pipeline(tiny_onnx, tmp_path):
    """On a GPU: build fp16 plans, serve them natively, and compare images with the CPU path."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import PipelineClient

    results = eng.build_plans(tiny_onnx, tmp_path / "engines", [1, 4])
    assert all(r.built for r in results)
    again = eng.build_plans(tiny_onnx, tmp_path / "engines", [1, 4])
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
        tiny_onnx, tmp_path / "inproc", runtime="tensorrt", engines=tmp_path / "engines", components="inprocess"
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


def test_repo_cli_wires_runtime_options(tiny_onnx, tiny_bundle, tmp_path):
    plans = _fake_plans(tiny_onnx, tmp_path / "engines")
    r = rf(
        "rf-export",
        "repo",
        str(tiny_onnx),
        "--out",
        str(tmp_path / "trt"),
        "--runtime",
        "tensorrt",
        "--engines",
        str(plans),
    )
    assert r.returncode == 0, r.stderr
    assert _config(tmp_path / "trt" / "unet" / "config.pbtxt").platform == "tensorrt_plan"
    assert _config(tmp_path / "trt" / "pipeline" / "config.pbtxt").max_batch_size == 16
    r = rf("rf-export", "repo", str(tiny_onnx), "--out", str(tmp_path / "t2"), "--runtime", "tensorrt",
           "--engines", str(plans), "--max-batch", "64")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --max-batch 64 is larger than the TensorRT plans' profile allows (16 images): rebuild them with "
        "`rf-export engines --batch-sizes ...,64` or lower --max-batch"
    ]
    r = rf(
        "rf-export",
        "repo",
        str(tiny_onnx),
        "--out",
        str(tmp_path / "pt"),
        "--runtime",
        "pytorch",
        "--bundle",
        str(tiny_bundle),
        "--device",
        "cpu",
        "--dtype",
        "bf16",
    )
    assert r.returncode == 0, r.stderr
    pipe = _config(tmp_path / "pt" / "pipeline" / "config.pbtxt")
    assert pipe.parameters["dtype"].string_value == "bf16" and pipe.parameters["device"].string_value == "cpu"
    assert pipe.parameters["engine"].string_value == "pytorch-cpu bf16, unipc"
    assert pipe.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


@pytest.mark.slow
def test_pytorch_bf16_runtime_served_on_cpu(tiny_onnx, tiny_bundle, tmp_path):
    """The pytorch runtime inside Triton, bf16 on the CPU: close to the fp32 ONNX path, not bit-equal."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import PipelineClient

    repo = write_repository(
        tiny_onnx, tmp_path / "pt", runtime="pytorch", bundle=tiny_bundle, device="cpu", dtype="bf16"
    )
    request = {
        "PROMPT": np.array([[b"photo of a cat"]] * 2, dtype=object),
        "SEED": np.array([[1], [2]]),
        "STEPS": np.full((2, 1), 8, np.int32),
    }
    with LocalServer(repo) as server:
        bf16 = PipelineClient(server.url).infer(request)
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings

    fp32 = Sampler(OrtComponents(tiny_onnx), tiny_onnx).generate(
        ["photo of a cat"] * 2, [""] * 2, [1, 2], Settings(8, 2.0)
    )
    diff = np.abs(bf16.astype(int) - fp32.astype(int))
    assert bf16.shape == fp32.shape and diff.mean() < 6 and diff.max() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_serving_image_default_runtime_without_gpu_stops_with_one_line(tiny_bundle, tiny_onnx, tmp_path):
    """The image's default (TensorRT) started on a host without a GPU: exit 2 with the reason and the CPU
    alternative, before anything is written or served."""
    import os
    import sys

    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "bundle")
    shutil.copytree(tiny_onnx, models / "onnx")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "RF_MODELS": str(models),
    }
    env.pop("RF_RUNTIME", None)
    r = subprocess.run(
        ["bash", str(ROOT / "docker" / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: RF_RUNTIME=tensorrt needs a GPU in the container (docker run --gpus all); on CPU-only hosts use "
        "RF_RUNTIME=openvino"
    ]
    assert not (models / "repo").exists() and not (models / "engines").exists()
