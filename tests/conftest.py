"""Shared fixtures: one tiny bundle, its ONNX export and repository, and a real Triton server per session."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def rf(*args: str, env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a console script of this install (rf-client, rf-export, ...) and capture its output."""
    cmd = [str(VENV_BIN / args[0]), *args[1:]]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, **kw)


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
