"""The `pipeline` model's parameters in config.pbtxt, said once: `rf-export repo` writes them
(`PipelineParams.to_parameters`), the pipeline model reads them back (`PipelineParams.from_parameters`), and the
client reads the model-card ones (their key names are in realfake.core.protocol).

Two choices decide what the pipeline model builds:
  placement  where the five graphs run: `bls` (each its own model in the repository, called by BLS) or
             `inprocess` (inside the pipeline model's process);
  runtime    what runs them: `python-ort` (ONNX Runtime in Python, CPU or CUDA), `onnxruntime` (Triton's native
             onnxruntime_onnx models, GPU), `tensorrt` (plans from `rf-export engines`), `openvino` (CPU), `pytorch`
             (the bundle's own modules).
Not every pair is served (SERVED); `components_kind` names what each served pair builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from realfake.core.defaults import DEFAULT_SCHEDULER, PLACEMENTS, RUNTIMES
from realfake.core.errors import UserError
from realfake.core.protocol import (
    PARAM_BUNDLE_IDENTITY,
    PARAM_ENGINE,
    PARAM_HAS_IMAGE_ENCODER,
    PARAM_IMAGE_SIZE,
    PARAM_TRAINED_WITH_GUIDANCE_TOKEN,
)

# the placements each runtime is served with
SERVED = {
    "python-ort": ("bls", "inprocess"),
    "onnxruntime": ("bls",),  # native GPU component models only
    "tensorrt": ("bls", "inprocess"),  # inprocess: the plans inside each pipeline instance, on its own GPU
    "openvino": ("inprocess",),  # always inside the pipeline model
    "pytorch": ("inprocess",),  # the bundle's modules, always inside the pipeline model
}

# the keys of config.pbtxt that are not the model card's
PARAM_PLACEMENT = "placement"
PARAM_RUNTIME = "runtime"
PARAM_DEVICE = "device"
PARAM_DTYPE = "dtype"
PARAM_INTRA_OP_THREADS = "intra_op_threads"
PARAM_SCHEDULER = "scheduler"
PARAM_BUNDLE = "bundle"
PARAM_VAE_SLICE = "vae_slice"
PARAM_MAX_IMAGES = "max_images_per_run"
PARAM_MEMORY_BUDGET = "memory_budget_gb"


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; this build supports: {', '.join(RUNTIMES)}")


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise UserError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")


def bls_across_gpus(placement: str, runtime: str, device: str, gpus: int) -> str | None:
    """Why a server that sees `gpus` GPUs must not serve a pipeline of this placement and runtime, or None.
    Triton sends a BLS call to any instance of the model called, and each component has an instance on every GPU:
    a pipeline instance on GPU 0 may run its UNet on GPU 3, so every step's tensors cross between GPUs and one
    GPU's queue fills while another idles."""
    if placement != "bls" or gpus <= 1 or not (runtime in ("onnxruntime", "tensorrt") or device.startswith("cuda")):
        return None
    fix = "one server per GPU (CUDA_VISIBLE_DEVICES=K for each, as deploy/node.sh runs them)"
    if "inprocess" in SERVED[runtime]:
        fix += " or --placement inprocess (the graphs inside each pipeline instance, on its own GPU)"
    else:
        fix += " or --runtime tensorrt --placement inprocess"
    return (
        f"this server sees {gpus} GPUs, and with placement bls a pipeline instance's BLS calls may run on another "
        f"GPU's {runtime} component: run {fix}"
    )


def _not_served(runtime: str, placement: str) -> str:
    return f"runtime {runtime} is served with placement {' or '.join(SERVED[runtime])}, not {placement!r}"


def served_placement(runtime: str, placement: str) -> str:
    """The placement a repository for `runtime` gets when the user asks for `placement`: the runtimes that only
    run inside the pipeline model (openvino, pytorch) get `inprocess` whatever was asked; a placement the runtime
    is not served with otherwise is refused."""
    check_runtime(runtime)
    check_placement(placement)
    if placement in SERVED[runtime]:
        return placement
    if SERVED[runtime] == ("inprocess",):
        return "inprocess"
    raise UserError(_not_served(runtime, placement))


