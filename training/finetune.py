"""`rf-train finetune`: LoRA on a bundle's UNet with the Real-Fake objective, on a real labelled ImageFolder.

Writes OUT/lora/pytorch_lora_weights.safetensors (diffusers' LoRA format), OUT/bundle/ (the LoRA fused at the
generation scale: a bundle `rf-export onnx` takes as is), OUT/metrics.jsonl, OUT/checkpoints/, OUT/finetune.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from realfake.core.classes import load_classes
from realfake.core.defaults import ADD_IMAGE_ENCODER
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.precision import resolve_precision as core_precision
from realfake.serving.model_bundle import TRAINING_RECORD, TrainingRecord, check_bundle
from realfake.training.classify_config import default_workers
from realfake.training.data import FinetuneDataset, RealSample, collect_samples, jsonable, load_rgb, token_ids
from realfake.training.embeddings import KEY_DTYPE, EmbeddingCache, ImageEmbeddings, file_key, fill_cache
from realfake.training.finetune_config import PRECISIONS, FinetuneConfig
from realfake.training.finetune_loader import StepBatches, resolve_length, step_loader
from realfake.training.objective import realfake_loss, snr

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_encoder: torch.nn.Module | None
    noise_scheduler: object


def load_models(bundle: Path, with_image_encoder: bool) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from realfake.serving.model_bundle import quiet_loading

    info = check_bundle(bundle)
    quiet_loading()
    try:
        unet = UNet2DConditionModel.from_pretrained(bundle / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(bundle / "vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(bundle / "text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(bundle / "tokenizer", local_files_only=True)
        image_encoder = None
        if with_image_encoder and info.has_image_encoder:
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                bundle / "image_encoder", local_files_only=True
            )
        scheduler = DDPMScheduler.from_pretrained(bundle / "scheduler", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"bundle {bundle}: could not load weights ({exc})") from exc
    for module in (vae, text, image_encoder):
        if module is not None:
            module.requires_grad_(False).eval()
    return Models(unet, vae, text, tokenizer, image_encoder, scheduler)


def resolve_precision(requested: str, cuda: bool | None = None, bf16: bool | None = None) -> str:
    """The mixed precision a run uses (`fp32`, `fp16` or `bf16`): on the CPU always fp32 (mixed precision is for
    GPUs here); on a GPU `auto` is the one rule (realfake.core.precision). `cuda`/`bf16` default to what this
    machine has."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "fp32"
    bf16 = (torch.cuda.is_bf16_supported() if bf16 is None else bf16) if requested == "auto" else False
    return core_precision(requested, gpu=True, bf16=bf16, choices=PRECISIONS)


