"""rf-export: model bundles to ONNX, TensorRT engines and the Triton model repository."""
