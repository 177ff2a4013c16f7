"""The sampler the Triton `pipeline` model runs, readable top to bottom like the algorithm:

encode prompts -> prepare latents (noise, or the real image's latents noised to `strength`) -> denoising loop
(UNet on [uncond, cond] in one call, classifier-free guidance, scheduler step) -> VAE decode -> uint8 images.

It is written against `Components` (plain callables on torch tensors), so the same code runs on in-process
ONNX Runtime sessions (tests, benchmarks, CPU servers) and on Triton BLS calls, where tensors stay on the GPU
between calls (DLPack) when the components are GPU models. Noise comes from one
`torch.Generator` per image seeded with that image's seed, drawn in the order diffusers draws it, so an
image is reproducible from its seed alone and matches diffusers' pipelines given the same seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from realfake.core.defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    SCHEDULERS,
    TEXT_ONLY_STRENGTH,
)
from realfake.core.images import clip_preprocess
from realfake.core.protocol import denoising_steps


class Components(Protocol):
    """The exported graphs (see realfake.export.onnx_export for their contracts), on torch tensors.

    `device` is where they want their inputs and leave their outputs."""

    device: torch.device

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor: ...
    def vae_decoder(self, latents: torch.Tensor) -> torch.Tensor: ...
    def vae_encoder(self, image: torch.Tensor) -> torch.Tensor: ...
    def image_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the sampler needs to know about the exported model (export.json beside the graphs)."""

    image_size: int
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    image_encoder_size: int | None
    bundle_identity: str

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelInfo:
        meta = json.loads((Path(model_dir) / "export.json").read_text())
        return cls(
            image_size=meta["image_size"],
            latent_channels=meta["latent_channels"],
            vae_scale_factor=meta["vae_scale_factor"],
            vae_scaling_factor=meta["vae_scaling_factor"],
            image_encoder_size=meta.get("image_encoder_size"),
            bundle_identity=meta["bundle_identity"],
        )


@dataclass(frozen=True)
class Settings:
    """Settings shared by every image of one sampler call (requests are grouped by these)."""

    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    strength: float = TEXT_ONLY_STRENGTH  # 1.0: from pure noise; < 1: real-image latent prior (img2img)
    guidance_token: bool = False  # replace the last cond token by the init image's CLIP embedding


