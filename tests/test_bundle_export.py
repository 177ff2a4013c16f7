"""The bundle contract, the offline CLIP tokenizer, ONNX export and its parity report, repository configs."""

import json
import shutil

import numpy as np
import onnx
import pytest

from realfake.core.errors import UserError
from realfake.export.onnx_export import check_parity, parity_batches
from realfake.export.tiny_bundle import clip_tokenizer
from realfake.serving.model_bundle import check_bundle

from conftest import rf


def test_tokenizer_is_real_clip_bpe():
    tok = clip_tokenizer()
    # ids of the released CLIP vocabulary (openai/clip-vit-large-patch14): "a photo of a cat"
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    padded = tok("tench", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_tiny_bundle_layout(tiny_bundle):
    info = check_bundle(tiny_bundle)
    index = json.loads((tiny_bundle / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder"} <= set(index)
    assert info.has_image_encoder and info.image_size == 32 and info.text_hidden_size == 32


def test_bundle_missing_component_is_one_clear_line(tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(UserError, match="missing component.*unet"):
        check_bundle(broken)
    result = rf("rf-export", "onnx", str(broken), "--out", str(tmp_path / "onnx"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: bundle {broken} is missing component(s): unet"]


def test_image_encoder_width_must_match_text(tiny_bundle, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(tiny_bundle, broken)
    cfg_path = broken / "image_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="projection_dim 64"):
        check_bundle(broken)


def test_onnx_export_parity_report(tiny_onnx):
    report = json.loads((tiny_onnx / "parity.json").read_text())
    assert report["ok"] is True
    assert set(report["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "image_encoder"}
    for name, row in report["components"].items():
        assert set(row) == {f"batch{b}" for b in parity_batches(name)}
        assert all(v is not None and v < report["tolerance"] for v in row.values()), name
    # dynamic batch axis: the graph input's first dim is symbolic
    graph = onnx.load(str(tiny_onnx / "unet.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_parity_failure_is_detected(tiny_bundle, tiny_onnx, tmp_path):
    """A corrupted graph (one weight scaled) must fail the parity check with a clear message and exit 2."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_onnx, bad)
    model = onnx.load(str(bad / "vae_decoder.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init) * 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(model, str(bad / "vae_decoder.onnx"))
    with pytest.raises(UserError, match="vae_decoder: max \\|ONNX - PyTorch\\|"):
        check_parity(tiny_bundle, bad, log=lambda *_: None)
    assert json.loads((bad / "parity.json").read_text())["ok"] is False
    result = rf("rf-export", "parity", str(tiny_bundle), str(bad))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "ONNX parity failed" in result.stderr


def test_repository_configs_parse_back(tiny_repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    names = sorted(p.name for p in tiny_repo.iterdir() if (p / "config.pbtxt").is_file())
    assert names == ["image_encoder", "pipeline", "text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for name in names:
        cfg = text_format.Parse((tiny_repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == name and cfg.backend == "python"
        assert (tiny_repo / name / "1" / "model.py").is_file()
    pipe = text_format.Parse((tiny_repo / "pipeline" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert pipe.max_batch_size > 0 and pipe.HasField("dynamic_batching")
    assert {i.name for i in pipe.input if i.optional} >= {"STEPS", "INIT_IMAGE", "STRENGTH"}
    unet = text_format.Parse((tiny_repo / "unet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [list(i.dims) for i in unet.input] == [[-1, 4, -1, -1], [-1], [-1, 77, 32]]


def test_repo_from_a_non_export_dir_fails(tmp_path):
    result = rf("rf-export", "repo", str(tmp_path), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "no export.json" in result.stderr


def test_large_graphs_keep_their_weights_beside_them(tiny_bundle, tiny_onnx, tmp_path):
    """Above the size limit (forced to 0 bytes here; SD-1.5's UNet is above the real one) each graph's weights go
    to one `<name>.onnx.data`: the images are those of the single-file export, the digest covers the weights,
    repositories link the weights where the graph looks for them (served for real), and a re-export under the
    limit leaves no stale weights file."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import PipelineClient
    from realfake.export.onnx_export import export_onnx
    from realfake.export.triton_repo import write_repository
    from realfake.serving.components import OrtComponents
    from realfake.serving.export_files import graph_files, graph_sha256
    from realfake.serving.sampler import Sampler, Settings

    out = tmp_path / "ext"
    export_onnx(tiny_bundle, out, log=lambda *_: None, external_data_above=0)
    names = json.loads((out / "export.json").read_text())["components"]
    for name in names:
        assert graph_files(out / f"{name}.onnx") == [out / f"{name}.onnx", out / f"{name}.onnx.data"]
    assert (out / "unet.onnx").stat().st_size < 0.2 * (out / "unet.onnx.data").stat().st_size
    assert (out / "unet.onnx.data").stat().st_mode == (out / "unet.onnx").stat().st_mode  # readable as the graph
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no export folders left behind

    args = (["photo of a cat", "photo of a ship"], ["blurry"] * 2, [3, 4], Settings(steps=6, guidance_scale=2.0))
    single = Sampler(OrtComponents(tiny_onnx), tiny_onnx).generate(*args)
    assert np.array_equal(Sampler(OrtComponents(out), out).generate(*args), single)

    digest = graph_sha256(out / "unet.onnx")
    data = out / "unet.onnx.data"
    original = data.read_bytes()
    data.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))  # a weight changed, the graph not
    assert graph_sha256(out / "unet.onnx") != digest
    data.write_bytes(original)
    assert graph_sha256(out / "unet.onnx") == digest

    gpu_repo = write_repository(out, tmp_path / "ort_gpu", runtime="onnxruntime")
    assert sorted(p.name for p in (gpu_repo / "unet" / "1").iterdir()) == ["model.onnx", "unet.onnx.data"]
    inprocess = write_repository(out, tmp_path / "inproc", placement="inprocess")
    files = inprocess / "pipeline" / "1" / "model_files"
    assert all((files / f"{n}.onnx.data").is_file() for n in names)
    cpu_repo = write_repository(out, tmp_path / "bls")
    request = {
        "PROMPT": np.array([[b"photo of a cat"], [b"photo of a ship"]], dtype=object),
        "NEGATIVE_PROMPT": np.array([[b"blurry"]] * 2, dtype=object),
        "SEED": np.array([[3], [4]]),
        "STEPS": np.full((2, 1), 6, np.int32),
    }
    with LocalServer(cpu_repo) as server:
        assert np.array_equal(PipelineClient(server.url).infer(request), single)

    moved = tmp_path / "vae_decoder.onnx.data"
    (out / "vae_decoder.onnx.data").rename(moved)  # a graph copied without its weights: said, not linked
    with pytest.raises(UserError, match=r"vae_decoder.onnx keeps its weights in vae_decoder.onnx.data, which is"):
        write_repository(out, tmp_path / "broken", runtime="onnxruntime")
    moved.rename(out / "vae_decoder.onnx.data")

    export_onnx(tiny_bundle, out, log=lambda *_: None)  # under the default limit: single files again
    assert not list(out.glob("*.data")) and graph_files(out / "unet.onnx") == [out / "unet.onnx"]


def test_export_holds_one_component_at_a_time(tiny_bundle, tmp_path, monkeypatch):
    """At SD-1.5 size the export must not hold every module at once: each component is loaded alone, exported,
    checked, and gone (no live reference) before the next one loads."""
    import gc
    import weakref

    import realfake.export.onnx_export as ox
    from realfake.serving.model_bundle import load_torch_modules

    alive, loads = [], []

    def loading(bundle, only=None):
        gc.collect()
        loads.append((tuple(only or ()), sum(ref() is not None for ref in alive)))
        info, modules = load_torch_modules(bundle, only=only)
        alive.extend(weakref.ref(m) for m in modules.values())
        return info, modules

    monkeypatch.setattr(ox, "load_torch_modules", loading)
    report = ox.export_onnx(tiny_bundle, tmp_path / "onnx", log=lambda *_: None)
    names = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "image_encoder")
    assert loads == [((name,), 0) for name in names]  # one component a load, none still alive from before
    assert report["ok"] and set(report["components"]) == set(names)
    assert set(report["components"]["vae_decoder"]) == {"batch1", "batch2"}
    assert set(report["components"]["text_encoder"]) == {"batch1", "batch8"}
