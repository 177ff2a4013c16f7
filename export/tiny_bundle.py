"""Tiny random-weight model bundles for tests and demos (`build_tiny_bundle`), in the layout that
realfake.serving.model_bundle checks and loads. A real user passes a local Stable Diffusion 1.x copy instead;
no other stage knows which it got.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from realfake.core.errors import UserError
from realfake.serving.model_bundle import TEXT_MAX_LENGTH, check_bundle

# SD 1.x noise schedule: the scheduler config every stage derives its sampler from.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def _byte_alphabet() -> list[str]:
    """CLIP's byte-level alphabet in vocabulary order: printable bytes as themselves, then the other bytes
    mapped to code points from 256 up (so every byte has a visible, non-whitespace symbol)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_bpe_file() -> Path:
    """The CLIP BPE merges file that open-clip-torch ships (found without importing open_clip or torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("open-clip-torch is not installed: it ships the CLIP BPE vocabulary the tokenizer needs")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"open-clip-torch has no BPE file at {path}")
    return path


def clip_tokenizer():
    """The real CLIP tokenizer (49408 tokens), built offline from open-clip-torch's BPE merges."""
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP uses the first 48894 merges
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_MAX_LENGTH)


def save_bundle(out: str | Path, *, unet, vae, text_encoder, image_encoder=None) -> Path:
    """Write modules as a Stable-Diffusion-layout bundle with the real CLIP tokenizer and the SD 1.x schedule."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def clip_text_encoder(hidden: int, intermediate: int, *, layers: int, heads: int, **config):
    """A CLIP text encoder of the given width and depth with random weights, on CLIP's vocabulary and token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **config,
        )
    )


def build_tiny_bundle(
    out: str | Path,
    *,
    seed: int = 0,
    image_encoder: bool = True,
    sample_size: int = 16,
    vae_blocks: tuple[int, ...] = (32, 64),
    unet_blocks: tuple[int, ...] = (32, 64),
    text_hidden: int = 32,
    vae_attention: bool = True,
) -> Path:
    """Write a tiny Stable-Diffusion-layout bundle with seeded random weights (for tests and demos).

    `sample_size` is the latent side; images are `sample_size * 2**(len(vae_blocks)-1)` pixels.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    n = len(unet_blocks)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=unet_blocks,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_hidden,
        attention_head_dim=4,
        norm_num_groups=min(32, unet_blocks[0]),
    )
    torch.manual_seed(seed + 1)
    m = len(vae_blocks)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m,
        block_out_channels=vae_blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, vae_blocks[0]),
        sample_size=sample_size * 2 ** (m - 1),
        mid_block_add_attention=vae_attention,
    )
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(text_hidden, 2 * text_hidden, layers=2, heads=4)
    vision = None
    if image_encoder:
        torch.manual_seed(seed + 3)
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=text_hidden,
            )
        )
    out = save_bundle(out, unet=unet, vae=vae, text_encoder=text_encoder, image_encoder=vision)
    check_bundle(out)
    return out


def build_sd15_shape_bundle(out: str | Path, *, seed: int = 0, image_encoder: bool = True) -> Path:
    """A bundle of Stable Diffusion 1.5's exact shapes with seeded random weights (no download): UNet 860 M
    parameters, VAE 84 M at 512 px, the CLIP ViT-L/14 text encoder (123 M) and, for the guidance token, a CLIP
    ViT-L/14 image encoder with a 768-d projection (304 M). For measuring time and memory at the real size
    (bench/sd15_bench.py); its images are noise."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    torch.manual_seed(seed + 2)
    text = clip_text_encoder(768, 3072, layers=12, heads=12, hidden_act="quick_gelu")
    vision = None
    if image_encoder:
        torch.manual_seed(seed + 3)
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
                projection_dim=768,
                hidden_act="quick_gelu",
            )
        )
    out = save_bundle(out, unet=unet, vae=vae, text_encoder=text, image_encoder=vision)
    check_bundle(out)
    return out
