"""The OpenVINO CPU runtime: fp32 parity with ONNX Runtime, bf16 close, the int8 UNet (rf-export quantize)
calibrated, checked, refused when stale, and served through a real Triton."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from realfake.core.errors import UserError
from realfake.export.triton_repo import write_repository

from conftest import rf

PROMPTS = ["photo of a cat", "photo of a dog"]


@pytest.fixture(scope="module")
def fp32_images(tiny_onnx):
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings

    return Sampler(OrtComponents(tiny_onnx), tiny_onnx).generate(PROMPTS, [""] * 2, [1, 2], Settings(8, 2.0))


@pytest.fixture(scope="module")
def int8_onnx(tiny_onnx, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny export with an int8 UNet (the command writes next to the graphs)."""
    from realfake.export.quantize import quantize_unet

    onnx_dir = tmp_path_factory.mktemp("int8") / "onnx"
    shutil.copytree(tiny_onnx, onnx_dir)
    report = quantize_unet(
        onnx_dir, onnx_dir, PROMPTS, "", calibration_images=2, check_images=2, steps=8, log=lambda *_: None
    )
    return onnx_dir, report


def _generate(components, onnx_dir):
    from realfake.serving.sampler import Sampler, Settings

    return Sampler(components, onnx_dir).generate(PROMPTS, [""] * 2, [1, 2], Settings(8, 2.0))


def test_openvino_fp32_matches_onnxruntime(tiny_onnx, fp32_images):
    from realfake.serving.openvino_components import OvComponents

    images = _generate(OvComponents(tiny_onnx, "fp32"), tiny_onnx)
    assert images.shape == fp32_images.shape
    assert np.abs(images.astype(int) - fp32_images.astype(int)).max() <= 2


def test_openvino_bf16_close_to_fp32(tiny_onnx, fp32_images):
    from realfake.serving.openvino_components import OvComponents, cpu_capabilities

    if "BF16" not in cpu_capabilities():
        pytest.skip("this CPU has no bf16 support (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)")
    images = _generate(OvComponents(tiny_onnx, "bf16"), tiny_onnx)
    diff = np.abs(images.astype(int) - fp32_images.astype(int))
    assert diff.mean() < 6 and diff.max() > 0  # close, and really a different precision


def test_quantize_writes_a_checked_int8_unet(int8_onnx, tiny_onnx):
    from realfake.serving.export_files import graph_sha256

    onnx_dir, report = int8_onnx
    ir = (onnx_dir / "unet.int8.xml").read_text()
    assert ir.count('type="FakeQuantize"') >= 10  # convolutions and matmuls really quantized
    assert (onnx_dir / "unet.int8.bin").stat().st_size > 0
    on_disk = json.loads((onnx_dir / "quantize.json").read_text())
    assert on_disk == report
    assert report["unet_onnx_sha256"] == graph_sha256(tiny_onnx / "unet.onnx")
    assert report["calibration"]["unet_calls"] == 2 * 8  # 2 images x 8 steps recorded
    check = report["check"]
    assert 0 < check["mean_abs_pixel_diff"] <= check["budget_mean_abs_pixel_diff"]
    assert not (onnx_dir / "unet.int8.tmp.xml").exists()


def test_int8_in_process_close_to_fp32(int8_onnx, fp32_images):
    from realfake.serving.openvino_components import OvComponents

    onnx_dir, _ = int8_onnx
    images = _generate(OvComponents(onnx_dir, "int8"), onnx_dir)
    diff = np.abs(images.astype(int) - fp32_images.astype(int))
    assert diff.mean() < 6 and diff.max() > 0


def test_quantize_over_budget_keeps_nothing(tiny_onnx, tmp_path):
    from realfake.export.quantize import quantize_unet

    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, onnx_dir)
    with pytest.raises(UserError, match="budget 0.0"):
        quantize_unet(
            onnx_dir, onnx_dir, PROMPTS, "", calibration_images=1, check_images=1, steps=4, budget=0.0, log=print
        )
    assert not (onnx_dir / "unet.int8.xml").exists() and not (onnx_dir / "unet.int8.bin").exists()
    assert json.loads((onnx_dir / "quantize.json").read_text())["check"]["mean_abs_pixel_diff"] > 0