def make_scheduler(name: str, config: dict):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    classes = {
        "unipc": UniPCMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(config)


class Sampler:
    def __init__(
        self, components: Components, model_dir: str | Path, scheduler: str = DEFAULT_SCHEDULER, vae_slice: int = 0
    ):
        """`vae_slice`: images per VAE call (0: the whole batch). The VAE works at full image size, so on a CPU
        server its activations dominate a batch's memory; decoding in slices (diffusers' VAE slicing) bounds them
        at one slice, whatever the batch."""
        from transformers import CLIPTokenizer

        model_dir = Path(model_dir)
        self.components = components
        self.vae_slice = vae_slice
        self.info = ModelInfo.load(model_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
        self.scheduler_name = scheduler
        self.scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        make_scheduler(scheduler, self.scheduler_config)  # fail at start-up, not on the first request

    # -- the algorithm --------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        settings: Settings,
        init_images: np.ndarray | None = None,
    ) -> np.ndarray:
        """Images uint8 [B, H, W, 3] for B prompts; `init_images` uint8 [B, H, W, 3] when strength < 1."""
        batch = len(prompts)
        if not (len(negative_prompts) == len(seeds) == batch):
            raise ValueError("prompts, negative_prompts and seeds must have the same length")
        use_cfg = settings.guidance_scale > 1.0
        device = self.components.device
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

        # 1. encode prompts: one text-encoder call for [negative; positive]
        cond = self._encode_text(list(negative_prompts) + list(prompts) if use_cfg else list(prompts))
        if settings.guidance_token:
            if init_images is None:
                raise ValueError("the guidance token needs init images")
            embeds = self._image_embeds(init_images)
            cond[-batch:, -1, :] = embeds  # the conditional half only
        # 2. timesteps and starting latents
        scheduler = make_scheduler(self.scheduler_name, self.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=device)
        timesteps = scheduler.timesteps
        if init_images is None or settings.strength >= 1.0:
            latents = self._noise(generators) * scheduler.init_noise_sigma
        else:
            timesteps = self._truncate_timesteps(scheduler, settings)
            init_latents = self._encode_images(init_images, generators)
            noise = self._noise(generators)
            latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch))
        # 3. denoising loop: both guidance halves in one UNet call
        context = cond
        for t in timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            t_batch = torch.full((model_in.shape[0],), float(t), dtype=torch.float32, device=device)
            noise_pred = self.components.unet(model_in.contiguous(), t_batch, context)
            if use_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + settings.guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        # 4. decode
        image = self._sliced(self.components.vae_decoder, latents.to(torch.float32))
        pixels = to_uint8(image)
        problems = image_problems(image, pixels)
        if any(problems):
            raise BadImages(pixels, problems, list(seeds))
        return pixels

    # -- steps ----------------------------------------------------------------------------------------------

    def _sliced(self, call, tensor: torch.Tensor) -> torch.Tensor:
        """`call` over `tensor` in slices of `vae_slice` images, concatenated (one call when slicing is off)."""
        if not self.vae_slice or tensor.shape[0] <= self.vae_slice:
            return call(tensor.contiguous())
        return torch.cat([call(part.contiguous()) for part in tensor.split(self.vae_slice)])

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
        ).input_ids
        return self.components.text_encoder(torch.tensor(ids, dtype=torch.int64, device=self.components.device))

    def _noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        side = self.info.image_size // self.info.vae_scale_factor
        shape = (1, self.info.latent_channels, side, side)
        # drawn on the CPU from each image's own generator, so an image is the same on any device
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        return noise.to(self.components.device)

    def _encode_images(self, images: np.ndarray, generators: list[torch.Generator]) -> torch.Tensor:
        """Real images -> latents sampled from the VAE posterior (one draw per image's generator), scaled."""
        pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.components.device)
        moments = self._sliced(self.components.vae_encoder, pixels.to(torch.float32) / 127.5 - 1.0)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators]).to(mean.device)
        return (mean + std * eps) * self.info.vae_scaling_factor

    @staticmethod
    def _truncate_timesteps(scheduler, settings: Settings) -> torch.Tensor:
        init_steps = denoising_steps(settings.steps, settings.strength)
        start = max(settings.steps - init_steps, 0) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:]

    def _image_embeds(self, images: np.ndarray) -> torch.Tensor:
        if self.info.image_encoder_size is None:
            raise ValueError("this model has no image encoder, so it cannot compute the guidance token")
        pixels = torch.from_numpy(clip_preprocess(images, self.info.image_encoder_size))
        return self.components.image_encoder(pixels.to(self.components.device))


class BadImages(ValueError):
    """Some images of a batch are not images (NaN or inf in the decoder's output, or one flat colour): they
    fail their requests instead of being written as valid-looking files. `images` holds the whole batch and
    `problems` one entry per image (None: the image is sound)."""

    def __init__(self, images: np.ndarray, problems: list[str | None], seeds: list[int]):
        self.images, self.problems, self.seeds = images, problems, seeds
        bad = [self.message(k) for k, p in enumerate(problems) if p]
        super().__init__(f"{len(bad)} of {len(problems)} images are not images ({'; '.join(bad[:3])})")

    def message(self, k: int) -> str:
        return f"the image of seed {self.seeds[k]} is not an image: {self.problems[k]}"


def image_problems(image: torch.Tensor, pixels: np.ndarray) -> list[str | None]:
    """Per image of the decoder's output [B,3,H,W] (and its uint8 form): why it is not an image, or None. A
    non-finite value (an fp16 overflow in an engine, typically) would be clamped into a valid-looking file; a
    constant image (all black, say) is what such an overflow or a broken engine decodes to."""
    finite = torch.isfinite(image.float()).flatten(1).all(dim=1).tolist()
    flat = pixels.reshape(len(pixels), -1)
    constant = (flat.max(axis=1) == flat.min(axis=1)).tolist()
    problems: list[str | None] = []
    for k in range(len(pixels)):
        if not finite[k]:
            problems.append("NaN or inf in the VAE decoder's output (an fp16 overflow? try --precision fp32 or bf16)")
        elif constant[k]:
            problems.append(f"every pixel is the same value ({int(flat[k, 0])}): a constant image")
        else:
            problems.append(None)
    return problems


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """VAE output [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3] on the host, rounded as diffusers rounds."""
    image = (image.float() / 2 + 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)
    return (image * 255).round().to(torch.uint8).cpu().numpy()
