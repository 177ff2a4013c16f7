"""End to end through a real Triton server: repository -> tritonserver -> rf-client generate -> dataset."""

import json
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from realfake.client.server import LocalServer, free_port
from realfake.client.triton import PipelineClient
from realfake.core.errors import UserError

from conftest import cli_args, generate_args, rf

pytestmark = pytest.mark.slow


def _dataset_files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def test_generate_embedded_default_then_same_bytes_on_another_server(rf_home, triton, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    job = dict(per_class=8, steps=6, seed=7, quiet=True)
    # neither --url nor --local: one line naming both, nothing made
    r0 = rf("rf-client", *generate_args(first, **job), env={"RF_HOME": str(rf_home)})
    assert r0.returncode == 2 and len(r0.stderr.strip().splitlines()) == 1, r0.stderr
    assert "--url HOST:PORT" in r0.stderr and "--local tiny" in r0.stderr and not (first / "job.json").exists()
    # --local tiny: the client starts and stops a server on the tiny model itself
    r1 = rf("rf-client", *generate_args(first, local="tiny", **job), env={"RF_HOME": str(rf_home)})
    assert r1.returncode == 0, r1.stderr
    assert "images/sec" in r1.stdout
    files = _dataset_files(first)
    assert len(files) == 80 and len({k.split("/")[0] for k in files}) == 10
    for rel in files:
        with Image.open(first / rel) as im:
            im.load()
            assert im.size == (32, 32) and im.mode == "RGB"
    rows = [json.loads(line) for line in (first / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(files)  # one to one
    for r in rows:
        assert r["prompt"] == f"photo of {r['class_name']}, best quality"
        assert r["steps"] == 6 and r["guidance_scale"] == 2.0 and r["model"] and r["seed"] >= 0
    assert len({r["seed"] for r in rows}) == 80
    assert {r["local_model"] for r in rows} == {"tiny"}  # the manifest says the images came from the toy
    # the same job against an already-running server: byte-identical files
    r2 = rf("rf-client", *generate_args(second, triton.url, **job))
    assert r2.returncode == 0, r2.stderr
    assert _dataset_files(second) == files
    # re-running on a finished output makes nothing new
    r3 = rf("rf-client", *generate_args(second, triton.url, **job))
    assert r3.returncode == 0 and "0 images" in r3.stdout and "80 already done" in r3.stdout
    summary = json.loads((first / "summary.json").read_text())
    assert summary["images"] == 80 and summary["failed"] == 0 and summary["images_per_sec"] > 0
    assert summary["local_model"] == "tiny"
    assert json.loads((second / "summary.json").read_text())["local_model"] is None


def test_pipeline_through_triton_matches_diffusers(triton, tiny_bundle):
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    prompts, seeds = ["photo of tench, best quality", "photo of a red car"], [5, 6]
    client = PipelineClient(triton.url)
    images = client.infer(
        {
            "PROMPT": np.array([[p.encode()] for p in prompts], dtype=object),
            "NEGATIVE_PROMPT": np.array([[b"blurry"]] * 2, dtype=object),
            "SEED": np.array([[s] for s in seeds], dtype=np.int64),
            "STEPS": np.full((2, 1), 10, np.int32),
            "GUIDANCE_SCALE": np.full((2, 1), 2.0, np.float32),
        }
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bundle, local_files_only=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompts,
        negative_prompt=["blurry"] * 2,
        num_inference_steps=10,
        guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    ref = (ref * 255).round().astype(np.int16)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    assert np.abs(images.astype(np.int16) - ref).max() <= 2  # a few /255 at most (ORT vs PyTorch rounding)


def test_bad_request_is_an_error_not_a_crash(triton):
    client = PipelineClient(triton.url)
    with pytest.raises(Exception, match="STEPS must be in"):
        client.infer(
            {
                "PROMPT": np.array([[b"x"]], dtype=object),
                "SEED": np.array([[1]], dtype=np.int64),
                "STEPS": np.array([[0]], dtype=np.int32),
            }
        )
    assert client.card().identity  # the server is still serving


def test_unreachable_server(tmp_path):
    port = free_port()
    r = rf("rf-client", *generate_args(tmp_path / "o", f"127.0.0.1:{port}", per_class=1))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: server 127.0.0.1:{port} is unreachable")


def test_model_not_ready(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    shutil.rmtree(repo / "pipeline")
    with LocalServer(repo) as server:
        r = rf("rf-client", *generate_args(tmp_path / "o", server.url, per_class=1))
    assert r.returncode == 2
    assert "model 'pipeline' is not ready" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_model_that_fails_to_load_names_it_and_the_log(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    shutil.rmtree(repo / "pipeline" / "1" / "model_files" / "tokenizer")
    server = LocalServer(repo, ready_timeout=120)
    with pytest.raises(UserError) as info:
        server.start()
    assert "pipeline" in str(info.value) and str(server.log_path) in str(info.value)
    assert server.process.poll() is not None  # nothing left running


def test_port_in_use(tiny_repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            LocalServer(tiny_repo, http_port=port)
        r = rf("rf-serve", *cli_args(repo=tiny_repo, http_port=port, grpc_port=free_port()))
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in r.stderr


def test_unwritable_output(tmp_path, triton):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = rf("rf-client", *generate_args(blocker / "sub", triton.url, per_class=1))
    assert r.returncode == 2 and "is not writable" in r.stderr
