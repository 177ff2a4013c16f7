"""What a server reads of the TensorRT plans `rf-export engines` built: which GPU it runs on, and for each
component the plan built from this export's graph for that GPU (by the graph digest in each plan's metadata).
Plans are named `<component>.<gpu-arch>.<gpu-model>.<trt-version>.plan` with a JSON of their profiles beside them:
a plan is tuned for one GPU model, not only its architecture (an A100 plan on an A30, both sm80, may run slower or
not load), and loads only under the TensorRT that built it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from realfake.core.errors import UserError
from realfake.serving.export_files import graph_sha256

GUIDED = ("text_encoder", "unet")  # components that see both guidance halves in one call


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    @property
    def arch(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def model(self) -> str:
        """The GPU model as a file-name part: "NVIDIA A100-SXM4-80GB" -> "a100-sxm4-80gb"."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return re.sub(r"^nvidia-", "", slug) or "gpu"


def profile_max_images(component: str, profile_json: dict, cfg: bool = True) -> int:
    """The largest pipeline batch (images) a plan with this profile serves."""
    first = next(iter(profile_json.values()))
    return first["max"][0] // (2 if cfg and component in GUIDED else 1)


def visible_gpu() -> GpuInfo | None:
    """The first CUDA device, or None on a machine without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return GpuInfo(torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)))


def detect_gpu() -> GpuInfo:
    gpu = visible_gpu()
    if gpu is None:
        raise UserError("rf-export engines needs an NVIDIA GPU (none is visible here); on CPU use --runtime python-ort")
    return gpu


@dataclass(frozen=True)
class SelectedPlan:
    path: Path
    meta: dict

    @property
    def max_images(self) -> int:
        if "max_images" in self.meta:
            return int(self.meta["max_images"])
        return profile_max_images(self.meta["component"], self.meta["profiles"])


def installed_tensorrt_version() -> str | None:
    """The version of the `tensorrt` Python package here, or None where it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def select_plans(
    engines: Path, onnx_dir: Path, components: list[str], gpu: GpuInfo | None = None, tensorrt: str | None = None
) -> dict[str, SelectedPlan]:
    """For each component, the plan in `engines` built from this export's graph (and, when `gpu` is given, for
    that GPU model and architecture; when `tensorrt` is given, by that TensorRT version); the newest when several
    qualify. A plan whose metadata is missing or names another graph is never picked: serving it would serve
    other weights; nor one that failed its comparison with ONNX Runtime."""
    plans = {}
    for name in components:
        found = sorted(Path(engines).glob(f"{name}.sm*.plan"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no TensorRT plan for {name} in {engines}: run `rf-export engines` on the serving GPU")
        digest = graph_sha256(Path(onnx_dir) / f"{name}.onnx")
        candidates = []
        for plan in found:
            try:
                meta = json.loads(plan.with_suffix(".json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if meta.get("onnx_sha256") == digest:
                candidates.append(SelectedPlan(plan, meta))
        if not candidates:
            raise UserError(
                f"the TensorRT plans for {name} in {engines} were built from another {name}.onnx (or lack their "
                f"metadata): run `rf-export engines {onnx_dir}` again"
            )
        if gpu is not None:
            built_for = sorted(
                {
                    f"{c.meta.get('gpu_name')} (sm{''.join(map(str, c.meta.get('compute_capability', [])))})"
                    for c in candidates
                }
            )
            candidates = [
                c
                for c in candidates
                if list(c.meta.get("compute_capability", [])) == list(gpu.compute_capability)
                and c.meta.get("gpu_name") == gpu.name
            ]
            if not candidates:
                raise UserError(
                    f"the plans for {name} in {engines} are for {', '.join(built_for)}, not this {gpu.name} "
                    f"({gpu.arch}): run `rf-export engines` here"
                )
        if tensorrt is not None:
            versions = sorted({str(c.meta.get("tensorrt_version")) for c in candidates})
            candidates = [c for c in candidates if c.meta.get("tensorrt_version") == tensorrt]
            if not candidates:
                raise UserError(
                    f"the plans for {name} in {engines} were built with TensorRT {', '.join(versions)}; this server "
                    f"has {tensorrt}, which cannot load them: run `rf-export engines` here"
                )
        failed = [c for c in candidates if c.meta.get("parity", {}).get("passed") is False]
        candidates = [c for c in candidates if c not in failed]
        if not candidates:
            report = failed[-1].meta["parity"]
            raise UserError(
                f"the plan for {name} in {engines} failed its comparison with ONNX Runtime (relative RMS error "
                f"{report['rel_rms_error']:.3g} over the tolerance {report['tolerance']}): it is not served; rebuild "
                "with `rf-export engines --precision fp32`"
            )
        plans[name] = candidates[-1]
    return plans


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(
            "rf-export engines needs the `tensorrt` Python package (pip install tensorrt) and a GPU"
        ) from None
    return trt
