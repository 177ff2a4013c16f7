"""The `pipeline` model's parameters, said once (realfake.serving.pipeline_params): the served (runtime, placement)
pairs, the round trip through config.pbtxt, refusals that name the bad value, what `rf-export repo` writes read
back by the pipeline model's own reader, and the pipeline model's initialisation choosing its components from
them."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from realfake.core.errors import UserError
from realfake.core.protocol import PARAM_BUNDLE_IDENTITY, PARAM_ENGINE, PARAM_HAS_IMAGE_ENCODER, PARAM_IMAGE_SIZE
from realfake.export.triton_repo import write_repository
from realfake.serving.pipeline_params import PLACEMENTS, RUNTIMES, SERVED, PipelineParams, served_placement

from conftest import fake_plans, parse_config, rf

# every pair `rf-export repo` serves, and what the pipeline model builds for it
SERVED_PAIRS = {
    ("python-ort", "bls"): "bls",
    ("python-ort", "inprocess"): "ort",
    ("onnxruntime", "bls"): "bls",
    ("tensorrt", "bls"): "bls",
    ("tensorrt", "inprocess"): "tensorrt",
    ("openvino", "inprocess"): "openvino",
    ("pytorch", "inprocess"): "torch",
}


def _params(runtime: str, placement: str, **kw) -> PipelineParams:
    values = {
        "placement": placement,
        "runtime": runtime,
        "device": "cuda" if runtime in ("onnxruntime", "tensorrt") else "cpu",
        "intra_op_threads": 3,
        "bundle_identity": "tiny-1234",
        "image_size": 32,
        "has_image_encoder": True,
        "engine": f"{runtime} something, ddim",
        "scheduler": "ddim",
        "dtype": {"openvino": "bf16", "pytorch": "fp16"}.get(runtime),
        "bundle": "/models/bundle" if runtime == "pytorch" else None,
    }
    return PipelineParams(**{**values, **kw})


def _plain(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_served_pairs_are_the_ones_write_repository_accepts():
    assert {(r, p) for r in RUNTIMES for p in SERVED[r]} == set(SERVED_PAIRS)
    assert set(SERVED) == set(RUNTIMES) and set(PLACEMENTS) == {"bls", "inprocess"}
    for (runtime, placement), kind in SERVED_PAIRS.items():
        assert _params(runtime, placement).components_kind() == kind


@pytest.mark.parametrize(("runtime", "placement"), sorted(SERVED_PAIRS))
def test_round_trip_through_the_parameters(runtime, placement):
    params = _params(runtime, placement)
    written = params.to_parameters()
    assert all(isinstance(v, str) for v in written.values())
    assert written["placement"] == placement and written["runtime"] == runtime
    assert written[PARAM_HAS_IMAGE_ENCODER] == "true" and written[PARAM_IMAGE_SIZE] == "32"
    assert ("bundle" in written) == (runtime == "pytorch") and ("dtype" in written) == (
        runtime in ("openvino", "pytorch")
    )
    assert PipelineParams.from_parameters(written) == params
    # the pipeline model's form: json.loads(args["model_config"])["parameters"]
    assert PipelineParams.from_parameters({k: {"string_value": v} for k, v in written.items()}) == params
    other = _params(runtime, placement, has_image_encoder=False, intra_op_threads=0, image_size=64)
    assert PipelineParams.from_parameters(other.to_parameters()) == other != params


def test_unknown_and_unserved_values_are_refused_with_one_line():
    good = _params("python-ort", "bls").to_parameters()
    with pytest.raises(UserError) as info:
        PipelineParams.from_parameters({**good, "runtime": "tvm"})
    assert str(info.value) == (
        "unknown runtime 'tvm'; this build supports: python-ort, openvino, onnxruntime, tensorrt, pytorch"
    )
    with pytest.raises(UserError) as info:
        PipelineParams.from_parameters({**good, "placement": "shared"})
    assert str(info.value) == "unknown placement 'shared'; choose one of bls, inprocess"
    # the old meaning of `components` (a runtime name) is not a placement
    with pytest.raises(UserError, match=r"unknown placement 'openvino'; choose one of bls, inprocess"):
        PipelineParams.from_parameters({**good, "placement": "openvino"})
    with pytest.raises(UserError, match=r"^runtime onnxruntime is served with placement bls, not 'inprocess'$"):
        PipelineParams.from_parameters({**good, "runtime": "onnxruntime", "placement": "inprocess"})
    with pytest.raises(UserError, match=r"^runtime openvino is served with placement inprocess, not 'bls'$"):
        _params("openvino", "bls")
    with pytest.raises(UserError, match="runtime pytorch needs the 'bundle' parameter"):
        _params("pytorch", "inprocess", bundle=None)
    with pytest.raises(UserError, match="lack 'engine'"):
        PipelineParams.from_parameters({k: v for k, v in good.items() if k != PARAM_ENGINE})
    with pytest.raises(UserError, match=r"'image_size' must be an integer, not 'big'"):
        PipelineParams.from_parameters({**good, PARAM_IMAGE_SIZE: "big"})
    with pytest.raises(UserError, match=r"'has_image_encoder' must be true or false, not 'yes'"):
        PipelineParams.from_parameters({**good, PARAM_HAS_IMAGE_ENCODER: "yes"})


def test_the_user_placement_becomes_the_served_one():
    assert served_placement("openvino", "bls") == "inprocess" and served_placement("pytorch", "bls") == "inprocess"
    assert served_placement("tensorrt", "inprocess") == "inprocess" and served_placement("python-ort", "bls") == "bls"
    with pytest.raises(UserError, match="served with placement bls, not 'inprocess'"):
        served_placement("onnxruntime", "inprocess")
    with pytest.raises(UserError, match="unknown placement 'sideways'"):
        served_placement("python-ort", "sideways")


def test_repositories_read_back_with_the_same_values(tiny_onnx, tiny_bundle, tmp_path):
    meta = json.loads((tiny_onnx / "export.json").read_text())
    plans = fake_plans(tiny_onnx, tmp_path / "engines")
    cases = {
        "ort_bls": ({}, ("python-ort", "bls", "cpu", None)),
        "ort_in": ({"placement": "inprocess"}, ("python-ort", "inprocess", "cpu", None)),
        # openvino holds its graphs in the pipeline whatever the placement asked
        "ov": ({"runtime": "openvino"}, ("openvino", "inprocess", "cpu", "fp32")),
        # pytorch on cuda with auto: fp16 where the writing machine sees no GPU (bf16 on one that has it)
        "pt": ({"runtime": "pytorch", "bundle": tiny_bundle}, ("pytorch", "inprocess", "cuda", "fp16")),
        "trt_in": (
            {"runtime": "tensorrt", "engines": plans, "placement": "inprocess"},
            ("tensorrt", "inprocess", "cuda", None),
        ),
    }
    for name, (kw, (runtime, placement, device, dtype)) in cases.items():
        repo = write_repository(tiny_onnx, tmp_path / name, scheduler="ddim", threads=3, **kw)
        config = parse_config(repo / "pipeline" / "config.pbtxt")
        params = PipelineParams.from_parameters(_plain(config))
        assert (params.runtime, params.placement, params.device, params.dtype) == (runtime, placement, device, dtype)
        assert params.scheduler == "ddim" and params.intra_op_threads == 3
        assert params.bundle == (str(tiny_bundle.resolve()) if runtime == "pytorch" else None)
        assert (params.bundle_identity, params.image_size) == (meta["bundle_identity"], meta["image_size"])
        assert params.has_image_encoder == ("image_encoder" in meta["components"])
        assert params.engine == config.parameters[PARAM_ENGINE].string_value and params.engine.endswith(", ddim")
        assert params.to_parameters() == _plain(config)  # nothing written that the reader drops
        # the client's model card keys, as core.protocol names them
        assert {PARAM_BUNDLE_IDENTITY, PARAM_IMAGE_SIZE, PARAM_HAS_IMAGE_ENCODER, PARAM_ENGINE} <= set(_plain(config))
        held = sorted(p.name for p in repo.iterdir())
        assert held == (["image_encoder", "pipeline", "text_encoder", "unet", "vae_decoder", "vae_encoder"]
                        if placement == "bls" else ["pipeline"])  # fmt: skip
    with pytest.raises(UserError, match="unknown placement 'shared'; choose one of bls, inprocess"):
        write_repository(tiny_onnx, tmp_path / "x", placement="shared")
    with pytest.raises(UserError, match="runtime onnxruntime is served with placement bls, not 'inprocess'"):
        write_repository(tiny_onnx, tmp_path / "y", runtime="onnxruntime", placement="inprocess")


def test_repo_cli_takes_placement_and_the_old_components_name(tiny_onnx, tmp_path):
    """--placement, and its old name --components rewritten with a note (the old spelling still works)."""
    for flag, value in (("--placement", "inprocess"), ("--components", "inprocess"), ("--components", "bls")):
        out = tmp_path / f"{flag[2:]}_{value}"
        r = rf("rf-export", "repo", str(tiny_onnx), "--out", str(out), flag, value)
        assert r.returncode == 0, r.stderr
        assert ("note: --components is now --placement" in r.stderr) == (flag == "--components")
        params = PipelineParams.from_parameters(_plain(parse_config(out / "pipeline" / "config.pbtxt")))
        assert params.placement == value and params.runtime == "python-ort"
        assert (out / "unet").is_dir() == (value == "bls")
    r = rf("rf-export", "repo", str(tiny_onnx), "--out", str(tmp_path / "bad"), "--components", "openvino")
    assert r.returncode == 2
    assert "Invalid value for '--placement': Value error, 'openvino' is not one of 'bls', 'inprocess'" in r.stderr
    r = rf("rf-export", "repo", "--help", env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})
    assert "--placement <bls|inprocess>" in r.stdout and "--components" not in r.stdout


@pytest.fixture
def pipeline_model(monkeypatch):
    """serving/triton_models/pipeline.py importable outside Triton: a stand-in for triton_python_backend_utils."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.PreferredMemory = lambda *a: ("memory", a)
    stub.TRITONSERVER_MEMORY_GPU, stub.TRITONSERVER_MEMORY_CPU = 1, 0
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    monkeypatch.delitem(sys.modules, "realfake.serving.triton_models.pipeline", raising=False)
    from realfake.serving.triton_models import pipeline

    return pipeline


