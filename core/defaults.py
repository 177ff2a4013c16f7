"""The Real-Fake generation defaults (the ICLR 2024 paper's reference settings), named once: CLIs, dataclasses,
the sampler, the server's request parsing and the demo all refer to these."""

from __future__ import annotations

DEFAULT_STEPS = 30  # sampler steps (UniPC multistep)
MAX_STEPS = 1000  # the DDPM schedule's length: no request may ask for more
DEFAULT_GUIDANCE_SCALE = 2.0  # classifier-free guidance scale: low, for diversity
DEFAULT_STRENGTH = 0.75  # latent prior (img2img) strength with a real image
TEXT_ONLY_STRENGTH = 1.0  # without a real image every step runs, from noise
DEFAULT_SCHEDULER = "unipc"
DEFAULT_TEMPLATE = "photo of {class}, {caption}, best quality"
DEFAULT_NEGATIVE = "distorted, unrealistic, blurry, out of frame, cropped, deformed"
DEFAULT_FORMAT = "png"  # dataset image files: lossless; JPEG at quality 95 is what ImageNet users expect
DEFAULT_QUALITY = 95  # JPEG and WebP quality (1-100); PNG ignores it

# The fixed choices the command lines offer, named once (serving, export and the CLIs read them from here).
SCHEDULERS = ("unipc", "ddim", "euler", "dpm")
# how a server runs the graphs: python-ort (CPU: ONNX Runtime in Python-backend models), openvino (CPU, inside the
# pipeline model), onnxruntime and tensorrt (Triton's native GPU backends), pytorch (the bundle's modules)
RUNTIMES = ("python-ort", "openvino", "onnxruntime", "tensorrt", "pytorch")
PLACEMENTS = ("bls", "inprocess")  # the graphs as their own models called by BLS, or inside the pipeline model
# Triton's CUDA memory pool per GPU (--cuda-memory-pool-byte-size), through which the Python backend passes GPU
# tensors to and from its stub: Triton's 64 MB default is less than one SD-1.5 decode of 16 images (16 x 3 x 512 x
# 512 fp32 = 48 MB) beside the UNet's inputs, and a tensor that does not fit is copied through the host instead.
# docker/entrypoint.sh says the same number (RF_CUDA_POOL_MB); a test keeps them equal.
CUDA_MEMORY_POOL_MB = 512
GUIDANCE_TOKEN_MODES = ("auto", "on", "off")  # the image-embedding guidance token with real images
# the command that gives a bundle (a stock SD-1.5 has none) the CLIP image encoder the guidance token needs
ADD_IMAGE_ENCODER = "rf-train add-image-encoder --bundle BASE --image-encoder CLIP_DIR --out BUNDLE"
# precisions: `auto` is one rule everywhere (realfake.core.precision.resolve_precision)
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
