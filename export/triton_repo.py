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

from realfake.core.defaults import DEFAULT_SCHEDULER
from realfake.core.errors import UserError
from realfake.core.files import files_sha256, link_or_copy
from realfake.core.protocol import PIPELINE_INPUTS, PIPELINE_MODEL, PIPELINE_OUTPUTS
from realfake.serving.export_files import INT8_UNET, QUANTIZE_REPORT, graph_files, graph_sha256, load_export_meta
from realfake.serving.pipeline_params import (
    PARAM_INTRA_OP_THREADS,
    RUNTIMES,
    PipelineParams,
    check_runtime,
    served_placement,
)

DEFAULT_MAX_BATCH = 32
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


def component_config(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], threads: int, runtime: str = "python-ort"
) -> str:
    """One component model. Batching is done by the pipeline (it sends whole batches), so max_batch_size is 0
    and the batch axis is an explicit dimension.

    python-ort: Python backend running ONNX Runtime (the CPU path); onnxruntime: Triton's native
    onnxruntime_onnx on the GPU; tensorrt: a tensorrt_plan built by `rf-export engines`.
    """
    if runtime == "python-ort":
        head, kind, params = 'backend: "python"\n', "KIND_CPU", {PARAM_INTRA_OP_THREADS: str(threads)}
    elif runtime == "onnxruntime":
        head, kind, params = 'platform: "onnxruntime_onnx"\ndefault_model_filename: "model.onnx"\n', "KIND_GPU", {}
    elif runtime == "tensorrt":
        head, kind, params = 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n', "KIND_GPU", {}
    else:
        raise UserError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return (
        f'name: "{name}"\n{head}max_batch_size: 0\n'
        + _tensor_block("input", inputs)
        + _tensor_block("output", outputs)
        + f"instance_group [ {{ count: 1, kind: {kind} }} ]\n"
        + _parameters(params)
    )


