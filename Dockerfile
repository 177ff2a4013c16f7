# Serving image: the official Triton server (Python backend included) plus realfake's pipeline code.
# Mount a diffusers-layout bundle at /models/bundle (or a ready repository at /models/repo) as a volume; at
# start the entrypoint exports what is missing, builds TensorRT plans for the GPU it finds (kept in the volume,
# rebuilt when the GPU or TensorRT changes), writes the repository (RF_RUNTIME) and starts Triton. On CPU-only
# hosts, RF_RUNTIME=openvino RF_PRECISION=int8 serves the int8 UNet (quantized once at first start, kept in /models).
FROM nvcr.io/nvidia/tritonserver:25.01-py3

# The image's Python (Ubuntu 24.04) is the one Triton's Python backend runs: install into it, even where it is
# marked externally managed (PEP 668).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    RF_MODELS=/models

WORKDIR /opt/realfake
COPY pyproject.toml README.md ./
COPY core ./core
COPY client ./client
COPY export ./export
COPY serving ./serving
COPY training ./training
COPY triton_repo ./triton_repo
# ONNX Runtime's GPU build only (the `server` extra brings no onnxruntime; `cpu` would bring the CPU build of the
# same module). Plans must be built by the TensorRT that Triton's tensorrt_plan backend loads (a plan from another
# version is refused), so the Python package is pinned to the version of the image's own libnvinfer.
RUN python3 -m pip install '.[server,openvino]' \
 && python3 -m pip install 'onnxruntime-gpu>=1.18' \
 && trt="$(python3 -c 'import ctypes; v = ctypes.CDLL("libnvinfer.so.10").getInferLibVersion(); print(f"{v // 10000}.{v // 100 % 100}.{v % 100}")')" \
 && echo "TensorRT in the image: ${trt}" \
 && python3 -m pip install "tensorrt-cu12==${trt}.*" \
 && python3 -m pip install --no-deps 'open-clip-torch>=2.20'

COPY docker/entrypoint.sh /usr/local/bin/rf-entrypoint
RUN chmod +x /usr/local/bin/rf-entrypoint

EXPOSE 8000 8001 8002
VOLUME ["/models"]
ENTRYPOINT ["/usr/local/bin/rf-entrypoint"]