def place_frozen(models: Models, device, dtype: torch.dtype) -> None:
    """The frozen parts (VAE, text encoder, image encoder, and the UNet's base weights) on `device` in `dtype`:
    half the memory of fp32 under mixed precision. LoRA, added afterwards, trains in fp32 (`add_lora`)."""
    for module in (models.vae, models.text_encoder, models.image_encoder, models.unet):
        if module is not None:
            module.to(device)
            if module.dtype != dtype:  # (diffusers warns on every dtype cast, even to the same one)
                module.to(dtype=dtype)


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None) -> None:
    """Freeze the UNet and add a LoRA adapter to its attention projections (only the adapter trains)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    unet.add_adapter(config)
    for p in lora_parameters(unet):  # peft puts the adapter in the base weights' dtype; the optimizer needs fp32
        p.data = p.data.float()


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


# -- the guidance token ---------------------------------------------------------------------------------


def _model_key(bundle: Path) -> str:
    weights = sorted((bundle / "image_encoder").glob("*.safetensors")) + sorted(
        (bundle / "image_encoder").glob("*.bin")
    )
    digest = hashlib.sha256()
    for w in weights:
        st = w.stat()
        digest.update(f"{w.name}/{st.st_size}/{st.st_mtime_ns}".encode())
    digest.update((bundle / "image_encoder" / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def image_embeddings(
    models: Models, bundle: Path, root: Path, samples: list[RealSample], cache_dir: Path, log, accelerator=None
) -> ImageEmbeddings:
    """CLIP image embeddings [N, D] of the real images, computed on the image encoder's device in batches, each
    image once across `accelerator`'s processes, and cached per (file, encoder weights) in resumable chunks
    (realfake.training.embeddings)."""
    from realfake.core.images import clip_preprocess

    encoder = models.image_encoder
    param = next(encoder.parameters())
    size = int(encoder.config.image_size)

    def pixels(i: int) -> np.ndarray:
        return clip_preprocess(_square(load_rgb(root / samples[i].relpath))[None], size)[0]

    keys = np.array([file_key(root, s.relpath) for s in samples], dtype=KEY_DTYPE)
    dtype = str(param.dtype).removeprefix("torch.")  # fp16 and fp32 embeddings differ a little: cached apart
    cache = EmbeddingCache(cache_dir / f"image_embeds-{_model_key(bundle)}-{dtype}")
    # decoding and resizing run on threads (Pillow releases the GIL) while the encoder runs
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, torch.no_grad():

        def encode(indices: np.ndarray) -> np.ndarray:
            batch = torch.from_numpy(np.stack(list(pool.map(pixels, indices.tolist()))))
            return encoder(pixel_values=batch.to(param.device, param.dtype)).image_embeds.float().cpu().numpy()

        embeds, computed = fill_cache(
            cache,
            keys,
            encode,
            rank=accelerator.process_index if accelerator else 0,
            world=accelerator.num_processes if accelerator else 1,
            barrier=accelerator.wait_for_everyone if accelerator else lambda: None,
        )
    log(f"guidance token: {computed} image embeddings computed, {len(samples) - computed} from cache")
    return embeds


def _square(image: np.ndarray) -> np.ndarray:
    """Centre square crop, so images of any aspect go through CLIP preprocessing alike."""
    h, w = image.shape[:2]
    s = min(h, w)
    return image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def conditioning(models: Models, prompts: list[str] | torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
    """Text-encoder hidden states [B,77,D] of prompts (or their token ids, tokenised by a loader worker); with image
    embeddings, they replace each sample's last token."""
    ids = prompts if isinstance(prompts, torch.Tensor) else token_ids(models.tokenizer, prompts)
    with torch.no_grad():
        context = models.text_encoder(ids.to(models.text_encoder.device))[0]
    if image_embeds is not None:
        context = context.clone()
        context[:, -1, :] = image_embeds.to(context)
    return context


# -- training -------------------------------------------------------------------------------------------


