"""The request contract of the Triton `pipeline` model, written once and imported by client and server.

Every input has a leading batch dimension (Triton `max_batch_size` > 0), one row per image.
"""

from __future__ import annotations

PIPELINE_MODEL = "pipeline"

# name -> (Triton datatype, dims without the batch dimension, optional)
PIPELINE_INPUTS: dict[str, tuple[str, list[int], bool]] = {
    "PROMPT": ("BYTES", [1], False),
    "NEGATIVE_PROMPT": ("BYTES", [1], True),
    "SEED": ("INT64", [1], False),
    "STEPS": ("INT32", [1], True),
    "GUIDANCE_SCALE": ("FP32", [1], True),
    # latent prior (img2img): the real image, uint8 HxWx3 at the model's resolution, and how much to noise it
    "INIT_IMAGE": ("UINT8", [-1, -1, 3], True),
    "STRENGTH": ("FP32", [1], True),
    # replace the last conditional text token by the init image's CLIP image embedding
    "GUIDANCE_TOKEN": ("BOOL", [1], True),
}
PIPELINE_OUTPUTS: dict[str, tuple[str, list[int]]] = {"IMAGE": ("UINT8", [-1, -1, 3])}

# Parameters of the pipeline model's config that describe the model it serves (recorded in manifests).
PARAM_BUNDLE_IDENTITY = "bundle_identity"
PARAM_IMAGE_SIZE = "image_size"
PARAM_HAS_IMAGE_ENCODER = "has_image_encoder"
# "true" when the model was finetuned with the guidance token: without an image encoder it is served without it
PARAM_TRAINED_WITH_GUIDANCE_TOKEN = "trained_with_guidance_token"
# What computes the images from those weights (runtime, precision, its artifacts, scheduler): two servers with
# the same bundle but other engines draw slightly (or, with another scheduler, entirely) different images.
PARAM_ENGINE = "engine"


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` sampler steps run when the latent prior noises the real image by `strength` (diffusers'
    img2img rule: int(steps x strength), at most steps). 0 means nothing would be denoised: a request refused."""
    return min(int(steps * strength), steps)
