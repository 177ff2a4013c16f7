"""`Components` on OpenVINO's CPU runtime: the fast path for CPU servers.

Precisions (`dtype`):
- `fp32`: the ONNX graphs as exported (parity with ONNX Runtime to ~1e-5);
- `bf16`: OpenVINO's bf16 inference precision on CPUs that have it (avx512_bf16 / AMX); no calibration;
- `int8`: the UNet quantized by `rf-export quantize` (`unet.int8.xml`, calibrated on this model's own sampler
  inputs), everything else fp32. The UNet is where nearly all the time goes; int8 runs it on VNNI/AMX kernels.

Inputs and outputs follow the ONNX graph contracts (realfake.export.onnx_export), float32 at the boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from realfake.serving.components import COMPONENT_IO, ComponentCalls, numpy_feed
from realfake.serving.export_files import INT8_UNET

DTYPES = ("fp32", "bf16", "int8")


def cpu_capabilities(core=None) -> set[str]:
    """What OpenVINO's CPU plugin can do here (e.g. FP32, BF16, INT8)."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    return set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OvComponents(ComponentCalls):
    device = torch.device("cpu")

    def __init__(self, model_dir: str | Path, dtype: str = "fp32", threads: int | None = None):
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeError("the openvino runtime needs `openvino` (pip install 'realfake[openvino]')") from exc
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for the openvino runtime: {', '.join(DTYPES)}")
        model_dir = Path(model_dir)
        core = ov.Core()
        capabilities = cpu_capabilities(core)
        if dtype == "bf16" and "BF16" not in capabilities:
            raise RuntimeError(f"this CPU has no bf16 support (OpenVINO reports {sorted(capabilities)}): use fp32")
        config = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.requests = {}
        for name in COMPONENT_IO:
            path = model_dir / f"{name}.onnx"
            if name == "unet" and dtype == "int8":
                path = model_dir / INT8_UNET
                if not path.is_file():
                    raise RuntimeError(f"{path} is missing: run `rf-export quantize` on the ONNX export first")
            if path.is_file():
                self.requests[name] = core.compile_model(str(path), "CPU", config).create_infer_request()

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        if name not in self.requests:
            raise ValueError(f"this model has no {name} component")
        request = self.requests[name]
        request.infer(numpy_feed(name, tensors))
        # the output buffer belongs to the request and is reused by the next call: copy it out
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))
