"""What a server reads from an ONNX export: its metadata (export.json), each graph with its external-weight
files and their digest, and the int8 UNet's file names. `rf-export` writes these; the serving side reads them."""

from __future__ import annotations

import json
from pathlib import Path

from realfake.core.errors import UserError
from realfake.core.files import file_sha256, files_sha256

EXPORT_META = "export.json"
INT8_UNET = Path("unet.int8.xml")  # OpenVINO IR; its weights are unet.int8.bin beside it

QUANTIZE_REPORT = "quantize.json"


def load_export_meta(onnx_dir: str | Path) -> dict:
    """export.json of an ONNX export directory (what `rf-export onnx` wrote), or one clear error."""
    path = Path(onnx_dir) / EXPORT_META
    if not path.is_file():
        raise UserError(f"{onnx_dir} is not an ONNX export (no export.json): run `rf-export onnx` first")
    return json.loads(path.read_text())


def graph_files(graph: str | Path) -> list[Path]:
    """An ONNX graph file and the external-data files its initializers point to; one clear error when any of
    those is missing (a graph copied without its weights)."""
    import onnx

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    missing = sorted(loc for loc in locations if not (graph.parent / loc).is_file())
    if missing:
        raise UserError(f"{graph} keeps its weights in {', '.join(missing)}, which is missing beside it")
    return [graph] + [graph.parent / loc for loc in sorted(locations)]


def graph_sha256(graph: str | Path) -> str:
    """sha256 over a graph and its external weights: a re-finetuned model whose graph file is byte-identical
    (same architecture, weights outside) still gets a new digest, so engines and int8 models built from the old
    weights are noticed as stale."""
    files = graph_files(graph)
    return file_sha256(files[0]) if len(files) == 1 else files_sha256(files)
