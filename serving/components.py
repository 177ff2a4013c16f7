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


def make_session(path: str | Path, threads: int | None = None, device: str | torch.device | None = None):
    """An ONNX Runtime session with full graph optimisation, on `device` (cuda[:i] or cpu); without one, on CUDA
    when the installed onnxruntime has it, else the CPU.

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
    if device is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    elif torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("ONNX Runtime on a GPU needs the onnxruntime-gpu package (CUDA execution provider)")
        providers = [("CUDAExecutionProvider", {"device_id": torch.device(device).index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        # no CPU arena: it keeps a batch's peak activations (GBs at 512 px) for the life of the server; without it
        # they go back after each call, which costs little next to the convolutions at these sizes
        opts.enable_cpu_mem_arena = False
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
    """`Components` on in-process ONNX Runtime sessions loaded from an export directory.

    On the CPU, tensors cross to numpy and back without copies. On a GPU (`device="cuda"`), inputs and outputs
    are bound by address (I/O binding), so the sampler's CUDA tensors feed the graphs and receive their outputs
    without a trip through host memory; `io_binding=True` takes that path on the CPU too (how it is tested here).
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        threads: int | None = None,
        device: str | torch.device = "cpu",
        io_binding: bool | None = None,
    ):
        onnx_dir = Path(onnx_dir)
        self.device = torch.device(device)
        self.io_binding = self.device.type == "cuda" if io_binding is None else io_binding
        from realfake.serving.sampler import ModelInfo

        info = ModelInfo.load(onnx_dir)
        self.scale, self.latent_channels = info.vae_scale_factor, info.latent_channels
        self.sessions = {
            name: make_session(onnx_dir / f"{name}.onnx", threads, self.device)
            for name in COMPONENT_IO
            if (onnx_dir / f"{name}.onnx").is_file()
        }

    def _run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        if name not in self.sessions:
            raise ValueError(f"this model has no {name} component")
        if not self.io_binding:
            return torch.from_numpy(self.sessions[name].run(None, numpy_feed(name, tensors))[0])
        return self._run_bound(name, tensors)

    def output_shape(self, name: str, tensors) -> tuple[int, ...]:
        """The output shape of a component for these inputs (the graph contracts of realfake.export.onnx_export)."""
        first = tuple(tensors[0].shape)
        if name == "unet":
            return first
        if name == "vae_decoder":
            return (first[0], 3, first[2] * self.scale, first[3] * self.scale)
        if name == "vae_encoder":
            return (first[0], 2 * self.latent_channels, first[2] // self.scale, first[3] // self.scale)
        width = self.sessions[name].get_outputs()[0].shape[-1]
        return (first[0], first[1], width) if name == "text_encoder" else (first[0], width)

    def _run_bound(self, name: str, tensors) -> torch.Tensor:
        session = self.sessions[name]
        inputs, output = COMPONENT_IO[name]
        kind, index = self.device.type, self.device.index or 0
        binding = session.io_binding()
        bound = []  # alive until the run returns
        for input_name, tensor in zip(inputs, tensors, strict=True):
            tensor = tensor.to(self.device, torch.int64 if name == "text_encoder" else torch.float32).contiguous()
            bound.append(tensor)
            dtype = np.int64 if tensor.dtype == torch.int64 else np.float32
            binding.bind_input(input_name, kind, index, dtype, tuple(tensor.shape), tensor.data_ptr())
        out = torch.empty(self.output_shape(name, tensors), dtype=torch.float32, device=self.device)
        binding.bind_output(output, kind, index, np.float32, tuple(out.shape), out.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the inputs are written before ORT reads them
        session.run_with_iobinding(binding)
        return out
