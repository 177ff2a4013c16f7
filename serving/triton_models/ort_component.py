"""Triton Python-backend model running one exported component on ONNX Runtime (the CPU path).

Copied to <repo>/<component>/1/model.py by `rf-export repo --runtime python-ort`; the graph is model.onnx
beside it. On GPU servers the same component is a native onnxruntime_onnx or tensorrt_plan model instead.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from realfake.serving.components import make_session
from realfake.serving.pipeline_params import PARAM_INTRA_OP_THREADS


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get(PARAM_INTRA_OP_THREADS, "0")) or None
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = make_session(path, threads)
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                result = self.session.run([self.output], feed)[0]
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, result)]))
            except Exception as exc:  # noqa: BLE001 - becomes an error response, the stub stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