def training_step_loss(models: Models, unet, pixels, context, generator: torch.Generator, cfg: FinetuneConfig):
    """One forward pass of the objective on a micro-batch; returns (total, denoise, dm)."""
    sched = models.noise_scheduler
    with torch.no_grad():  # the VAE in the frozen parts' dtype; the latents, noise and loss in fp32
        dist = models.vae.encode(pixels.to(models.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        latents = ((dist.mean + dist.std * eps) * models.vae.config.scaling_factor).float()
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    t = t.to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    prediction_type = sched.config.prediction_type
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = unet(noisy, t, context).sample.float()
    return realfake_loss(
        pred,
        target,
        snr(sched.alphas_cumprod, t),
        gamma=cfg.snr_gamma,
        dm_weight=cfg.dm_weight,
        prediction_type=prediction_type,
    )


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.pt"))


def _save_checkpoint(out: Path, unet, optimizer, step: int, cfg: FinetuneConfig) -> None:
    from peft.utils import get_peft_model_state_dict

    path = out / "checkpoints" / f"step-{step:07d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"lora": get_peft_model_state_dict(unet), "optimizer": optimizer.state_dict(), "step": step}
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
        old.unlink()


def save_lora(unet, directory: Path) -> Path:
    """The adapter in diffusers' LoRA format (`load_lora_weights` reads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory / LORA_WEIGHTS


def merge_bundle(bundle: Path, lora_dir: Path, out: Path, scale: float, record: TrainingRecord) -> Path:
    """The base bundle with the LoRA fused into the UNet at `scale`, saved as a complete bundle with `record`
    (realfake.json). The base bundle's image_encoder/ is kept whether or not its model_index.json lists it (SD-1.5
    ships none and users add the folder): diffusers' pipeline loads only the parts the index names."""
    import shutil

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        bundle, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if check_bundle(bundle).has_image_encoder:
        _keep_image_encoder(bundle, tmp)
    write_atomic(tmp / TRAINING_RECORD, record.to_json().encode())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    check_bundle(out)
    return out


def _keep_image_encoder(base: Path, merged: Path) -> None:
    """Copy the base's image_encoder/ as is (finetuning does not change it) and list it in model_index.json."""
    import shutil

    if (merged / "image_encoder").exists():
        shutil.rmtree(merged / "image_encoder")
    shutil.copytree(base / "image_encoder", merged / "image_encoder")
    config = json.loads((base / "image_encoder" / "config.json").read_text())
    index_path = merged / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_encoder"] = ["transformers", (config.get("architectures") or ["CLIPVisionModelWithProjection"])[0]]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def run_finetune(cfg: FinetuneConfig, log=print) -> dict:
    from accelerate import Accelerator
    from peft.utils import set_peft_model_state_dict
    from tqdm.auto import tqdm

    cfg.validate()
    bundle, out = Path(cfg.bundle), Path(cfg.out)
    info = check_bundle(bundle)
    if cfg.guidance_token != "off" and not info.has_image_encoder:
        raise UserError(
            f"--bundle {cfg.bundle} has no image_encoder/, so the finetune would run without the guidance token "
            f"(the method's core; a stock SD-1.5 ships none): add one with `{ADD_IMAGE_ENCODER}`, or pass "
            "--guidance-token off to train on text conditioning alone"
        )
    classes = load_classes(cfg.classes)
    samples = collect_samples(Path(cfg.real), classes, cfg.captions, cfg.partial_captions, log)
    precision = resolve_precision(cfg.precision)
    accelerator = Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,  # accelerate's name for fp32
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    say = log if accelerator.is_main_process else (lambda *_: None)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_optimizer_step = cfg.batch_size * world * cfg.grad_accum
    max_steps, length = resolve_length(cfg.max_steps, cfg.epochs, len(samples), per_optimizer_step)
    done = completed_run(cfg, max_steps)
    if done is not None:  # before any model is loaded
        say(
            f"finetune already complete: {done['steps']} steps, merged bundle {done['merged_bundle']} "
            f"({out / 'finetune.json'}); nothing to do (a longer run continues from its last checkpoint)"
        )
        return done
    out.mkdir(parents=True, exist_ok=True)
    use_token = cfg.guidance_token != "off"
    models = load_models(bundle, use_token)
    if not use_token:
        say("guidance token: off (--guidance-token off); training on text conditioning alone")
    device = accelerator.device
    place_frozen(models, device, WEIGHT_DTYPES[precision])
    embeds, encoder_size = None, None
    if use_token:
        embeds = image_embeddings(models, bundle, Path(cfg.real), samples, out / "cache", say, accelerator)
        encoder_size = int(models.image_encoder.config.image_size)
        models.image_encoder = None  # its embeddings are cached: training does not need its memory
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random (B at 0): the same seed, the same run
    add_lora(models.unet, cfg.rank, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    params = lora_parameters(models.unet)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    unet, optimizer = accelerator.prepare(models.unet, optimizer)
    scheduler = lr_scheduler(optimizer, cfg, max_steps)  # stepped once per optimizer step, by this loop

    step = 0
    checkpoints = _checkpoints(out)
    if checkpoints:
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
        set_peft_model_state_dict(accelerator.unwrap_model(unet), state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        # the schedule is a function of the step (and of this run's length, which a longer re-run changes): set
        # the rate of `step` afresh rather than keep the one the checkpoint's optimizer state carries
        scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": here it only sets the resumed rate
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        say(f"resuming from checkpoint {checkpoints[-1].name} (step {step})")
    (out / "finetune_config.json").write_text(json.dumps(jsonable(asdict(cfg)), indent=1))

    size = cfg.image_size or info.image_size
    workers = default_workers() if cfg.workers is None else cfg.workers
    dataset = FinetuneDataset(Path(cfg.real), samples, size, cfg.seed, tokenizer=models.tokenizer)
    sampler = StepBatches(
        len(samples), cfg.batch_size, rank, world, cfg.seed, step * cfg.grad_accum, max_steps * cfg.grad_accum
    )
    batches = iter(step_loader(dataset, sampler, workers, pin_memory=device.type == "cuda"))
    say(
        f"finetune: {world} process(es) x {cfg.batch_size} images = {cfg.batch_size * world} per step"
        + (f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else "")
        + f", {size} px, {workers} loader worker(s) per process; {length}"
    )
    metrics = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = tqdm(total=max_steps, initial=step, desc="finetune", mininterval=1.0, disable=not accelerator.is_main_process)
    t0, seen_here, grad_norm = time.perf_counter(), 0, None  # seen_here: images of this session (the rate)
    unet.train()
    while step < max_steps:
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            mine = batch["indices"]
            pixels = batch["pixels"].to(device, non_blocking=True)
            context = conditioning(models, batch["input_ids"], embeds[mine] if embeds is not None else None)
            generator = torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + (step * cfg.grad_accum + micro) * 97 + rank
            )
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    loss, denoise, dm = training_step_loss(models, unet, pixels, context.to(device), generator, cfg)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            seen_here += len(mine) * world
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if metrics is not None:
            rate = seen_here / (time.perf_counter() - t0)
            row = {
                "step": step,
                "loss": loss.item(),
                "loss_denoise": denoise.item(),
                "loss_dm": dm.item(),
                "lr": lr,
                "grad_norm": grad_norm,
                "images_seen": step * per_optimizer_step,
                "images_per_sec": round(rate, 3),
            }
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if step % cfg.checkpoint_every == 0 and accelerator.is_main_process:
            _save_checkpoint(out, accelerator.unwrap_model(unet), optimizer, step, cfg)
    bar.close()
    if metrics is not None:
        metrics.close()
    if accelerator.is_main_process and not any(c.name == f"step-{step:07d}.pt" for c in _checkpoints(out)):
        # the end always has a checkpoint: a longer run continues from here
        _save_checkpoint(out, accelerator.unwrap_model(unet), optimizer, step, cfg)
    accelerator.wait_for_everyone()
    result = {}
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        lora_path = save_lora(final_unet, out / "lora")
        record = TrainingRecord(
            guidance_token=use_token,
            image_encoder_size=encoder_size,
            merge_scale=cfg.merge_scale,
            lora_rank=cfg.rank,
        )
        merged = merge_bundle(bundle, out / "lora", out / "bundle", cfg.merge_scale, record)
        result = {
            "steps": step,
            "processes": world,
            "images": len(samples),
            "classes": len({s.cls.id for s in samples}),
            "guidance_token": use_token,
            "lora": str(lora_path),
            "merged_bundle": str(merged),
            "merge_scale": cfg.merge_scale,
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }
        write_atomic(out / "finetune.json", json.dumps(result, indent=1).encode())
        say(f"finetune done: LoRA {lora_path}, merged bundle {merged} (scale {cfg.merge_scale})")
    return result


def completed_run(cfg: FinetuneConfig, max_steps: int) -> dict | None:
    """The record of a run in `cfg.out` that finished with these very settings (finetune.json written after its
    merged bundle, the same finetune_config.json, `max_steps` done), else None: re-running a finished job redoes
    nothing."""
    out = Path(cfg.out)
    try:
        record = json.loads((out / "finetune.json").read_text())
        settings = json.loads(json.dumps(jsonable(asdict(cfg))))
        same = json.loads((out / "finetune_config.json").read_text()) == settings
    except (OSError, ValueError):
        return None
    if same and record.get("steps") == max_steps and (out / "bundle" / "model_index.json").is_file():
        return record
    return None


def lr_scheduler(optimizer, cfg: FinetuneConfig, max_steps: int):
    """diffusers' schedules: linear warmup over --lr-warmup-steps, then constant, cosine or linear to 0."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps)
