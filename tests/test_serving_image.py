"""The serving image: the Dockerfile's structure, and its entrypoint's refusal of a GPU runtime on a host
without a GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import rf

ROOT = Path(__file__).resolve().parent.parent


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
    assert "install '.[server,openvino]'" in text and "install 'onnxruntime-gpu" in text
    assert "getInferLibVersion" in text and "tensorrt-cu12==${trt}.*" in text
    assert not re.search(r"'tensorrt>=", text)


def test_extras_install_one_onnxruntime_build_and_a_gpu_node_in_one_command():
    """The server extra brought the CPU onnxruntime, so a bare-metal GPU node needed an uninstall and two more
    installs; now `.[server,gpu]` is the one command, `.[server,cpu]` the CPU one."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {k: {re.split(r"[<>=\[ ]", d)[0] for d in v} for k, v in extras.items()}
    assert "onnxruntime" not in names["server"] and "onnxruntime-gpu" not in names["server"]
    assert names["cpu"] == {"onnxruntime"}
    assert names["gpu"] >= {"onnxruntime-gpu", "tensorrt-cu12"} and "onnxruntime" not in names["gpu"]
    assert all(re.search(r">=\d", d) for d in extras["gpu"])  # lower bounds pinned
    assert "'.[server,cpu,openvino,test]'" in (ROOT / "Makefile").read_text()


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


def test_a_replaced_bundle_is_exported_again_at_start_up(tiny_bundle, tiny_onnx, tmp_path):
    """The entrypoint exported once and then kept the export whatever bundle was mounted: a replaced (say, newly
    finetuned) bundle kept serving the old model, silently. Now `rf-export onnx --if-changed` keeps an export only
    while it is the mounted bundle's, by the bundle identity export.json records."""
    import json

    from realfake.export.tiny_bundle import build_tiny_bundle

    assert (
        'rf-export onnx "$models/bundle" --out "$models/onnx" --if-changed'
        in (ROOT / "docker" / "entrypoint.sh").read_text()
    )
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "bundle")
    shutil.copytree(tiny_onnx, models / "onnx")
    unet = models / "onnx" / "unet.onnx"
    before = unet.stat().st_mtime_ns
    r = rf("rf-export", "onnx", str(models / "bundle"), "--out", str(models / "onnx"), "--if-changed")
    assert r.returncode == 0 and "is up to date" in r.stdout, r.stderr
    assert unet.stat().st_mtime_ns == before  # the same bundle (a copy: the identity is its content) is kept
    old = json.loads((models / "onnx" / "export.json").read_text())["bundle_identity"]
    (models / "onnx" / "unet.int8.xml").write_text("<quantized from the old model/>")
    shutil.rmtree(models / "bundle")
    build_tiny_bundle(models / "bundle", seed=1)  # another model at the same path
    r = rf("rf-export", "onnx", str(models / "bundle"), "--out", str(models / "onnx"), "--if-changed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"holds the export of another bundle ({old})" in r.stderr
    new = json.loads((models / "onnx" / "export.json").read_text())["bundle_identity"]
    assert new != old and not (models / "onnx" / "unet.int8.xml").exists()


def _fake_gpu_host(tmp_path, gpus: int) -> dict:
    """PATH with an `nvidia-smi -L` listing `gpus` GPUs and a `tritonserver` that records its arguments."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    listing = "".join(f"GPU {g}: NVIDIA H100 80GB HBM3 (UUID: GPU-{g:08d})\\n" for g in range(gpus))
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\nprintf "{listing}"\n')
    (bin_dir / "tritonserver").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/triton-args"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}


def test_entrypoint_sizes_the_cuda_pool_per_gpu_and_refuses_bls_across_gpus(tiny_bundle, tiny_onnx, tmp_path):
    """Each GPU the container sees gets Triton's CUDA memory pool for the Python backend's GPU tensors; a container
    of several GPUs with placement bls (Triton may route a pipeline's BLS calls to another GPU) stops, saying what
    to run instead."""
    from realfake.core.defaults import CUDA_MEMORY_POOL_MB
    from realfake.serving.pipeline_params import bls_across_gpus

    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert f"${{RF_CUDA_POOL_MB:-{CUDA_MEMORY_POOL_MB}}}" in script  # one number, said in both places
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "bundle")
    shutil.copytree(tiny_onnx, models / "onnx")
    env = _fake_gpu_host(tmp_path, 2) | {"RF_MODELS": str(models)}
    env.pop("RF_PLACEMENT", None)
    run = ["bash", str(ROOT / "docker" / "entrypoint.sh")]
    r = subprocess.run(run, env=env | {"RF_RUNTIME": "tensorrt"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: this container sees 2 GPUs, and with RF_PLACEMENT=bls a pipeline's BLS calls may run on another "
        "GPU's component: run one container per GPU (docker run --gpus device=K) or RF_PLACEMENT=inprocess "
        "(RF_RUNTIME=tensorrt)"
    ]
    assert not (models / "repo").exists()

    r = subprocess.run(
        [*run, "--http-port=8000"], env=env | {"RF_RUNTIME": "python-ort"}, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    pool = CUDA_MEMORY_POOL_MB * 1024 * 1024
    assert (tmp_path / "triton-args").read_text().splitlines() == [
        f"--model-repository={models}/repo",
        f"--cuda-memory-pool-byte-size=0:{pool}",
        f"--cuda-memory-pool-byte-size=1:{pool}",
        "--http-port=8000",
    ]
    # the pipeline model's own check, for servers started any other way (a ready repository, rf-serve)
    assert "one server per GPU" in bls_across_gpus("bls", "tensorrt", "cuda", 8)
    assert "--runtime tensorrt --placement inprocess" in bls_across_gpus("bls", "onnxruntime", "cuda", 2)
    assert bls_across_gpus("inprocess", "tensorrt", "cuda", 8) is None
    assert (
        bls_across_gpus("bls", "tensorrt", "cuda", 1) is None and bls_across_gpus("bls", "python-ort", "cpu", 4) is None
    )


def test_local_servers_get_the_cuda_pool_of_each_gpu():
    from realfake.client.server import cuda_pool_flags

    assert cuda_pool_flags(0) == [] and cuda_pool_flags(2, 512) == [
        "--cuda-memory-pool-byte-size=0:536870912",
        "--cuda-memory-pool-byte-size=1:536870912",
    ]


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, tmp_path):
    from realfake.client.server import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    env = _fake_gpu_host(tmp_path, 3)
    monkeypatch.setenv("PATH", env["PATH"])
    assert visible_gpus() == 3
