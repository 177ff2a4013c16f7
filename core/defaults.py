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
