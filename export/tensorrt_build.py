"""`rf-export engines`: ONNX -> TensorRT fp16 plans with optimisation profiles, a shared timing cache, and a
metadata JSON per plan; a plan built for another GPU, TensorRT version, ONNX graph or profile is rebuilt. Each
new plan is run against ONNX Runtime (fp32) on the same seeded inputs; its error is recorded in its metadata and
in engines.json, and a plan over PARITY_TOLERANCE fails the command and is never served.

Plans are named `<component>.<gpu-arch>.<gpu-model>.<trt-version>.plan` (e.g.
`unet.sm90.h100-80gb-hbm3.10.13.0.plan`). Everything that can be decided without a GPU (profiles, names, the
rebuild decision, the comparison's inputs and verdict) is plain Python and unit-tested on CPU; building needs an
NVIDIA GPU and the `tensorrt` package, and says so in one line when either is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.precision import resolve_precision
from realfake.serving.export_files import graph_sha256, load_export_meta
from realfake.serving.model_bundle import TEXT_MAX_LENGTH
from realfake.serving.tensorrt_plans import GpuInfo, detect_gpu, import_tensorrt, profile_max_images

# The largest relative RMS error (||plan - ort|| / ||ort|| over one call's output) a plan may have against ONNX
# Runtime's fp32 run of the same graph on the same inputs. fp16 keeps 11 significant bits (~5e-4 per value) and a
# UNet call compounds it over ~50 layers; bf16 keeps 8 (~4e-3 per value); fp32 plans differ only by kernel choice.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def timing_cache_name(gpu: GpuInfo) -> str:
    """One timing cache per GPU model: TensorRT rejects a cache made on another device."""
    return f"timing.{gpu.arch}.{gpu.model}.cache"


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape of every input of one component."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict:
        return {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in sorted(self.shapes.items())}


def component_profiles(meta: dict, batch_sizes: list[int], cfg: bool = True) -> dict[str, Profile]:
    """Profiles from the image batch sizes the server will form. With classifier-free guidance the text encoder
    and UNet see both halves, so twice the images at opt and max (the pipeline encodes [negative; positive] in
    one call); their min stays the smallest image batch, since a request with guidance scale <= 1 runs without
    the unconditional half."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("batch sizes must be integers >= 1")
    lo, hi = min(batch_sizes), max(batch_sizes)
    opt = sorted(batch_sizes)[len(batch_sizes) // 2]
    k = 2 if cfg else 1

    def guided(shape_of):
        return (shape_of(lo), shape_of(k * opt), shape_of(k * hi))

    side = meta["image_size"] // meta["vae_scale_factor"]
    ch, hid, img = meta["latent_channels"], meta["text_hidden_size"], meta["image_size"]

    def b(shape_of):
        return tuple(shape_of(n) for n in (lo, opt, hi))

    profiles = {
        "text_encoder": Profile({"input_ids": guided(lambda n: (n, TEXT_MAX_LENGTH))}),
        "unet": Profile(
            {
                "sample": guided(lambda n: (n, ch, side, side)),
                "timestep": guided(lambda n: (n,)),
                "encoder_hidden_states": guided(lambda n: (n, TEXT_MAX_LENGTH, hid)),
            }
        ),
        "vae_decoder": Profile({"latents": b(lambda n: (n, ch, side, side))}),
        "vae_encoder": Profile({"image": b(lambda n: (n, 3, img, img))}),
    }
    if meta.get("image_encoder_size"):
        s = meta["image_encoder_size"]
        profiles["image_encoder"] = Profile({"pixel_values": b(lambda n: (n, 3, s, s))})
    return {name: p for name, p in profiles.items() if name in meta["components"]}


def plan_name(component: str, gpu: GpuInfo, trt_version: str) -> str:
    return f"{component}.{gpu.arch}.{gpu.model}.{trt_version}.plan"


def plan_meta(component: str, gpu: GpuInfo, trt_version: str, onnx_hash: str, profile: Profile, precision: str) -> dict:
    return {
        "component": component,
        "max_images": profile_max_images(component, profile.to_json()),
        "gpu_name": gpu.name,
        "compute_capability": list(gpu.compute_capability),
        "tensorrt_version": trt_version,
        "onnx_sha256": onnx_hash,
        "profiles": profile.to_json(),
        "precision": precision,  # fp32, fp16 or bf16 (the builder flag; plans before it had "fp16": bool)
    }


def rebuild_reason(meta_path: Path, wanted: dict) -> str | None:
    """None when the plan beside `meta_path` was built exactly as `wanted`; else why it must be rebuilt."""
    plan = meta_path.with_suffix(".plan")
    if not plan.is_file() or not meta_path.is_file():
        return "no plan yet"
    try:
        have = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "metadata unreadable"
    if have.get("parity", {}).get("passed") is False:
        return "its last build failed the comparison with ONNX Runtime"
    for key, label in (
        ("gpu_name", "GPU model"),
        ("compute_capability", "GPU architecture"),
        ("tensorrt_version", "TensorRT version"),
        ("onnx_sha256", "ONNX graph"),
        ("profiles", "optimisation profiles"),
        ("precision", "precision"),
    ):
        if have.get(key) != wanted.get(key):
            return f"{label} changed ({have.get(key)} -> {wanted.get(key)})"
    return None


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    profile: Profile,
    cache_path: Path,
    precision: str = "fp16",
    workspace_gb: float = 8.0,
) -> None:
    """Build one serialized engine with one optimisation profile, reusing and updating the timing cache."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = (
        0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise UserError(f"TensorRT {trt.__version__} has no bf16: pass --precision fp16")
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build {onnx_path.name} (see the messages above)")
    write_atomic(plan_path, bytes(serialized))
    write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))


# -- the comparison with ONNX Runtime ---------------------------------------------------------------------------


def parity_inputs(profile: Profile, onnx_types: dict[str, str], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the profile's smallest shapes, in the graph's own types, drawn as the pipeline's are:
    token ids of common tokens, timesteps of the 1000-step schedule, images in [-1, 1], latents and hidden states
    from a standard normal."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, (lo, _, _) in sorted(profile.shapes.items()):
        kind = onnx_types.get(name, "tensor(float)")
        if name == "input_ids":
            value = rng.integers(0, 1000, size=lo)
        elif name == "timestep":
            value = rng.integers(0, 1000, size=lo) if "int" in kind else rng.uniform(0, 999, size=lo)
        elif name in ("image", "pixel_values"):
            value = rng.uniform(-1, 1, size=lo)
        else:
            value = rng.standard_normal(size=lo)
        inputs[name] = value.astype(_NUMPY_TYPES.get(kind, np.float32))
    return inputs


_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def compare_outputs(expected: np.ndarray, actual: np.ndarray, precision: str) -> dict:
    """The plan's output against ONNX Runtime's: relative RMS and largest absolute error, and the verdict against
    PARITY_TOLERANCE[precision] (a non-finite value, or another shape, fails whatever the error)."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    tolerance = PARITY_TOLERANCE[precision]
    if expected.shape != actual.shape:
        return {"passed": False, "reason": f"shape {list(actual.shape)}, expected {list(expected.shape)}",
                "rel_rms_error": float("inf"), "max_abs_error": float("inf"), "tolerance": tolerance}  # fmt: skip
    finite = bool(np.isfinite(actual).all())
    diff = actual - expected if finite else np.full_like(expected, np.inf)
    rel = float(np.linalg.norm(diff) / max(float(np.linalg.norm(expected)), 1e-12))
    report = {
        "passed": finite and rel <= tolerance,
        "rel_rms_error": rel,
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "tolerance": tolerance,
    }
    if not finite:
        report["reason"] = "non-finite values in the plan's output (fp16 overflow?)"
    return report


