"""The serving image: the Dockerfile's structure, and its entrypoint's refusal of a GPU runtime on a host
without a GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

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
    assert text.index("pip uninstall -y onnxruntime") < text.index("install 'onnxruntime-gpu")
    assert "getInferLibVersion" in text and "tensorrt-cu12==${trt}.*" in text
    assert not re.search(r"'tensorrt>=", text)


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
