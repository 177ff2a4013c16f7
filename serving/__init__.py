"""Server-side code: the sampler the Triton `pipeline` model runs, and ONNX Runtime components."""
