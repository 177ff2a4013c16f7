"""Shared fixtures: one tiny bundle, its ONNX export and repository, and a real Triton server per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from realfake.serving.tensorrt_plans import GpuInfo

VENV_BIN = Path(sys.executable).parent


def rf(*args: str, env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a console script of this install (rf-client, rf-export, ...) and capture its output."""
    cmd = [str(VENV_BIN / args[0]), *args[1:]]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, **kw)


def cli_args(*defaults: dict, **options) -> list[str]:
    """An argv from keyword options: `per_class=12` -> `--per-class 12`; True -> a bare flag; False or None ->
    left out; a list or tuple -> the option repeated. Dicts given first are defaults the keywords override."""
    merged = {k: v for d in (*defaults, options) for k, v in d.items()}
    argv: list[str] = []
    for key, value in merged.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                argv += [flag, str(v)]
    return argv


def generate_args(out, *urls: str, **options) -> list[str]:
    """`rf-client generate` arguments: cifar10 classes unless overridden, the options, --out, one --url per url
    (none: the client starts the embedded default server)."""
    return ["generate", *cli_args({"classes": "cifar10"}, options, out=out, url=list(urls))]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; elsewhere they are skipped with the reason (never silently)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA and tensorrt; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from realfake.export.tiny_bundle import build_tiny_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bundle, tmp_path_factory) -> Path:
    from realfake.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(tiny_bundle, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_repo(tiny_onnx, tmp_path_factory) -> Path:
    from realfake.export.triton_repo import write_repository

    return write_repository(tiny_onnx, tmp_path_factory.mktemp("repo") / "triton_repo")


@pytest.fixture(scope="session")
def triton(tiny_repo):
    """A real tritonserver serving the tiny repository for the whole session."""
    from realfake.client.server import LocalServer

    with LocalServer(tiny_repo) as server:
        yield server


@pytest.fixture(scope="session")
def rf_home(tiny_repo, tmp_path_factory) -> Path:
    """An RF_HOME whose embedded default model is the session's tiny repository (no rebuild per test)."""
    home = tmp_path_factory.mktemp("rfhome")
    (home / "tiny").mkdir()
    (home / "tiny" / "repo").symlink_to(tiny_repo)
    return home


# -- TensorRT plans without a GPU: files with the metadata `rf-export engines` writes --------------------------------

# the shape facts of the tiny export (export.json), for plan profiles made without a GPU
TINY_META = {
    "image_size": 32,
    "vae_scale_factor": 2,
    "latent_channels": 4,
    "text_hidden_size": 32,
    "image_encoder_size": 32,
    "components": ["text_encoder", "unet", "vae_decoder", "vae_encoder", "image_encoder"],
}
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
L4 = GpuInfo("NVIDIA L4", (8, 9))


def fake_plans(onnx_dir: Path, folder: Path, batch_sizes=(1, 4, 8, 16), gpu=H100, digest=None) -> Path:
    """Plan files with the metadata `rf-export engines` writes (the plan bytes are not an engine)."""
    from realfake.export import tensorrt_build as eng
    from realfake.serving.export_files import graph_sha256

    folder.mkdir(exist_ok=True)
    meta = json.loads((onnx_dir / "export.json").read_text())
    for name, profile in eng.component_profiles(meta, list(batch_sizes)).items():
        plan = folder / eng.plan_name(name, gpu, "10.13.0")
        plan.write_bytes(b"plan " + name.encode())
        wanted = eng.plan_meta(name, gpu, "10.13.0", digest or graph_sha256(onnx_dir / f"{name}.onnx"), profile, "fp16")
        plan.with_suffix(".json").write_text(json.dumps(wanted))
    return folder


def parse_config(path: Path):
    """A config.pbtxt parsed back by Triton's own protobuf schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def count_sampler_calls(sampler) -> list[int]:
    """Record the batch size of every `sampler.generate` call from now on (`del sampler.generate` undoes it)."""
    calls: list[int] = []
    generate = sampler.generate

    def counting(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    sampler.generate = counting
    return calls
