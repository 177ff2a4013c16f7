"""The Python API under `rf-client generate`: the same job through `generate_dataset` and through the CLI makes
byte-identical datasets, it resumes, and bad configurations are one UserError before any server is asked."""

import json

import pytest

from realfake.client.generate import GenerateConfig, generate_dataset
from realfake.core.errors import UserError

from conftest import generate_args, rf

pytestmark = pytest.mark.slow


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def test_api_and_cli_make_the_same_dataset_and_the_api_resumes(triton, tmp_path):
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    logged, seen = [], []
    cfg = GenerateConfig(classes="cifar10", out=api_out, per_class=3, steps=4, seed=11, urls=[triton.url])
    summary = generate_dataset(cfg, log=logged.append, progress=lambda d, f, t, rates: seen.append((d, f, t)))
    assert (summary.images, summary.failed, summary.skipped) == (30, 0, 0)
    assert summary.path == api_out / "summary.json" and json.loads(summary.path.read_text())["images"] == 30
    assert seen and seen[-1] == (30, 0, 30)  # progress reached the whole job
    rows = [json.loads(line) for line in (api_out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(_files(api_out))
    r = rf("rf-client", *generate_args(cli_out, triton.url, per_class=3, steps=4, seed=11, quiet=True))
    assert r.returncode == 0, r.stderr
    assert _files(cli_out) == _files(api_out)
    assert json.loads((cli_out / "job.json").read_text()) == json.loads((api_out / "job.json").read_text())
    # the same configuration again: everything is already done
    again = generate_dataset(cfg, log=logged.append)
    assert (again.images, again.skipped) == (0, 30)
    assert any("resuming: 30 of 30" in line for line in logged)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, "--per-class is required"),
        ({"per_class": 0}, "--per-class must be >= 1"),
        ({"per_class": 1, "batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"per_class": 1, "strength": 1.5}, "--strength must be in (0, 1]"),
        ({"per_class": 1, "guidance_token": "maybe"}, "--guidance-token must be auto, on or off"),
        ({"per_class": 1, "shard": "3/2"}, "--shard 3/2"),
        ({"per_class": 1, "classes": "no-such-set"}, "unknown class set 'no-such-set'"),
        ({"per_class": 1, "guidance_scale": float("nan")}, "--guidance-scale must be a finite number >= 0, got nan"),
        ({"per_class": 1, "urls": ["127.0.0.1:99999"]}, "port in 1..65535"),
        ({"per_class": 1, "urls": []}, "--url HOST:PORT of a running Triton server"),
        ({"per_class": 1, "local": "tiny"}, "--url and --local exclude each other"),
        ({"per_class": 1, "urls": [], "local": "/no/such/model"}, "not a Triton model repository"),
        ({"per_class": 1, "image_format": "gif"}, "--format must be one of png, jpeg, webp"),
        ({"per_class": 1, "image_format": "jpeg", "quality": 0}, "--quality must be in 1..100"),
    ],
)
def test_bad_configurations_are_refused_before_any_server(tmp_path, changes, message):
    # no server listens on this port: a refusal must come before any connection attempt
    cfg = GenerateConfig(**{"classes": "cifar10", "out": tmp_path / "out", "urls": ["127.0.0.1:9"], **changes})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        generate_dataset(cfg)
    assert not (tmp_path / "out" / "job.json").exists()


def test_real_images_that_all_fail_to_decode_are_refused(tmp_path):
    real = tmp_path / "real"
    for cls in ("airplane", "cat"):
        (real / cls).mkdir(parents=True)
        (real / cls / "0.png").write_bytes(b"not a png")
    cfg = GenerateConfig(classes="cifar10", out=tmp_path / "out", real=real, urls=["127.0.0.1:9"])
    with pytest.raises(UserError, match=r"none of its 2 images decodes \(e.g. airplane/0.png: "):
        generate_dataset(cfg)


def test_cli_bad_inputs_are_one_line_before_any_request(tmp_path):
    for extra in (["--url", "localhost:99999"], ["--url", "127.0.0.1:9", "--guidance-scale", "nan"]):
        r = rf("rf-client", "generate", "--classes", "cifar10", "--per-class", "1", "--out", str(tmp_path), *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
