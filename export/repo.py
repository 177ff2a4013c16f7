"""`rf-export repo`: write a Triton model repository from an ONNX export directory.

Every config.pbtxt is generated here, one small function per model kind, so repositories for different
runtimes never drift apart by hand edits.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from realfake.client.errors import UserError
from realfake.client.protocol import (
    PARAM_BUNDLE_IDENTITY,
    PARAM_HAS_IMAGE_ENCODER,
    PARAM_IMAGE_SIZE,
    PIPELINE_INPUTS,
    PIPELINE_MODEL,
    PIPELINE_OUTPUTS,
)

RUNTIMES = ("python-ort",)
COMPONENT_MODES = ("bls", "inprocess")
MODELS_SRC = Path(__file__).resolve().parent.parent / "serving" / "triton_models"
ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 6: "TYPE_INT32", 10: "TYPE_FP16", 9: "TYPE_BOOL", 2: "TYPE_UINT8"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton config type, e.g. TYPE_FP32
    dims: tuple[int, ...]  # -1 for dynamic
    optional: bool = False


def onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph as Triton tensor specs (symbolic dims become -1)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(value.name, ONNX_TO_TRITON[t.elem_type], dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in init_names]
    return inputs, [spec(v) for v in model.graph.output]


def _tensor_block(kind: str, specs: list[TensorSpec]) -> str:
    rows = []
    for s in specs:
        dims = ", ".join(str(d) for d in s.dims)
        optional = "\n    optional: true" if s.optional else ""
        rows.append(f'  {{\n    name: "{s.name}"\n    data_type: {s.dtype}\n    dims: [ {dims} ]{optional}\n  }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in sorted(params.items())
    )


def component_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], threads: int) -> str:
    """A component served by the Python backend on ONNX Runtime; batching is done by the pipeline."""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _tensor_block("input", inputs)
        + _tensor_block("output", outputs)
        + "instance_group [ { count: 1, kind: KIND_CPU } ]\n"
        + _parameters({"intra_op_threads": str(threads)})
    )


def pipeline_config(params: dict[str, str], max_batch: int, queue_delay_us: int) -> str:
    to_type = {
        "BYTES": "TYPE_STRING",
        "INT64": "TYPE_INT64",
        "INT32": "TYPE_INT32",
        "FP32": "TYPE_FP32",
        "UINT8": "TYPE_UINT8",
        "BOOL": "TYPE_BOOL",
    }
    inputs = [TensorSpec(n, to_type[t], tuple(d), opt) for n, (t, d, opt) in PIPELINE_INPUTS.items()]
    outputs = [TensorSpec(n, to_type[t], tuple(d)) for n, (t, d) in PIPELINE_OUTPUTS.items()]
    return (
        f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _tensor_block("input", inputs)
        + _tensor_block("output", outputs)
        + f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        + "instance_group [ { count: 1, kind: KIND_CPU } ]\n"
        + _parameters(params)
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_repository(
    onnx_dir: str | Path,
    out: str | Path,
    *,
    runtime: str = "python-ort",
    scheduler: str = "unipc",
    max_batch: int = 32,
    queue_delay_us: int = 5000,
    threads: int | None = None,
    components: str = "bls",
) -> Path:
    """Fill `out` with the component models and the `pipeline` model for `runtime`.

    `components`: `bls` serves each graph as its own model and the pipeline calls them by BLS; `inprocess`
    puts the graphs inside the pipeline model (one process, no copies between steps).
    """
    onnx_dir, out = Path(onnx_dir), Path(out)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; this build supports: {', '.join(RUNTIMES)}")
    meta_path = onnx_dir / "export.json"
    if not meta_path.is_file():
        raise UserError(f"{onnx_dir} is not an ONNX export (no export.json): run `rf-export onnx` first")
    meta = json.loads(meta_path.read_text())
    if components not in COMPONENT_MODES:
        raise UserError(f"unknown components mode {components!r}; choose one of {', '.join(COMPONENT_MODES)}")
    threads = threads or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    for name in meta["components"] if components == "bls" else []:
        graph = onnx_dir / f"{name}.onnx"
        if not graph.is_file():
            raise UserError(f"{graph} is missing from the export")
        inputs, outputs = onnx_io(graph)
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(component_config(name, inputs, outputs, threads))
        _link_or_copy(graph, out / name / "1" / "model.onnx")
        shutil.copy2(MODELS_SRC / "ort_component.py", out / name / "1" / "model.py")
    files = out / PIPELINE_MODEL / "1" / "model_files"
    if files.exists():
        shutil.rmtree(files)
    files.mkdir(parents=True)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(onnx_dir / sub, files / sub)
    shutil.copy2(meta_path, files / "export.json")
    if components == "inprocess":
        for name in meta["components"]:
            _link_or_copy(onnx_dir / f"{name}.onnx", files / f"{name}.onnx")
        for name in meta["components"]:  # a repository rewritten from bls mode keeps no stale component models
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    shutil.copy2(MODELS_SRC / "pipeline.py", out / PIPELINE_MODEL / "1" / "model.py")
    params = {
        "scheduler": scheduler,
        PARAM_BUNDLE_IDENTITY: meta["bundle_identity"],
        PARAM_IMAGE_SIZE: str(meta["image_size"]),
        PARAM_HAS_IMAGE_ENCODER: str("image_encoder" in meta["components"]).lower(),
        "components": components,
        "intra_op_threads": str(threads),
    }
    (out / PIPELINE_MODEL / "config.pbtxt").write_text(pipeline_config(params, max_batch, queue_delay_us))
    return out
