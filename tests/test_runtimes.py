"""The serving runtimes on one export: repository configs per runtime (parsed back by Triton's schema), the CLI's
wiring of runtime options, per-GPU pipeline instances, ONNX Runtime I/O binding, and the PyTorch runtime's parity
(and bf16 served by a real Triton) on the CPU."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2

from realfake.core.errors import UserError
from realfake.export.triton_repo import write_repository

from conftest import TINY_META, fake_plans, parse_config, rf

ROOT = Path(__file__).resolve().parent.parent


def test_repository_per_runtime(tiny_onnx, tiny_bundle, tmp_path):
    onnx_rt = write_repository(tiny_onnx, tmp_path / "ort", runtime="onnxruntime")
    unet = parse_config(onnx_rt / "unet" / "config.pbtxt")
    assert (
        unet.platform == "onnxruntime_onnx"
        and unet.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    )
    assert (onnx_rt / "unet" / "1" / "model.onnx").is_file() and not (onnx_rt / "unet" / "1" / "model.py").exists()
    pipe = parse_config(onnx_rt / "pipeline" / "config.pbtxt")
    assert list(pipe.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert pipe.parameters["engine"].string_value == "onnxruntime-cuda fp32, unipc"
    assert pipe.parameters["device"].string_value == "cuda" and pipe.parameters["placement"].string_value == "bls"
    assert pipe.parameters["runtime"].string_value == "onnxruntime" and "components" not in pipe.parameters

    plans = fake_plans(tiny_onnx, tmp_path / "engines")
    trt = write_repository(tiny_onnx, tmp_path / "trt", runtime="tensorrt", engines=plans)
    vae = parse_config(trt / "vae_decoder" / "config.pbtxt")
    assert vae.platform == "tensorrt_plan" and vae.default_model_filename == "model.plan"
    assert [list(i.dims) for i in vae.input] == [[-1, 4, -1, -1]] and vae.max_batch_size == 0
    assert (trt / "vae_decoder" / "1" / "model.plan").read_bytes() == b"plan vae_decoder"
    pipe = parse_config(trt / "pipeline" / "config.pbtxt")
    assert pipe.max_batch_size == 16 and list(pipe.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    engine = pipe.parameters["engine"].string_value
    assert re.fullmatch(r"tensorrt-10\.13\.0 sm90 fp16 [0-9a-f]{12}, unipc", engine), engine
    again = tmp_path / "engines_again"
    shutil.copytree(plans, again)
    # two TensorRT builds of one graph differ
    (again / "unet.sm90.h100-80gb-hbm3.10.13.0.plan").write_bytes(b"plan unet, built again")
    rebuilt = write_repository(tiny_onnx, tmp_path / "trt_re", runtime="tensorrt", engines=again)
    assert parse_config(rebuilt / "pipeline" / "config.pbtxt").parameters["engine"].string_value != engine
    smaller = parse_config(
        write_repository(tiny_onnx, tmp_path / "trt8", runtime="tensorrt", engines=plans, max_batch=8)
        / "pipeline"
        / "config.pbtxt"
    )
    assert smaller.max_batch_size == 8 and list(smaller.dynamic_batching.preferred_batch_size) == [4, 8]
    with pytest.raises(UserError, match=r"--max-batch-size 32 is larger than the TensorRT plans' profile allows \(16"):
        write_repository(tiny_onnx, tmp_path / "trt32", runtime="tensorrt", engines=plans, max_batch=32)
    inproc = write_repository(tiny_onnx, tmp_path / "trt_in", runtime="tensorrt", engines=plans, placement="inprocess")
    assert sorted(p.name for p in inproc.iterdir()) == ["pipeline"]
    pipe = parse_config(inproc / "pipeline" / "config.pbtxt")
    assert pipe.parameters["runtime"].string_value == "tensorrt" and pipe.max_batch_size == 16
    assert pipe.parameters["placement"].string_value == "inprocess"
    assert pipe.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    held = inproc / "pipeline" / "1" / "model_files" / "engines"
    assert sorted(p.name for p in held.iterdir()) == sorted(
        f"{c}.{x}" for c in TINY_META["components"] for x in ("json", "plan")
    )
    assert (held / "unet.plan").read_bytes() == b"plan unet"
    assert json.loads((held / "unet.json").read_text())["max_images"] == 16
    with pytest.raises(UserError, match="no TensorRT plan for unet"):
        (plans / "unet.sm90.h100-80gb-hbm3.10.13.0.plan").unlink()
        write_repository(tiny_onnx, tmp_path / "trt2", runtime="tensorrt", engines=plans)

    torch_repo = write_repository(tiny_onnx, tmp_path / "pt", runtime="pytorch", bundle=tiny_bundle)
    assert sorted(p.name for p in torch_repo.iterdir()) == ["pipeline"]
    params = parse_config(torch_repo / "pipeline" / "config.pbtxt").parameters
    assert params["runtime"].string_value == "pytorch" and Path(params["bundle"].string_value) == tiny_bundle.resolve()
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


def test_repo_cli_wires_runtime_options(tiny_onnx, tiny_bundle, tmp_path):
    plans = fake_plans(tiny_onnx, tmp_path / "engines")
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
    assert parse_config(tmp_path / "trt" / "unet" / "config.pbtxt").platform == "tensorrt_plan"
    assert parse_config(tmp_path / "trt" / "pipeline" / "config.pbtxt").max_batch_size == 16
    r = rf("rf-export", "repo", str(tiny_onnx), "--out", str(tmp_path / "t2"), "--runtime", "tensorrt",
           "--engines", str(plans), "--max-batch-size", "64")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --max-batch-size 64 is larger than the TensorRT plans' profile allows (16 images): rebuild them with "
        "`rf-export engines --batch-sizes ...,64` or lower --max-batch-size"
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
        "--precision",
        "bf16",
    )
    assert r.returncode == 0, r.stderr
    pipe = parse_config(tmp_path / "pt" / "pipeline" / "config.pbtxt")
    assert pipe.parameters["dtype"].string_value == "bf16" and pipe.parameters["device"].string_value == "cpu"
    assert pipe.parameters["engine"].string_value == "pytorch-cpu bf16, unipc"
    assert pipe.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


@pytest.mark.slow
def test_pytorch_bf16_runtime_served_on_cpu(tiny_onnx, tiny_bundle, tmp_path):
    """The pytorch runtime inside Triton, bf16 on the CPU: close to the fp32 ONNX path, not bit-equal."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import PipelineClient

    repo = write_repository(
        tiny_onnx, tmp_path / "pt", runtime="pytorch", bundle=tiny_bundle, device="cpu", precision="bf16"
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