@dataclass(frozen=True)
class PipelineParams:
    """Everything the `pipeline` model's config.pbtxt says about it, checked on construction."""

    placement: str  # PLACEMENTS
    runtime: str  # RUNTIMES
    device: str  # cpu, cuda (each GPU instance then takes its own GPU) or cuda:N
    intra_op_threads: int  # CPU threads of the in-process runtimes; 0: the runtime's default
    # the model card the client reads
    bundle_identity: str
    image_size: int
    has_image_encoder: bool
    engine: str  # what computes the images (export.triton_repo.engine_identity)
    trained_with_guidance_token: bool = False  # the bundle's realfake.json says so
    scheduler: str = DEFAULT_SCHEDULER
    dtype: str | None = None  # openvino: fp32, bf16, int8; pytorch: auto, fp32, fp16, bf16; unused otherwise
    bundle: str | None = None  # pytorch: the bundle's directory
    vae_slice: int = 0  # images per VAE call; 0: the whole batch (GPU servers)
    # images per sampler call, from the memory budget (export.memory); 0: the dynamic batcher's max batch. A larger
    # batch is split before it runs, since the kernel kills a process that runs out before Python sees MemoryError
    max_images_per_run: int = 0
    memory_budget_gb: float | None = None  # the budget max_images_per_run was derived from (CPU servers)

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        check_placement(self.placement)
        if self.placement not in SERVED[self.runtime]:
            raise UserError(_not_served(self.runtime, self.placement))
        if self.runtime == "pytorch" and not self.bundle:
            raise UserError(f"runtime pytorch needs the {PARAM_BUNDLE!r} parameter: the bundle's directory")
        if self.vae_slice < 0 or self.max_images_per_run < 0:
            raise UserError(f"{PARAM_VAE_SLICE} and {PARAM_MAX_IMAGES} must be >= 0")
        if self.intra_op_threads < 0:
            raise UserError(f"{PARAM_INTRA_OP_THREADS} must be >= 0, got {self.intra_op_threads}")

    def components_kind(self) -> str:
        """What the pipeline model builds its components from: `bls` (BLS calls to the component models), `ort`
        (ONNX Runtime sessions in process), `tensorrt` (the plans in process), `openvino` or `torch`."""
        if self.placement == "bls":
            return "bls"
        return {"python-ort": "ort", "tensorrt": "tensorrt", "openvino": "openvino", "pytorch": "torch"}[self.runtime]

    def to_parameters(self) -> dict[str, str]:
        """The `parameters` of config.pbtxt, key -> string value (the optional ones only when set)."""
        values = {
            PARAM_PLACEMENT: self.placement,
            PARAM_RUNTIME: self.runtime,
            PARAM_DEVICE: self.device,
            PARAM_INTRA_OP_THREADS: str(self.intra_op_threads),
            PARAM_SCHEDULER: self.scheduler,
            PARAM_BUNDLE_IDENTITY: self.bundle_identity,
            PARAM_IMAGE_SIZE: str(self.image_size),
            PARAM_HAS_IMAGE_ENCODER: _flag(self.has_image_encoder),
            PARAM_TRAINED_WITH_GUIDANCE_TOKEN: _flag(self.trained_with_guidance_token),
            PARAM_ENGINE: self.engine,
            PARAM_DTYPE: self.dtype,
            PARAM_BUNDLE: self.bundle,
            PARAM_VAE_SLICE: str(self.vae_slice),
            PARAM_MAX_IMAGES: str(self.max_images_per_run),
            PARAM_MEMORY_BUDGET: None if self.memory_budget_gb is None else f"{self.memory_budget_gb:.1f}",
        }
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str | Mapping[str, str]]) -> PipelineParams:
        """Read back the parameters: plain strings (as `to_parameters` gives them) or Triton's model config form,
        key -> {"string_value": ...} (`json.loads(args["model_config"])["parameters"]` in the pipeline model).
        A missing key or an unknown value raises UserError with one line naming it."""
        raw = {k: v.get("string_value", "") if isinstance(v, Mapping) else v for k, v in parameters.items()}

        def need(key: str) -> str:
            if key not in raw:
                raise UserError(
                    f"the pipeline model's parameters lack {key!r}: write the repository with rf-export repo"
                )
            return raw[key]

        def integer(key: str) -> int:
            value = need(key)
            try:
                return int(value)
            except ValueError:
                raise UserError(f"parameter {key!r} must be an integer, not {value!r}") from None

        def boolean(key: str, value: str) -> bool:
            if value not in ("true", "false"):
                raise UserError(f"parameter {key!r} must be true or false, not {value!r}")
            return value == "true"

        return cls(
            placement=need(PARAM_PLACEMENT),
            runtime=need(PARAM_RUNTIME),
            device=need(PARAM_DEVICE),
            intra_op_threads=integer(PARAM_INTRA_OP_THREADS),
            bundle_identity=need(PARAM_BUNDLE_IDENTITY),
            image_size=integer(PARAM_IMAGE_SIZE),
            has_image_encoder=boolean(PARAM_HAS_IMAGE_ENCODER, need(PARAM_HAS_IMAGE_ENCODER)),
            engine=need(PARAM_ENGINE),
            # repositories written before the record existed lack it: their bundles had none
            trained_with_guidance_token=boolean(
                PARAM_TRAINED_WITH_GUIDANCE_TOKEN, raw.get(PARAM_TRAINED_WITH_GUIDANCE_TOKEN, "false")
            ),
            scheduler=need(PARAM_SCHEDULER),
            dtype=raw.get(PARAM_DTYPE),
            bundle=raw.get(PARAM_BUNDLE),
            # repositories written before these existed: no slicing, the batcher's bound
            vae_slice=int(raw.get(PARAM_VAE_SLICE, "0") or 0),
            max_images_per_run=int(raw.get(PARAM_MAX_IMAGES, "0") or 0),
            memory_budget_gb=float(raw[PARAM_MEMORY_BUDGET]) if raw.get(PARAM_MEMORY_BUDGET) else None,
        )


def _flag(value: bool) -> str:
    return "true" if value else "false"