def check_parity(
    onnx_path: Path,
    profile: Profile,
    precision: str,
    run_plan: Callable[[dict[str, np.ndarray]], np.ndarray],
    seed: int = 0,
) -> dict:
    """Runs the ONNX graph with ONNX Runtime in fp32 (on the GPU where its CUDA build is installed) and the plan
    (`run_plan`) on the same inputs, and compares their first outputs (compare_outputs)."""
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    inputs = parity_inputs(profile, {i.name: i.type for i in session.get_inputs()}, seed)
    expected = session.run(None, inputs)[0]
    report = compare_outputs(expected, run_plan(inputs), precision)
    return report | {"inputs": {k: list(v.shape) for k, v in inputs.items()}, "reference": session.get_providers()[0]}


def parity_line(plan: str, p: dict) -> str:
    verdict = "ok" if p["passed"] else f"FAILED{': ' + p['reason'] if 'reason' in p else ''}"
    return (
        f"{plan} vs ONNX Runtime: relative RMS error {p['rel_rms_error']:.3g}, largest {p['max_abs_error']:.3g} "
        f"(tolerance {p['tolerance']}): {verdict}"
    )


def _plan_runner(component: str, plan: Path, meta: dict) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The plan as a function of numpy inputs, run as the server runs it (TrtComponents on this GPU)."""
    import torch

    from realfake.serving.components import COMPONENT_IO
    from realfake.serving.tensorrt_components import TrtComponents
    from realfake.serving.tensorrt_plans import SelectedPlan

    runner = TrtComponents({component: SelectedPlan(plan, meta)}, "cuda")

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = [torch.from_numpy(inputs[name]).cuda() for name in COMPONENT_IO[component][0]]
        out = getattr(runner, component)(*tensors)  # the public call the pipeline makes (ComponentCalls)
        torch.cuda.synchronize()
        return out.cpu().numpy()

    return run


@dataclass
class PlanResult:
    component: str
    plan: str
    built: bool
    reason: str
    seconds: float
    parity: dict = field(default_factory=dict)


def build_plans(
    onnx_dir: Path, out: Path, batch_sizes: list[int], precision: str = "auto", log=print
) -> list[PlanResult]:
    """Plans for every component of an ONNX export, for the GPU of this machine; up-to-date plans are kept.
    `precision`: auto (bf16 on a GPU of compute capability 8.0 or later, else fp16), fp32, fp16 or bf16."""
    meta = load_export_meta(onnx_dir)
    profiles = component_profiles(meta, batch_sizes)
    gpu = detect_gpu()
    precision = resolve_precision(
        precision, gpu=True, bf16=gpu.compute_capability >= (8, 0), choices=("auto", "fp32", "fp16", "bf16")
    )
    trt = import_tensorrt()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for component, profile in profiles.items():
        onnx_path = onnx_dir / f"{component}.onnx"
        plan = out / plan_name(component, gpu, trt.__version__)
        wanted = plan_meta(component, gpu, trt.__version__, graph_sha256(onnx_path), profile, precision)
        reason = rebuild_reason(plan.with_suffix(".json"), wanted)
        t0 = time.perf_counter()
        if reason is not None:
            log(f"building {plan.name}: {reason}")
            plan.with_suffix(".json").unlink(missing_ok=True)  # a crash mid-build leaves no metadata: rebuilt
            build_plan(onnx_path, plan, profile, out / timing_cache_name(gpu), precision)
            wanted["parity"] = check_parity(onnx_path, profile, precision, _plan_runner(component, plan, wanted))
            write_atomic(plan.with_suffix(".json"), json.dumps(wanted, indent=1).encode())
            log(parity_line(plan.name, wanted["parity"]))
        else:
            wanted = json.loads(plan.with_suffix(".json").read_text())
        results.append(
            PlanResult(
                component,
                str(plan),
                reason is not None,
                reason or "up to date",
                round(time.perf_counter() - t0, 2),
                wanted.get("parity", {}),
            )
        )
    write_atomic(out / "engines.json", json.dumps([asdict(r) for r in results], indent=1).encode())
    failed = [r for r in results if r.parity.get("passed") is False]
    if failed:
        raise UserError(
            f"{', '.join(Path(r.plan).name for r in failed)} differ from ONNX Runtime beyond the {precision} "
            f"tolerance ({PARITY_TOLERANCE[precision]} relative RMS; see {out / 'engines.json'}): they are not "
            "served; rebuild with --precision fp32, or report the graph"
        )
    return results
