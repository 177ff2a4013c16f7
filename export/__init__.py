"""rf-export: model bundles to ONNX, TensorRT plans and the Triton model repository."""