def pipeline_config(
    params: PipelineParams,
    max_batch: int,
    queue_delay_us: int,
    gpu: bool = False,
    preferred: tuple[int, ...] = (),
) -> str:
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
    sizes = "".join(f"\n  preferred_batch_size: {b}" for b in preferred if b <= max_batch)
    return (
        f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _tensor_block("input", inputs)
        + _tensor_block("output", outputs)
        + f"dynamic_batching {{{sizes}\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        + f"instance_group [ {{ count: 1, kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
        + _parameters(params.to_parameters())
    )


def _link_graph(graph: Path, folder: Path, name: str | None = None) -> None:
    """Link a graph into `folder` (renamed to `name` if given) with its external-weight files under their own
    names, where the graph looks for them."""
    first, *weights = graph_files(graph)
    link_or_copy(first, folder / (name or first.name))
    for path in weights:
        link_or_copy(path, folder / path.name)


def _plans(engines: Path | None, onnx_dir: Path, components: list[str], max_batch: int | None):
    """The plan of each component for this export (and this machine's GPU when one is visible), and the pipeline
    batch: the plans' largest profile batch unless `max_batch` asks for less; more is refused, since TensorRT
    cannot run a shape outside its optimisation profile."""
    from realfake.serving.tensorrt_plans import installed_tensorrt_version, select_plans, visible_gpu

    if engines is None or not Path(engines).is_dir():
        raise UserError("--runtime tensorrt needs --engines: the folder `rf-export engines` wrote")
    plans = select_plans(Path(engines), onnx_dir, components, visible_gpu(), installed_tensorrt_version())
    limit = min(p.max_images for p in plans.values())
    if max_batch is not None and max_batch > limit:
        raise UserError(
            f"--max-batch-size {max_batch} is larger than the TensorRT plans' profile allows ({limit} images): "
            f"rebuild them with `rf-export engines --batch-sizes ...,{max_batch}` or lower --max-batch-size"
        )
    return {name: p.path for name, p in plans.items()}, max_batch or limit


def _check_openvino(onnx_dir: Path, dtype: str) -> None:
    """The openvino runtime's precision is known and, for int8, the quantized UNet matches this export."""
    from realfake.serving.openvino_components import DTYPES

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--runtime openvino takes --precision {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, not {dtype!r}")
    if dtype != "int8":
        return
    report = onnx_dir / QUANTIZE_REPORT
    if not (onnx_dir / INT8_UNET).is_file() or not report.is_file():
        raise UserError(
            f"--precision int8 needs the int8 UNet: run `rf-export quantize {onnx_dir} --out {onnx_dir}` first, "
            "or point at the directory quantize wrote"
        )
    if json.loads(report.read_text()).get("unet_onnx_sha256") != graph_sha256(onnx_dir / "unet.onnx"):
        raise UserError(f"the int8 UNet in {onnx_dir} was made from another unet.onnx: run `rf-export quantize` again")


def _resolved_precision(runtime: str, device: str, precision: str) -> str:
    """The precision a pipeline of `runtime` on `device` computes in (the one `auto` rule; realfake.core.precision).
    A pytorch pipeline on a GPU asks the GPU this machine sees (the serving node writes its repository: the Docker
    entrypoint does), so the engine identity names the precision that computes; with none visible, fp16, which
    every GPU runs."""
    from realfake.core.precision import resolve_precision

    gpu = not device.startswith("cpu")
    if runtime == "pytorch" and gpu and precision == "auto":
        try:
            import torch

            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        except ImportError:
            bf16 = False
        return resolve_precision(precision, gpu=True, bf16=bf16)
    if runtime == "pytorch" and precision == "int8":
        raise UserError("--runtime pytorch takes --precision auto, fp32, fp16 or bf16, not int8")
    return resolve_precision(precision, gpu=gpu and runtime == "pytorch", bf16=False)


def engine_identity(
    runtime: str, device: str, dtype: str, scheduler: str, onnx_dir: Path, plans: dict[str, Path]
) -> str:
    """A short description of what computes the images, for the client to record and compare: runtime and
    device, precision, a digest of the runtime's own artifacts where they are not the bundle's graphs (TensorRT
    plans, which differ between builds; the int8 UNet), and the scheduler."""

    def digest(files) -> str:
        return files_sha256(files)[:12]

    where = "cuda" if device.startswith("cuda") else "cpu"
    if runtime == "tensorrt":
        meta = json.loads(next(iter(plans.values())).with_suffix(".json").read_text())
        arch = "sm" + "".join(str(n) for n in meta["compute_capability"])
        precision = meta.get("precision") or ("fp16" if meta.get("fp16", True) else "fp32")  # older plans: a flag
        label = f"tensorrt-{meta['tensorrt_version']} {arch} {precision} {digest(plans[k] for k in sorted(plans))}"
    elif runtime == "openvino":
        label = f"openvino-cpu {dtype}"
        if dtype == "int8":
            label += f" {digest([onnx_dir / INT8_UNET, onnx_dir / INT8_UNET.with_suffix('.bin')])}"
    elif runtime == "pytorch":
        label = f"pytorch-{where} {dtype}"
    else:  # python-ort (CPU, or CUDA in-process) and onnxruntime (native, GPU)
        label = f"onnxruntime-{'cuda' if runtime == 'onnxruntime' else where} fp32"
    return f"{label}, {scheduler}"


def write_repository(
    onnx_dir: str | Path,
    out: str | Path,
    *,
    runtime: str = "python-ort",
    scheduler: str = DEFAULT_SCHEDULER,
    max_batch: int | None = None,
    queue_delay_us: int = 5000,
    threads: int | None = None,
    placement: str = "bls",
    engines: str | Path | None = None,
    bundle: str | Path | None = None,
    preferred: tuple[int, ...] = (4, 8, 16),
    device: str | None = None,
    precision: str = "auto",
    memory_budget_gb: float | None = None,
) -> Path:
    """Fill `out` with the component models and the `pipeline` model for `runtime`.

    `placement`: `bls` serves each graph as its own model and the pipeline calls them by BLS; `inprocess`
    puts the graphs inside the pipeline model (one process, no copies between steps; with `tensorrt`, the plans
    run inside each pipeline instance, on that instance's GPU). Runtimes: `python-ort`
    (CPU), `onnxruntime` and `tensorrt` (native GPU component models; tensorrt takes the plans from `engines`),
    `pytorch` (the bundle's modules on the GPU in fp16 inside the pipeline model; needs `bundle`), `openvino`
    (CPU, the graphs inside the pipeline model; `precision` fp32, bf16, or int8 after `rf-export quantize`).
    openvino and pytorch always run inside the pipeline model, whatever `placement` says; onnxruntime only as
    component models (realfake.serving.pipeline_params.SERVED).
    `max_batch`: the largest batch the pipeline's dynamic batcher forms; default 32, or for `tensorrt` the
    largest image batch the plans' profiles allow (a larger value is refused).
    `memory_budget_gb` (CPU servers; default this machine's memory): the pipeline samples at most the images
    that fit it per call (export.memory), splitting a larger batch before it runs, and decodes one image per VAE
    call; a model that does not fit one image is refused.
    """
    onnx_dir, out = Path(onnx_dir), Path(out)
    check_runtime(runtime)
    fixed = {  # runtimes that compute in one precision: the one they take besides auto, and why
        "python-ort": ("fp32", "the fp32 graphs"),
        "onnxruntime": ("fp32", "the fp32 graphs"),
        "tensorrt": ("auto", "the plans' own precision (`rf-export engines --precision`)"),
    }
    if runtime in fixed and precision not in ("auto", fixed[runtime][0]):
        raise UserError(f"--runtime {runtime} runs {fixed[runtime][1]}: leave --precision out, not {precision!r}")
    meta = load_export_meta(onnx_dir)
    placement = served_placement(runtime, placement)
    if runtime == "openvino":
        if device not in (None, "cpu"):
            raise UserError("--runtime openvino runs on the CPU: leave --device out or pass cpu")
        _check_openvino(onnx_dir, precision)
    elif runtime == "pytorch":
        if bundle is None or not (Path(bundle) / "model_index.json").is_file():
            raise UserError("--runtime pytorch needs --bundle: the diffusers-layout directory the ONNX came from")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"--max-batch-size must be >= 1, got {max_batch}")
    plans = {}
    if runtime == "tensorrt":
        plans, max_batch = _plans(engines, onnx_dir, meta["components"], max_batch)
    max_batch = max_batch or DEFAULT_MAX_BATCH
    threads = threads or os.cpu_count() or 1
    device = device or ("cpu" if runtime in ("python-ort", "openvino") else "cuda")
    resolved = _resolved_precision(runtime, device, precision)
    params = PipelineParams(
        placement=placement,
        runtime=runtime,
        device=device,
        intra_op_threads=threads,
        bundle_identity=meta["bundle_identity"],
        image_size=int(meta["image_size"]),
        has_image_encoder="image_encoder" in meta["components"],
        trained_with_guidance_token=bool(meta.get("trained_with_guidance_token", False)),
        engine=engine_identity(runtime, device, resolved, scheduler, onnx_dir, plans),
        scheduler=scheduler,
        dtype=resolved if runtime in ("openvino", "pytorch") else None,
        bundle=str(Path(bundle).resolve()) if runtime == "pytorch" else None,
    )
    if device == "cpu":
        from dataclasses import replace

        from realfake.export.memory import images_per_run, machine_memory

        if memory_budget_gb is not None and memory_budget_gb <= 0:
            raise UserError(f"--memory-budget must be > 0 GB, got {memory_budget_gb}")
        budget = memory_budget_gb * 1e9 if memory_budget_gb else machine_memory()
        fit = images_per_run(onnx_dir, budget, processes=len(meta["components"]) + 1 if placement == "bls" else 1)
        params = replace(params, vae_slice=1, max_images_per_run=min(fit, max_batch), memory_budget_gb=budget / 1e9)
    kind = params.components_kind()
    out.mkdir(parents=True, exist_ok=True)
    for name in meta["components"] if kind == "bls" else []:
        graph = onnx_dir / f"{name}.onnx"
        if not graph.is_file():
            raise UserError(f"{graph} is missing from the export")
        inputs, outputs = onnx_io(graph)
        version = out / name / "1"
        if version.exists():
            shutil.rmtree(version)
        version.mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(component_config(name, inputs, outputs, threads, runtime))
        if runtime == "tensorrt":
            link_or_copy(plans[name], version / "model.plan")
        else:
            _link_graph(graph, version, "model.onnx")
        if runtime == "python-ort":
            shutil.copy2(MODELS_SRC / "ort_component.py", version / "model.py")
    files = out / PIPELINE_MODEL / "1" / "model_files"
    if files.exists():
        shutil.rmtree(files)
    files.mkdir(parents=True)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(onnx_dir / sub, files / sub)
    shutil.copy2(onnx_dir / "export.json", files / "export.json")
    if kind in ("ort", "openvino"):
        for name in meta["components"]:
            _link_graph(onnx_dir / f"{name}.onnx", files)
        if kind == "openvino" and precision == "int8":
            for path in (INT8_UNET, INT8_UNET.with_suffix(".bin")):
                link_or_copy(onnx_dir / path, files / path)
    if kind == "tensorrt":
        for name, plan in plans.items():
            link_or_copy(plan, files / "engines" / f"{name}.plan")
            link_or_copy(plan.with_suffix(".json"), files / "engines" / f"{name}.json")
    if kind != "bls":  # the pipeline holds the components: a rewritten repository keeps no stale models
        for name in meta["components"]:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    shutil.copy2(MODELS_SRC / "pipeline.py", out / PIPELINE_MODEL / "1" / "model.py")
    gpu = device != "cpu"
    config = pipeline_config(params, max_batch, queue_delay_us, gpu=gpu, preferred=preferred if gpu else ())
    (out / PIPELINE_MODEL / "config.pbtxt").write_text(config)
    return out