def _triton_args(repo: Path) -> dict:
    from google.protobuf.json_format import MessageToDict

    config = MessageToDict(parse_config(repo / "pipeline" / "config.pbtxt"), preserving_proto_field_name=True)
    return {
        "model_config": json.dumps(config),
        "model_repository": str(repo / "pipeline"),
        "model_version": "1",
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
    }


def test_pipeline_model_builds_its_components_from_the_parameters(pipeline_model, tiny_onnx, tmp_path):
    from realfake.serving.components import OrtComponents

    inproc = write_repository(tiny_onnx, tmp_path / "inproc", placement="inprocess", scheduler="ddim")
    model = pipeline_model.TritonPythonModel()
    model.initialize(_triton_args(inproc))
    assert isinstance(model.sampler.components, OrtComponents) and model.sampler.scheduler_name == "ddim"
    bls = write_repository(tiny_onnx, tmp_path / "bls")
    model = pipeline_model.TritonPythonModel()
    model.initialize(_triton_args(bls))
    assert isinstance(model.sampler.components, pipeline_model.BlsComponents)
    assert model.sampler.components.names["unet"] == "unet"

    args = _triton_args(bls)
    config = json.loads(args["model_config"])
    config["parameters"]["runtime"] = {"string_value": "tvm"}
    with pytest.raises(UserError, match=r"^unknown runtime 'tvm'; this build supports: python-ort"):
        pipeline_model.TritonPythonModel().initialize({**args, "model_config": json.dumps(config)})


@pytest.mark.slow
def test_triton_names_an_unknown_runtime_when_the_pipeline_fails_to_load(tiny_repo, tmp_path):
    from realfake.client.server import LocalServer

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    config = repo / "pipeline" / "config.pbtxt"
    text = config.read_text()
    assert 'key: "runtime"\n  value: { string_value: "python-ort" }' in text
    config.write_text(text.replace('string_value: "python-ort"', 'string_value: "tvm"'))
    server = LocalServer(repo, ready_timeout=120)
    with pytest.raises(UserError, match=r"failed to load: pipeline"):
        server.start()
    assert "unknown runtime 'tvm'; this build supports: python-ort" in server.log_path.read_text(errors="replace")
