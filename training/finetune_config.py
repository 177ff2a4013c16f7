"""The settings of `rf-train finetune`, said once: the CLI's defaults and the run record read them from here (no
torch import, so `rf-train --help` stays quick)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from realfake.core.defaults import GUIDANCE_TOKEN_MODES
from realfake.core.errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: realfake.core.precision
LR_SCHEDULES = ("constant", "cosine", "linear")  # after --lr-warmup-steps of linear warmup (diffusers' schedules)


@dataclass
class FinetuneConfig:
    bundle: Path
    real: Path  # the real ImageFolder
    out: Path
    classes: str
    captions: Path | None = None
    partial_captions: bool = False  # accept a captions file that covers only some real images
    rank: int = 4
    lora_alpha: float | None = None  # None: equal to rank
    lr: float = 1e-4
    lr_schedule: str = "constant"  # LR_SCHEDULES; constant is the paper's
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # clip the LoRA gradients' norm (diffusers' LoRA script: 1.0); 0: no clipping
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None  # the run's length in optimizer steps, or:
    epochs: float | None = None  # in passes over the real images; neither: >= 1000 steps and >= 1 epoch
    image_size: int | None = None  # the side images are cropped to; None: the bundle's (512 for SD-1.5)
    workers: int | None = None  # DataLoader processes per training process; None: its share of the cores, max 8
    dm_weight: float = 0.003
    snr_gamma: float = 5.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    merge_scale: float = 0.5
    precision: str = "auto"  # PRECISIONS, of the frozen parts under mixed precision (LoRA trains in fp32)
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward: less memory, ~1/3 slower
    guidance_token: str = "auto"  # GUIDANCE_TOKEN_MODES: auto (when the bundle has an image encoder), on, off
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("rank", "batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # --max-steps with --epochs: refused by finetune_loader.resolve_length, where the length is decided
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs:g}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0 or (self.workers is not None and self.workers < 0):
            raise UserError("--lr-warmup-steps, --max-grad-norm and --workers must be >= 0")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise UserError(f"--image-size must be a multiple of 8 (the VAE's factor), got {self.image_size}")
        if self.lr <= 0 or self.dm_weight < 0 or self.snr_gamma <= 0:
            raise UserError("--lr and --snr-gamma must be > 0 and --dm-weight >= 0")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.guidance_token not in GUIDANCE_TOKEN_MODES:
            raise UserError(f"--guidance-token must be auto, on or off, got {self.guidance_token!r}")
