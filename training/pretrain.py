"""A small text-to-image base model trained from scratch: the demo's stand-in for a pretrained Stable Diffusion.

Same layout and components as SD 1.x (AutoencoderKL, UNet2DConditionModel, CLIP text encoder and tokenizer, CLIP
image encoder), at toy size: the VAE and UNet are trained here on labelled images with class prompts; the text
and image encoders stay frozen at their seeded random weights (their outputs still differ per prompt and per
image, which is all the UNet needs to condition on them).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from realfake.core.classes import ClassInfo
from realfake.core.dataset import render_prompt
from realfake.export.tiny_bundle import build_tiny_bundle

PROMPT = "photo of {class}, best quality"


def to_pixels(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 [N,h,w] grayscale or [N,h,w,3] -> float [N,3,size,size] in [-1,1], zero-padded to `size`."""
    x = torch.from_numpy(np.asarray(images)).float() / 127.5 - 1.0
    if x.dim() == 3:
        x = x[:, None].expand(-1, 3, -1, -1)
    else:
        x = x.permute(0, 3, 1, 2)
    pad_h, pad_w = size - x.shape[2], size - x.shape[3]
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
    return x.contiguous()


def pretrain_base(
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[ClassInfo],
    out: Path,
    *,
    vae_steps: int = 300,
    unet_steps: int = 600,
    batch: int = 64,
    vae_batch: int = 32,
    latent_pool: int = 8192,
    seed: int = 0,
    log=print,
    progress=None,
) -> Path:
    """Train VAE then UNet on (images, labels) and write a complete bundle to `out` (atomically)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from realfake.serving.model_bundle import quiet_loading

    quiet_loading()
    tmp = out.with_name(out.name + ".tmp")
    build_tiny_bundle(tmp, seed=seed, sample_size=16, vae_blocks=(32, 64), unet_blocks=(32, 64), vae_attention=False)
    gen = torch.Generator().manual_seed(seed)
    pixels = to_pixels(images)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n = len(pixels)

    # 1. the autoencoder: reconstruction + a light KL so the latents stay a usable diffusion space
    vae = AutoencoderKL.from_pretrained(tmp / "vae")
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for step in range(vae_steps):
        x = pixels[torch.randint(0, n, (vae_batch,), generator=gen)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)).sample
        loss = (recon - x).pow(2).mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            progress("vae", step + 1, vae_steps, loss.item())
    vae.eval()
    with torch.no_grad():
        sample = pixels[torch.randperm(n, generator=gen)[:1024]]
        latents = torch.cat([vae.encode(sample[i : i + 256]).latent_dist.mean for i in range(0, len(sample), 256)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        recon_err = (vae.decode(latents[:256]).sample - sample[:256]).abs().mean().item()
    log(
        f"base VAE: {vae_steps} steps in {time.perf_counter() - t0:.0f}s, mean |recon - x| {recon_err:.3f}, "
        f"latent scale {vae.config.scaling_factor:.3f}"
    )
    vae.save_pretrained(tmp / "vae")

    # 2. the UNet: epsilon prediction on scaled latents, conditioned on class prompts (10 % empty, for CFG).
    # Latent posteriors are computed once for a pool of images (encoding all of a large set costs more than
    # the UNet steps it would feed).
    pool = torch.randperm(n, generator=gen)[: min(n, latent_pool)]
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(pool), 512):
            d = vae.encode(pixels[pool[i : i + 512]]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        means, stds = torch.cat(means), torch.cat(stds)
    labels_t, n = labels_t[pool], len(pool)
    with torch.no_grad():
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        text = CLIPTextModel.from_pretrained(tmp / "text_encoder").eval()
        prompts = [render_prompt(PROMPT, c.name) for c in classes] + [""]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        contexts = text(ids)[0]
    scale = vae.config.scaling_factor
    unet = UNet2DConditionModel.from_pretrained(tmp / "unet")
    unet.train()
    sched = DDPMScheduler.from_pretrained(tmp / "scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(unet_steps, 1), eta_min=1e-4)
    t0 = time.perf_counter()
    for step in range(unet_steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        cond = labels_t[idx].clone()
        cond[torch.rand(batch, generator=gen) < 0.1] = len(classes)  # the empty prompt
        pred = unet(sched.add_noise(z, noise, t), t, contexts[cond]).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_decay.step()
        if progress:
            progress("unet", step + 1, unet_steps, loss.item())
    log(f"base UNet: {unet_steps} steps in {time.perf_counter() - t0:.0f}s, last loss {loss.item():.4f}")
    unet.save_pretrained(tmp / "unet")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