def test_repo_refuses_missing_stale_or_unknown_int8(tiny_onnx, int8_onnx, tmp_path):
    with pytest.raises(UserError, match="rf-export quantize"):
        write_repository(tiny_onnx, tmp_path / "r1", runtime="openvino", precision="int8")
    with pytest.raises(UserError, match="fp32, bf16 or int8"):
        write_repository(tiny_onnx, tmp_path / "r2", runtime="openvino", precision="fp16")
    with pytest.raises(UserError, match="CPU"):
        write_repository(tiny_onnx, tmp_path / "r3", runtime="openvino", device="cuda")
    stale = tmp_path / "stale"
    shutil.copytree(int8_onnx[0], stale)
    report = json.loads((stale / "quantize.json").read_text())
    report["unet_onnx_sha256"] = "0" * 64
    (stale / "quantize.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match="another unet.onnx"):
        write_repository(stale, tmp_path / "r4", runtime="openvino", precision="int8")


def test_quantize_cli_errors(tmp_path):
    r = rf("rf-export", "quantize", str(tmp_path), "--out", str(tmp_path))
    assert r.returncode == 2 and "rf-export onnx" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_int8_served_through_triton(int8_onnx, fp32_images, tmp_path):
    """rf-export repo --runtime openvino --dtype int8, a real tritonserver, the client: close to fp32."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import PipelineClient

    onnx_dir, _ = int8_onnx
    r = rf(
        "rf-export",
        "repo",
        str(onnx_dir),
        "--out",
        str(tmp_path / "repo"),
        "--runtime",
        "openvino",
        "--precision",
        "int8",
    )
    assert r.returncode == 0, r.stderr
    files = tmp_path / "repo" / "pipeline" / "1" / "model_files"
    assert (files / "unet.int8.xml").is_file() and (files / "unet.int8.bin").is_file()
    assert not (tmp_path / "repo" / "unet").exists()  # no component models: the graphs live in the pipeline
    request = {
        "PROMPT": np.array([[p.encode()] for p in PROMPTS], dtype=object),
        "SEED": np.array([[1], [2]]),
        "STEPS": np.full((2, 1), 8, np.int32),
    }
    with LocalServer(tmp_path / "repo") as server:
        served = PipelineClient(server.url).infer(request)
    from realfake.serving.openvino_components import OvComponents

    in_process = _generate(OvComponents(onnx_dir, "int8"), onnx_dir)
    assert np.array_equal(served, in_process)  # the server runs exactly the int8 sampler
    diff = np.abs(served.astype(int) - fp32_images.astype(int))
    assert diff.mean() < 6


@pytest.mark.slow
def test_serving_image_entrypoint_on_a_cpu_host(tiny_bundle, tmp_path):
    """The Docker entrypoint with RF_RUNTIME=openvino RF_PRECISION=int8 on a mounted bundle: export, quantize once,
    write the repository, exec a real tritonserver (this install's, found on PATH as in the official image)
    that answers requests with the int8 sampler's images; a restart keeps the quantized UNet."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from realfake.client.server import LocalServer, free_port, server_ready
    from realfake.client.triton import PipelineClient
    from realfake.serving.openvino_components import OvComponents

    root = Path(__file__).resolve().parent.parent
    models = tmp_path / "models"
    (models / "repo").mkdir(parents=True)
    shutil.copytree(tiny_bundle, models / "bundle")
    launcher, server_env = LocalServer(models / "repo").launcher()
    bin_dir = tmp_path / "bin"  # `tritonserver` on PATH, as in the image: this install's binary and backends
    bin_dir.mkdir()
    (bin_dir / "tritonserver").write_text(
        f"#!/bin/sh\nexport LD_LIBRARY_PATH='{server_env['LD_LIBRARY_PATH']}'\nexec {' '.join(launcher)} \"$@\"\n"
    )
    (bin_dir / "tritonserver").chmod(0o755)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "RF_MODELS": str(models),
        "RF_RUNTIME": "openvino",
        "RF_PRECISION": "int8",
        "RF_CLASSES": "cifar10",
    }
    request = {"PROMPT": np.array([[b"photo of a cat"]], dtype=object), "SEED": np.array([[3]])}
    request["STEPS"] = np.full((1, 1), 8, np.int32)
    int8_mtime = None
    for _ in range(2):
        port = free_port()
        args = ["--http-address=127.0.0.1", f"--http-port={port}", f"--grpc-port={free_port()}"]
        log = open(tmp_path / "entrypoint.log", "ab")
        proc = subprocess.Popen(
            ["bash", str(root / "docker" / "entrypoint.sh"), *args, "--allow-metrics=false"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600
            while not server_ready(f"127.0.0.1:{port}"):
                assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the entrypoint's server did not come up"
                time.sleep(0.5)
            served = PipelineClient(f"127.0.0.1:{port}").infer(request)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            log.close()
        onnx_dir = models / "onnx"
        mtime = (onnx_dir / "unet.int8.xml").stat().st_mtime_ns
        assert int8_mtime in (None, mtime)  # quantized at the first start only, kept in the volume
        int8_mtime = mtime
    config = (models / "repo" / "pipeline" / "config.pbtxt").read_text()
    assert 'string_value: "openvino"' in config and 'string_value: "int8"' in config
    from realfake.serving.sampler import Sampler, Settings

    expected = Sampler(OvComponents(onnx_dir, "int8"), onnx_dir).generate(["photo of a cat"], [""], [3], Settings(8))
    assert np.array_equal(served, expected)


def test_demo_export_stage_with_the_int8_runtime(tiny_bundle, tmp_path):
    """rf-demo --runtime openvino-int8: the export stage calibrates on the demo's class prompts and writes an
    openvino int8 repository."""
    from realfake.training.demo import Demo, DemoConfig

    demo = Demo(
        DemoConfig(out=tmp_path / "demo", steps=6, runtime="openvino", precision="int8"), tmp_path / "cache", log=print
    )
    result = demo.export(str(tiny_bundle), "finetuned")
    assert (
        result["runtime"] == "openvino"
        and result["precision"] == "int8"
        and 0 < result["int8_mean_abs_pixel_diff"] <= 6
    )
    report = json.loads((tmp_path / "demo" / "onnx_finetuned" / "quantize.json").read_text())
    assert report["calibration"]["unet_calls"] == 10 * 6  # one image per Fashion-MNIST class x 6 steps
    assert "photo of Ankle boot, best quality" in report["calibration"]["prompts"]
    config = (Path(result["repo"]) / "pipeline" / "config.pbtxt").read_text()
    assert 'string_value: "openvino"' in config and 'string_value: "int8"' in config
    engine = re.search(r'key: "engine"\n  value: \{ string_value: "([^"]+)" \}', config).group(1)
    assert re.fullmatch(r"openvino-cpu int8 [0-9a-f]{12}, unipc", engine), engine  # the int8 model's digest
