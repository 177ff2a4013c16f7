"""Triton Python-backend model `pipeline` (copied to <repo>/pipeline/1/model.py by `rf-export repo`).

Thin by design: parse requests, call the sampler (realfake.serving), answer. What computes the components comes
from the config's parameters (realfake.serving.pipeline_params, placement and runtime): other models in the
repository reached by BLS (`placement: bls`), or in this process (`placement: inprocess`, which saves two
inter-process copies per UNet step) ONNX Runtime sessions (python-ort), TensorRT plans on this instance's GPU
(tensorrt), OpenVINO models (openvino: fp32, bf16 or an int8 UNet), or the bundle's PyTorch modules (pytorch).
An unknown or unserved value fails the model's initialisation with one line saying which.
"""

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from realfake.core.protocol import PIPELINE_INPUTS
from realfake.serving.batching import run_batch
from realfake.serving.components import COMPONENT_IO, ComponentCalls, OrtComponents, instance_device
from realfake.serving.pipeline_params import PipelineParams, bls_across_gpus
from realfake.serving.sampler import Sampler


class BlsComponents(ComponentCalls):
    """`Components` whose calls are BLS requests to the component models of this repository. Tensors pass by
    DLPack both ways and the responses are asked for in the pipeline's own memory (GPU memory on a GPU server),
    so the output of one component feeds the next without a trip through host memory."""

    def __init__(self, names: dict[str, str], device: torch.device):
        self.names = names
        self.device = device
        on_gpu = device.type == "cuda"
        self.memory = pb_utils.PreferredMemory(
            pb_utils.TRITONSERVER_MEMORY_GPU if on_gpu else pb_utils.TRITONSERVER_MEMORY_CPU,
            (device.index or 0) if on_gpu else 0,
        )

    def _run(self, component: str, *tensors):
        inputs, output = COMPONENT_IO[component]
        request = pb_utils.InferenceRequest(
            model_name=self.names[component],
            requested_output_names=[output],
            preferred_memory=self.memory,
            inputs=[
                pb_utils.Tensor.from_dlpack(n, to_dlpack(t.contiguous())) for n, t in zip(inputs, tensors, strict=True)
            ],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{component}: {response.error().message()}")
        return from_dlpack(pb_utils.get_output_tensor_by_name(response, output).to_dlpack()).to(self.device)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = PipelineParams.from_parameters(config.get("parameters", {}))
        model_dir = Path(args["model_repository"]) / args["model_version"] / "model_files"
        device = instance_device(params.device, args.get("model_instance_kind"), args.get("model_instance_device_id"))
        threads = params.intra_op_threads or None  # in-process runtimes share the cores
        kind = params.components_kind()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        refusal = bls_across_gpus(params.placement, params.runtime, str(device), gpus)
        if refusal:
            raise pb_utils.TritonModelException(refusal)
        if kind == "torch":
            from realfake.serving.torch_components import TorchComponents

            components = TorchComponents(params.bundle, device, dtype=params.dtype or "auto")
        elif kind == "openvino":
            from realfake.serving.openvino_components import OvComponents

            components = OvComponents(model_dir, params.dtype or "fp32", threads)
        elif kind == "tensorrt":
            from realfake.serving.tensorrt_components import TrtComponents

            components = TrtComponents.from_folder(model_dir / "engines", device)
        elif kind == "ort":
            components = OrtComponents(model_dir, threads, device)
        else:
            components = BlsComponents({name: name for name in COMPONENT_IO}, torch.device(device))
        self.sampler = Sampler(components, model_dir, scheduler=params.scheduler, vae_slice=params.vae_slice)
        # the memory budget's bound: a larger batch of the dynamic batcher is sampled in parts of this size
        self.max_batch = params.max_images_per_run or int(config.get("max_batch_size", 64)) or 64

    def execute(self, requests):
        arrays = []
        for request in requests:
            tensors = {}
            for name in PIPELINE_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                tensors[name] = tensor.as_numpy() if tensor is not None else None
            arrays.append(tensors)
        responses = []
        for result in run_batch(self.sampler, arrays, self.max_batch):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", result)]))
        return responses
