"""ONNX Runtime sessions for the exported components, in-process (tests, benchmarks, CPU Triton models)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

COMPONENT_IO = {
    "text_encoder": (("input_ids",), "hidden_states"),
    "unet": (("sample", "timestep", "encoder_hidden_states"), "noise_pred"),
    "vae_decoder": (("latents",), "image"),
    "vae_encoder": (("image",), "moments"),
    "image_encoder": (("pixel_values",), "image_embeds"),
}


def make_session(path: str | Path, threads: int | None = None):
    """A CPU (or CUDA, when present) ONNX Runtime session with full graph optimisation.

    `threads` caps intra-op threads (default: all cores, or RF_ORT_THREADS); several sessions in one
    server share the cores, so the server passes a number.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("RF_ORT_THREADS", "0")) or None
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def numpy_feed(name: str, tensors) -> dict[str, np.ndarray]:
    """The inputs of component `name` as contiguous host arrays keyed by graph input name (no copy for
    contiguous CPU tensors)."""
    inputs, _ = COMPONENT_IO[name]
    return {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(inputs, tensors, strict=True)}


def instance_device(device: str, instance_kind: str | None, device_id: str | int | None) -> str:
    """The torch device of one pipeline instance. A GPU instance group gives every GPU its own instance, and
    Triton says which GPU each got: a plain `cuda` becomes that GPU, so an 8-GPU server uses all eight."""
    if device == "cuda" and instance_kind == "GPU" and device_id is not None:
        return f"cuda:{int(device_id)}"
    return device


class ComponentCalls:
    """The five component calls of `Components`, each forwarded to `_run(name, *tensors)` of the subclass."""

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_encoder(self, input_ids):
        return self._run("text_encoder", input_ids)

    def unet(self, sample, timestep, encoder_hidden_states):
        return self._run("unet", sample, timestep, encoder_hidden_states)

    def vae_decoder(self, latents):
        return self._run("vae_decoder", latents)

    def vae_encoder(self, image):
        return self._run("vae_encoder", image)

    def image_encoder(self, pixel_values):
        return self._run("image_encoder", pixel_values)


class OrtComponents(ComponentCalls):
    """`Components` on in-process ONNX Runtime sessions loaded from an export directory (host tensors; CPU
    tensors cross to numpy and back without copies)."""

    device = torch.device("cpu")

    def __init__(self, onnx_dir: str | Path, threads: int | None = None):
        onnx_dir = Path(onnx_dir)
        self.sessions = {
            name: make_session(onnx_dir / f"{name}.onnx", threads)
            for name in COMPONENT_IO
            if (onnx_dir / f"{name}.onnx").is_file()
        }

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        if name not in self.sessions:
            raise ValueError(f"this model has no {name} component")
        return torch.from_numpy(self.sessions[name].run(None, numpy_feed(name, tensors))[0])
