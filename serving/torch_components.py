"""`Components` on the bundle's own PyTorch modules: the runtime for GPU servers without TensorRT.

On CUDA: fp16 weights, channels-last memory, PyTorch's scaled-dot-product attention (diffusers' default
processor), optionally torch.compile. On CPU it runs in fp32, which is how its parity is tested here.
Inputs and outputs follow the ONNX graph contracts (realfake.export.onnx_export), in float32 at the boundary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from realfake.core.precision import resolve_precision
from realfake.serving.components import ComponentCalls


class TorchComponents(ComponentCalls):
    def __init__(
        self, bundle: str | Path, device: str | torch.device = "cuda", compile: bool = False, dtype: str = "auto"
    ):
        """`dtype`: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, or bf16 (about 2x faster UNet on CPUs with
        avx512_bf16, at a few 1e-2 of output difference)."""
        from realfake.serving.model_bundle import load_torch_modules

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the pytorch runtime was asked for CUDA but no GPU is visible")
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype == "auto":  # the one rule (realfake.core.precision), on the GPU this pipeline runs on
            gpu = self.device.type == "cuda"
            bf16 = gpu and torch.cuda.is_bf16_supported()
            self.dtype = dtypes[resolve_precision("auto", gpu=gpu, bf16=bf16)]
        elif dtype in dtypes:
            self.dtype = dtypes[dtype]
        else:
            raise ValueError(f"unknown dtype {dtype!r}: auto, fp32, fp16 or bf16")
        _, modules = load_torch_modules(bundle)
        self.modules = {}
        for name, module in modules.items():
            module = module.to(self.device, self.dtype).eval()
            if self.dtype != torch.float32 and name in ("unet", "vae_decoder", "vae_encoder"):
                module = module.to(memory_format=torch.channels_last)
            if compile:
                module = torch.compile(module, mode="max-autotune-no-cudagraphs", dynamic=True)
            self.modules[name] = module

    @torch.no_grad()
    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        if name not in self.modules:
            raise ValueError(f"this model has no {name} component")
        args = [t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device) for t in tensors]
        return self.modules[name](*args).float()
