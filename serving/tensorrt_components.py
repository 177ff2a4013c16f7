"""`Components` on TensorRT plans inside this process: the fastest GPU path, measured by bench/gpu_bench.py
against the same sampler on the PyTorch and ONNX Runtime components.

Plans come from `rf-export engines` and are picked the way `rf-export repo --runtime tensorrt` picks them (built
from this export's graphs, for this GPU). Inputs are CUDA tensors; each call binds them by address, runs the
plan on PyTorch's current stream (so it is ordered with the sampler's own tensor work) and returns a CUDA
tensor: nothing crosses to the host between the first text encoding and the decoded image. A shape outside a
plan's optimisation profile is refused with the profile in the message, before TensorRT sees it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from realfake.core.errors import UserError
from realfake.serving.components import COMPONENT_IO, ComponentCalls


def shape_outside_profile(component: str, tensor: str, shape: tuple[int, ...], profiles: dict) -> str | None:
    """Why `shape` cannot run on a plan with these profiles (the JSON `rf-export engines` writes), or None."""
    bounds = profiles.get(tensor)
    if bounds is None:
        return f"{component} has no input {tensor!r}"
    lo, hi = bounds["min"], bounds["max"]
    if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
        return (
            f"{component}: {tensor} of shape {list(shape)} is outside the plan's profile (min {lo}, max {hi}); "
            "rebuild the plans with `rf-export engines --batch-sizes` covering this batch"
        )
    return None


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise UserError(f"TensorRT tensor type {dtype} has no torch counterpart here")
    return table[dtype]


class TrtComponents(ComponentCalls):
    """`plans`: the plan of each component (see `from_export` and `from_folder`), loaded on `device`."""

    def __init__(self, plans: dict, device: str | torch.device = "cuda"):
        from realfake.serving.tensorrt_plans import import_tensorrt

        trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise UserError("TensorRT plans run on an NVIDIA GPU; none is visible here")
        capability = list(torch.cuda.get_device_capability(self.device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts, self.profiles, self.dtypes = {}, {}, {}, {}
        for name, plan in plans.items():
            if (
                plan.meta.get("tensorrt_version") != trt.__version__
                or plan.meta.get("compute_capability") != capability
            ):
                raise UserError(
                    f"{plan.path.name} was built for compute capability {plan.meta.get('compute_capability')} with "
                    f"TensorRT {plan.meta.get('tensorrt_version')}; this GPU is {capability} with {trt.__version__}: "
                    "run `rf-export engines` here"
                )
            with torch.cuda.device(self.device):
                engine = runtime.deserialize_cuda_engine(plan.path.read_bytes())
                if engine is None:
                    raise UserError(f"TensorRT could not load {plan.path} (see the messages above)")
                self.engines[name] = engine
                self.contexts[name] = engine.create_execution_context()
            self.profiles[name] = plan.meta["profiles"]
            inputs, output = COMPONENT_IO[name]
            self.dtypes[name] = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in (*inputs, output)}
        self.max_images = min(p.max_images for p in plans.values())

    @classmethod
    def from_export(
        cls, engines: str | Path, onnx_dir: str | Path, device: str | torch.device = "cuda"
    ) -> TrtComponents:
        """The plans in `engines` made from this export's graphs for this GPU (as `rf-export repo` picks them)."""
        from realfake.serving.export_files import load_export_meta
        from realfake.serving.tensorrt_plans import detect_gpu, import_tensorrt, select_plans

        trt = import_tensorrt()  # the first thing missing is the first thing said
        meta = load_export_meta(onnx_dir)
        plans = select_plans(Path(engines), Path(onnx_dir), meta["components"], detect_gpu(), trt.__version__)
        return cls(plans, device)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cuda") -> TrtComponents:
        """Plans already chosen by `rf-export repo` (one `<component>.plan` + `.json` each, in the pipeline's
        model files)."""
        import json

        from realfake.serving.tensorrt_plans import SelectedPlan

        plans = {}
        for path in sorted(Path(folder).glob("*.plan")):
            plans[path.stem] = SelectedPlan(path, json.loads(path.with_suffix(".json").read_text()))
        if not plans:
            raise UserError(f"no TensorRT plans in {folder}: write the repository with `rf-export repo --engines`")
        return cls(plans, device)

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        if name not in self.contexts:
            raise ValueError(f"this model has no {name} component")
        inputs, output = COMPONENT_IO[name]
        context, dtypes = self.contexts[name], self.dtypes[name]
        bound = []  # the inputs must outlive the asynchronous launch; the stream orders their reuse
        for tensor_name, tensor in zip(inputs, tensors, strict=True):
            reason = shape_outside_profile(name, tensor_name, tuple(tensor.shape), self.profiles[name])
            if reason:
                raise ValueError(reason)
            tensor = tensor.to(self.device, dtypes[tensor_name]).contiguous()
            bound.append(tensor)
            context.set_input_shape(tensor_name, tuple(tensor.shape))
            context.set_tensor_address(tensor_name, tensor.data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(output)), dtype=dtypes[output], device=self.device)
        context.set_tensor_address(output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {name}")
        return out.float()
